"""The image-ceiling reference of the evaluation report (forecast/ceilings.py)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ms_forecast_node.forecast.ceilings import (
    YOUNG_CAP,
    EvidenceModel,
    LoadModel,
    activity_parameters,
    event_survival,
    evidence_forecast,
    prelesional_detection_ceiling,
    visible_information_forecast,
    z_visible_posterior,
)
from ms_forecast_node.forecast.registry import default_entry
from ms_forecast_node.simulate.activity import ActivityParameters
from tests.conftest import run_cli


def test_without_hidden_parts_the_ceiling_is_the_oracle() -> None:
    """No hidden activity and one response for all: the rate is known, P = 1 − exp(−μ)."""
    params = ActivityParameters(log_rate_mean=0.3, visible_sd=0.5, hidden_sd=0.0, response_sd=0.0)
    vis = visible_information_forecast(1.2, [0.0, 0.7], 24.0, params)
    mu = np.exp(0.3 + 0.5 * 1.2) * np.array([1.0, 0.3]) * 24.0 / 48.0
    np.testing.assert_allclose(vis.expected_count, mu, rtol=1e-9)
    np.testing.assert_allclose(vis.p_active, 1.0 - np.exp(-mu), rtol=1e-9)


def test_hidden_activity_raises_the_mean_rate_lognormally() -> None:
    """E[exp(h·z)] = exp(h²/2): the Monte Carlo mean must agree to about 1 %."""
    params = ActivityParameters(log_rate_mean=0.0, visible_sd=0.0, hidden_sd=0.68, response_sd=0.0)
    vis = visible_information_forecast(0.0, [0.0], 48.0, params)
    assert vis.expected_count[0] == pytest.approx(np.exp(0.68**2 / 2), rel=0.02)


def test_ceiling_is_monotone_in_activity_and_efficacy() -> None:
    params = ActivityParameters()
    low = visible_information_forecast(-1.0, [0.0, 0.3, 0.94], 48.0, params)
    high = visible_information_forecast(1.0, [0.0, 0.3, 0.94], 48.0, params)
    assert np.all(np.diff(high.p_active) < 0) and np.all(np.diff(high.expected_count) < 0)
    assert np.all(high.p_active > low.p_active)


def test_event_survival_without_response_spread_is_one_minus_efficacy() -> None:
    params = ActivityParameters(response_sd=0.0)
    assert event_survival(0.74, params) == pytest.approx(0.26)
    assert event_survival(0.74, ActivityParameters(response_sd=0.3)) > 0.26  # Jensen, convex


def _sidecar(therapy: str, count: int, lesions: list[tuple[bool, list[str]]]) -> dict:
    return {
        "factual_therapy": therapy,
        "truth": {"net2_count": {therapy: count}},
        "lesions": [
            {"kind": "new", "prodrome_visible": visible, "occurs_under": under}
            for visible, under in lesions
        ]
        + [{"kind": "baseline", "prodrome_visible": False, "occurs_under": [therapy]}],
    }


def test_prelesional_ceiling_counts_by_hand() -> None:
    params = ActivityParameters(response_sd=0.0)
    efficacy = {"placebo": 0.0, "strong": 0.9}
    sidecars = [
        # placebo: two visible sites (one happens), one invisible new lesion happens,
        # and the baseline lesion enlarges: 3 truth lesions, 2 marked, 1 true positive
        _sidecar("placebo", 3, [(True, ["placebo"]), (True, []), (False, ["placebo"])]),
        # strong therapy: survival 0.1 < 0.5, nothing is marked
        _sidecar("strong", 1, [(True, ["strong"])]),
    ]
    det = prelesional_detection_ceiling(sidecars, efficacy, params, threshold=0.5)
    assert (det.tp_pred, det.n_pred, det.n_truth, det.fp) == (1, 2, 4, 1)
    assert det.precision == pytest.approx(0.5) and det.recall == pytest.approx(0.25)
    everything = prelesional_detection_ceiling(sidecars, efficacy, params, threshold=0.0)
    assert (everything.tp_pred, everything.n_pred) == (2, 3)


def test_activity_parameters_come_from_the_cohort_header() -> None:
    header = {"config": {"activity": {"visible_sd": 0.5, "log_rate_mean": 0.1, "x": 1}}}
    params = activity_parameters(header)
    assert (params.visible_sd, params.log_rate_mean) == (0.5, 0.1)
    assert activity_parameters({}) == ActivityParameters()


def _posterior_mean(young: int, load_ml: float) -> float:
    return float(np.linspace(-5, 5, 401) @ z_visible_posterior(young, load_ml, LoadModel()))


def test_evidence_posterior_rises_with_young_lesions_and_load() -> None:
    means = [_posterior_mean(n, 4.0) for n in (0, 1, 3, 8, YOUNG_CAP)]
    assert all(a < b for a, b in itertools.pairwise(means))
    assert _posterior_mean(1, 1.0) < _posterior_mean(1, 4.0) < _posterior_mean(1, 20.0)
    # Median load and a young-lesion count near its prior mean say little: z near 0.
    assert abs(_posterior_mean(1, 4.0)) < 0.3


def test_evidence_forecast_is_calibrated_over_the_simulator_population() -> None:
    """Drawn from the simulator's own model, the evidence reader's mean P(active) equals the
    mean of the image ceiling's (both are the population's), while it spreads less."""
    params = ActivityParameters()
    efficacies = [0.0, 0.67]
    model = EvidenceModel.build(efficacies, 48.0, params)
    load = LoadModel()
    rng = np.random.default_rng(7)
    evidence, ceiling = [], []
    for _ in range(1500):
        z = rng.standard_normal()
        young = int(min(rng.poisson(np.exp(0.2 + 0.8 * z)), YOUNG_CAP))
        load_ml = float(
            np.exp(np.log(4.0) + 0.9 * (0.5 * z + np.sqrt(0.75) * rng.standard_normal()))
        )
        evidence.append(evidence_forecast(young, load_ml, model, load).p_active)
        ceiling.append(visible_information_forecast(z, efficacies, 48.0, params).p_active)
    ev, ce = np.asarray(evidence), np.asarray(ceiling)
    assert ev.mean(axis=0) == pytest.approx(ce.mean(axis=0), abs=0.02)
    assert np.all(ev.std(axis=0) < ce.std(axis=0))


@pytest.mark.slow
def test_evaluate_reports_the_image_ceiling(small_cohort: Path, tmp_path: Path) -> None:
    """End to end on the shipped model: the report has every reference and the ceiling row."""
    out = tmp_path / "eval"
    cohort = tmp_path / "cohort"  # evaluate caches model inputs in the cohort: use a copy
    shutil.copytree(small_cohort, cohort)
    result = run_cli(
        "evaluate",
        "--model",
        str(default_entry().file),
        "--cohort",
        str(cohort),
        "--out",
        str(out),
        "--train-cohort",
        str(small_cohort),
        "--samples",
        "2",
        "--steps",
        "2",
        "--limit",
        "3",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert {"diffusion", "base_rate", "image_evidence", "image_ceiling", "oracle"} <= set(methods)
    assert list(methods)[-3:] == ["image_evidence", "image_ceiling", "oracle"]
    ceiling = methods["image_ceiling"]
    assert 0.0 <= ceiling["lesion_detection"]["f1"] <= 1.0
    assert set(ceiling["lesion_detection"]["f1_by_survival_threshold"]) == {
        "0",
        "0.25",
        "0.5",
        "0.75",
    }
    cf = np.asarray(
        ceiling["counterfactual"]["average_effect_predicted"]["ocrelizumab"]["relative_reduction"]
    )
    assert cf > 0.5  # the ceiling knows the therapies' effects
    assert "image_ceiling" in (out / "report.md").read_text()
    # Bootstrap intervals per method, paired differences of the diffusion model, and the
    # per-patient records that let two reports be compared patient by patient.
    for m in methods.values():
        assert set(m["ci95"]) >= {"activity_auc", "activity_ece", "count_mae"}
    paired = report["paired_differences_of_diffusion"]
    assert set(paired) == set(methods) - {"diffusion"}
    mae = paired["oracle"]["count_mae"]
    assert mae["difference"] == pytest.approx(
        methods["diffusion"]["count"]["mae"] - methods["oracle"]["count"]["mae"]
    )
    assert mae["ci95"][0] <= mae["difference"] <= mae["ci95"][1]
    assert len(report["patients"]) == 3
    first = report["patients"][0]
    assert len(first["diffusion"]["counterfactual"]) == len(report["therapies"])
    assert "Uncertainty: 95 % bootstrap intervals" in (out / "report.md").read_text()
