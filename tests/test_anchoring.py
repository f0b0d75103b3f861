"""``anchor-effects``: therapy offsets moved to the trials' rate ratios, and the derived card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.anchoring import (
    anchor_to_trials,
    first_step_cell_probabilities,
    solve_shift,
)
from ms_forecast_node.forecast.card import ship_model
from ms_forecast_node.forecast.checkpoint import load_model, save_model, sha256_of
from ms_forecast_node.forecast.data import Example, prepare_study
from ms_forecast_node.forecast.model import NET2Forecaster
from ms_forecast_node.simulate.therapies import load_therapies
from tests.forecast_cases import CENTRES, TINY


def _examples(n: int) -> list[Example]:
    rng = np.random.default_rng(0)
    shape = CENTRES.crop_shape
    out = []
    for i in range(n):
        seqs = {name: rng.uniform(50, 150, shape).astype(np.float32) for name in ("FLAIR", "T1")}
        seqs.update({"T2": None, "PD": None})
        study = prepare_study(seqs, np.zeros(shape, bool), CENTRES)
        out.append(Example(f"P{i}", study, "placebo", 48.0, np.zeros(shape, bool), {}, None))  # type: ignore[arg-type]
    return out


def _model() -> NET2Forecaster:
    torch.manual_seed(0)
    model = NET2Forecaster(CENTRES)
    for name, p in model.named_parameters():
        if "film" in name:  # give the therapy embedding a pathway, so therapies differ per study
            torch.nn.init.normal_(p, std=0.5)
    torch.nn.init.constant_(model.denoiser.out.bias, -4.0)
    return model.eval()


def test_shift_solves_the_mean_count_and_is_the_log_ratio_for_rare_cells() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(-9.0, 1.0, (5, 400))
    current = (1 / (1 + np.exp(-logits))).sum(axis=1).mean()
    shift = solve_shift(logits, 0.3 * current)
    after = (1 / (1 + np.exp(-(logits + shift)))).sum(axis=1).mean()
    assert after == pytest.approx(0.3 * current, rel=1e-6)
    # Rare cells: the expected count is nearly exp(logit), so the shift is nearly log(0.3).
    assert shift == pytest.approx(math.log(0.3), abs=1e-3)


def test_unreachable_target_is_a_clear_error() -> None:
    logits = np.zeros((2, 10))
    with pytest.raises(ConfigurationError, match="no logit shift"):
        solve_shift(logits, 11.0)  # more expected lesions than cells


def test_anchored_model_gives_the_trial_ratios_and_leaves_placebo_alone() -> None:
    model = _model()
    examples = _examples(3)
    therapies = load_therapies()
    anchored, result = anchor_to_trials(model, examples, therapies, "9.9.9", samples=1)
    assert anchored.config.version == "9.9.9" and model.config.version != "9.9.9"
    codes = list(CENTRES.therapies)
    # Recomputed with the anchored network (not from the stored probabilities): the shifted
    # offsets land where the network adds them.
    before = np.stack([first_step_cell_probabilities(model, e, codes, 1) for e in examples])
    after = np.stack([first_step_cell_probabilities(anchored, e, codes, 1) for e in examples])
    means = after.sum(axis=2).mean(axis=0)
    placebo = codes.index("placebo")
    assert means[placebo] == pytest.approx(before.sum(axis=2).mean(axis=0)[placebo], rel=1e-6)
    for t in therapies:
        ratio = means[codes.index(t.code)] / means[placebo]
        assert ratio == pytest.approx(1.0 - t.efficacy_net2, rel=1e-3), t.code
        assert result.rate_ratio_after[t.code] == pytest.approx(1.0 - t.efficacy_net2, rel=1e-6)
    # The therapies really differed from the trial before (otherwise nothing was tested).
    assert max(abs(v) for v in result.offset_shift.values()) > 0.05
    # Per-study spread is kept: each study's anchored count is its own count times one factor.
    k = codes.index("ocrelizumab")
    factor = after[:, k].sum(axis=1) / before[:, k].sum(axis=1)
    assert np.ptp(factor) < 0.02 * factor.mean()


def test_anchoring_refuses_a_model_without_rate_offsets() -> None:
    with pytest.raises(ConfigurationError, match="rate offsets"):
        anchor_to_trials(NET2Forecaster(TINY), _examples(1), load_therapies(), "0.0.1")


def _report(tmp_path: Path) -> Path:
    method = {
        "activity": {"auc": 0.76, "ece": 0.07, "accuracy": 0.7},
        "count": {"mae": 0.8, "spearman": 0.5},
        "counterfactual": {"ranking_agreement": 1.0},
    }
    report = tmp_path / "report"
    report.mkdir(exist_ok=True)
    (report / "report.json").write_text(
        json.dumps(
            {
                "cohort": "heldout",
                "n_patients": 200,
                "sampler": {"method": "ancestral", "steps": 1, "samples": 8, "threshold": 0.5},
                "methods": {"diffusion": method},
            }
        )
    )
    return report


def test_card_of_anchored_weights_names_the_base_model_and_the_shifts(tmp_path: Path) -> None:
    model = _model()
    base = tmp_path / "base.safetensors"
    save_model(model, base, {"step": 800, "cohort": str(tmp_path / "missing-cohort")})
    anchored, result = anchor_to_trials(model, _examples(2), load_therapies(), "9.9.9", 1)
    derived = {"file": base.name, "version": "0.1.0", "sha256": sha256_of(base), "extra": {}}
    weights = tmp_path / "anchored.safetensors"
    record = {"derived_from": derived, "anchoring_cohort": "train", **result.as_dict()}
    save_model(anchored, weights, record)
    models = tmp_path / "models"
    target = ship_model(weights, None, _report(tmp_path), models_dir=models)
    card = (models / f"{target.stem}.md").read_text()
    assert "NOT FOR DIAGNOSTIC USE" in card
    assert f"the weights of 0.1.0 (`base.safetensors`, sha256 `{sha256_of(base)[:16]}" in card
    assert "## Therapy effects anchored to the trials" in card
    before, shift = result.rate_ratio_before["ocrelizumab"], result.offset_shift["ocrelizumab"]
    assert f"| ocrelizumab | 0.060 | {before:.3f} | 0.060 | {shift:+.3f} |" in card
    assert load_model(target).config.version == "9.9.9"
    # Weights that are neither from a run nor derived cannot get a card.
    plain = tmp_path / "plain.safetensors"
    save_model(model, plain)
    with pytest.raises(ConfigurationError, match="no training run"):
        ship_model(plain, None, _report(tmp_path), models_dir=tmp_path / "other")
