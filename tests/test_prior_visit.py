"""The prior visit: simulated (interval events from the full placebo rate), loaded as the model's
temporal context, dropped in training, hidden in evaluation, and read by the references."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ms_forecast_node.forecast.batches import ExampleBank
from ms_forecast_node.forecast.ceilings import (
    RateTable,
    ceiling_with_prior,
    evidence_with_prior,
    visible_information_forecast,
)
from ms_forecast_node.forecast.config import (
    INTERVAL_FLAG,
    LESION_CHANNEL,
    PRIOR_ACTIVITY_FLAG,
    PRIOR_CHANNELS,
    PRIOR_FLAG,
    ModelConfig,
    TrainConfig,
)
from ms_forecast_node.forecast.data import (
    hide_prior,
    interval_lesion_count,
    load_examples,
    prior_activity_feature,
)
from ms_forecast_node.forecast.model import NET2Forecaster
from ms_forecast_node.forecast.prior_head import fit_head, fit_head_pseudocount
from ms_forecast_node.simulate.activity import ActivityParameters, PatientActivity, rank_auc
from ms_forecast_node.simulate.cohort import load_nifti
from ms_forecast_node.simulate.config import SimulationConfig
from ms_forecast_node.simulate.lesions import LesionAge
from ms_forecast_node.simulate.patient import (
    EventKind,
    _interval_events,
    design_patient,
    render_patient,
)
from ms_forecast_node.simulate.therapies import load_therapies
from tests.forecast_cases import CENTRES

PRIOR_MASK = PRIOR_CHANNELS.start  # the prior lesion mask; the prior FLAIR follows it


def test_interval_events_are_poisson_in_the_full_placebo_rate() -> None:
    """Mean and variance of the interval count equal rate × weeks / 48 (hidden part included:
    the rate passed in is the patient's whole placebo rate)."""
    lesions = list(design_patient(5, 0).baseline_lesions)
    config = SimulationConfig(prior_visit_weeks=24.0)
    activity = PatientActivity(0.0, 1.5, 1.0, 3.0, {})
    rng = np.random.default_rng(0)
    counts = np.array([len(_interval_events(lesions, activity, config, rng)) for _ in range(3000)])
    assert counts.mean() == pytest.approx(1.5, rel=0.06)
    assert counts.var() == pytest.approx(1.5, rel=0.12)


def test_interval_new_lesions_are_the_young_ones_first_and_never_black_holes() -> None:
    lesions = list(design_patient(5, 0).baseline_lesions)
    young = {les.lesion_id for les in lesions if les.age is LesionAge.YOUNG}
    black = {les.lesion_id for les in lesions if les.black_hole}
    config = SimulationConfig()
    activity = PatientActivity(0.0, 0.0, 1.0, 40.0, {})
    events = _interval_events(lesions, activity, config, np.random.default_rng(1))
    new = [e.lesion_id for e in events if e.kind is EventKind.NEW]
    assert len(new) > len(young)
    assert set(new[: len(young)]) == young
    assert not set(new) & black
    assert len({e.lesion_id for e in events}) == len(events)  # one change per lesion


def test_prior_visit_keeps_the_baseline_and_renders_the_interval() -> None:
    """The prior visit uses a seventh random stream: baseline and events are those of a
    patient drawn without it; at the prior visit the interval's new lesions are absent and its
    enlarged lesions smaller."""
    with_prior = design_patient(1000, 2)
    without = design_patient(1000, 2, SimulationConfig(prior_visit_weeks=0.0))
    assert without.prior_events == () and without.prior_scanner is None
    assert [les.shape.center.tolist() for les in with_prior.baseline_lesions] == [
        les.shape.center.tolist() for les in without.baseline_lesions
    ]
    assert with_prior.events == without.events
    design = next(
        d
        for d in (design_patient(1000, i) for i in range(12))
        if {e.kind for e in d.prior_events} == {EventKind.NEW, EventKind.ENLARGE}
    )
    rendered = render_patient(design)
    assert rendered.prior_labels is not None
    for event in design.prior_events:
        at_baseline = np.count_nonzero(rendered.baseline_labels == event.lesion_id)
        at_prior = np.count_nonzero(rendered.prior_labels == event.lesion_id)
        if event.kind is EventKind.NEW:
            assert at_prior == 0
        else:
            assert at_prior < at_baseline
    changed = {e.lesion_id for e in design.prior_events}
    for lesion in design.baseline_lesions:
        if lesion.lesion_id not in changed:
            assert np.count_nonzero(rendered.prior_labels == lesion.lesion_id) == np.count_nonzero(
                rendered.baseline_labels == lesion.lesion_id
            )


def test_cohort_prior_visit_reaches_the_model_inputs(small_cohort: Path) -> None:
    config = ModelConfig()
    examples = load_examples(small_cohort, config, cache=False)
    for example in examples:
        sidecar = json.loads((example.patient.folder / "patient.json").read_text())
        assert sidecar["visits"]["prior"]["week"] == -48.0
        truth = sidecar["truth"]
        assert truth["prior_interval_weeks"] == 48.0
        labels, _ = load_nifti(example.patient.folder / "prior" / "lesions.nii.gz")
        assert labels.max() > 0
        assert example.study.flags[PRIOR_FLAG] == 1.0
        assert example.study.flags[INTERVAL_FLAG] == pytest.approx(1.0)
        prior_mask = example.study.images[PRIOR_MASK]
        current = example.study.images[LESION_CHANNEL]
        # Lesions only shrink going back to the prior visit, apart from the ones that shrink
        # between prior and baseline (none: shrinking is a follow-up event).
        assert prior_mask.sum() <= current.sum()
        assert example.study.images[PRIOR_MASK + 1].std() > 0  # the prior FLAIR
        hidden = hide_prior(example)
        assert hidden.study.images[PRIOR_MASK:].max() == 0.0
        assert hidden.study.flags[PRIOR_FLAG:].max() == 0.0
        np.testing.assert_array_equal(
            hidden.study.images[:PRIOR_MASK], example.study.images[:PRIOR_MASK]
        )
        assert example.study.flags[PRIOR_FLAG] == 1.0  # the original is untouched


def test_prior_dropout_hides_the_whole_prior_visit(small_cohort: Path) -> None:
    config = ModelConfig()
    examples = load_examples(small_cohort, config, cache=False)
    data = ExampleBank(examples, config, torch.device("cpu"))
    rng = np.random.default_rng(0)
    always = replace(TrainConfig(), modality_dropout=0.0, condition_dropout=0.0, prior_dropout=1.0)
    batch = data.batch(range(len(examples)), always, rng, augment=True)
    assert float(batch["images"][:, PRIOR_MASK:].abs().max()) == 0.0
    assert float(batch["flags"][:, PRIOR_FLAG:].abs().max()) == 0.0
    assert float(batch["images"][:, LESION_CHANNEL].sum()) > 0  # the current mask stays
    never = replace(always, prior_dropout=0.0)
    batch = data.batch(range(len(examples)), never, rng, augment=True)
    assert float(batch["flags"][:, PRIOR_FLAG].min()) == 1.0
    assert float(batch["images"][:, PRIOR_MASK].sum()) > 0


def _population(n: int, weeks: float, seed: int = 3) -> dict[str, np.ndarray]:
    params = ActivityParameters()
    eff = np.array([t.efficacy_net2 for t in load_therapies()])
    rng = np.random.default_rng(seed)
    z_v, z_h = rng.standard_normal(n), rng.standard_normal(n)
    m = np.exp(rng.normal(0.0, params.response_sd, n))
    arm = rng.integers(0, len(eff), n)
    mu0 = np.exp(params.log_rate_mean + params.visible_sd * z_v + params.hidden_sd * z_h)
    return {
        "z_v": z_v,
        "arm": arm,
        "interval": rng.poisson(mu0 * weeks / 48.0),
        "active": rng.poisson(mu0 * (1.0 - eff[arm]) ** m) > 0,
        "eff": eff,
    }


def test_ceiling_with_prior_is_calibrated_and_sharper_than_without() -> None:
    """Over the simulator's own population: the prior-aware ceiling's mean P(active) matches
    the share of active patients, and its AUC beats the single-visit ceiling's."""
    params = ActivityParameters()
    pop = _population(1500, 48.0)
    table = RateTable.build(list(pop["eff"]), 48.0, params)
    with_prior, without = [], []
    for z, k, n in zip(pop["z_v"], pop["arm"], pop["interval"], strict=True):
        with_prior.append(ceiling_with_prior(float(z), int(n), 48.0, table).p_active[k])
        without.append(visible_information_forecast(float(z), pop["eff"], 48.0, params).p_active[k])
    with_prior_a, without_a = np.array(with_prior), np.array(without)
    assert with_prior_a.mean() == pytest.approx(pop["active"].mean(), abs=0.03)
    assert rank_auc(with_prior_a, pop["active"]) > rank_auc(without_a, pop["active"]) + 0.02


def test_prior_evidence_rises_with_the_interval_count_and_a_zero_week_interval_is_silent() -> None:
    params = ActivityParameters()
    eff = [t.efficacy_net2 for t in load_therapies()]
    table = RateTable.build(eff, 48.0, params)
    quiet = evidence_with_prior(2, 4.0, 0, 48.0, table)
    busy = evidence_with_prior(2, 4.0, 6, 48.0, table)
    assert np.all(busy.p_active > quiet.p_active)
    assert np.all(busy.expected_count > 2 * quiet.expected_count)
    # An interval of (almost) no time carries no information: the single-visit ceiling.
    silent = ceiling_with_prior(0.4, 0, 1e-9, table)
    single = visible_information_forecast(0.4, eff, 48.0, params)
    np.testing.assert_allclose(silent.p_active, single.p_active, atol=0.01)
    np.testing.assert_allclose(silent.expected_count, single.expected_count, rtol=0.02)


def test_interval_lesion_count_follows_the_net2_definition() -> None:
    current = np.zeros((12, 12, 12), bool)
    prior = current.copy()
    current[1:3, 1:3, 1:3] = prior[1:3, 1:3, 1:3] = True  # stable: not counted
    current[5:8, 5:8, 5:8] = True
    prior[5:7, 5:8, 5:8] = True  # 27 voxels now, 18 before: exactly 1.5×, enlarging
    current[0, 10, 10] = True  # new
    current[10:12, 0:2, 0:2] = True
    prior[10:12, 0:2, 0] = True  # 8 voxels now, 4 before: enlarging
    current[9, 9, 0:3] = True
    prior[9, 9, 0:2] = True  # 3 now, 2 before: grew by 50 %, counted
    assert interval_lesion_count(current, prior) == 4
    assert interval_lesion_count(prior, prior) == 0
    assert prior_activity_feature(current, prior, 24.0) == pytest.approx(np.log(4.5 / 0.5))


def test_prior_head_fit_recovers_a_known_head() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(-7.0, 1.0, (600, 400))  # ~0.7 expected lesions per study
    features = rng.normal(0.0, 1.0, 600)
    true_a, true_b = 0.3, 0.6
    lam = (1.0 / (1.0 + np.exp(-(logits + (true_a + true_b * features)[:, None])))).sum(axis=1)
    counts = rng.poisson(lam).astype(float)
    a, b, before, after = fit_head(logits, features, counts)
    assert a == pytest.approx(true_a, abs=0.1)
    assert b == pytest.approx(true_b, abs=0.1)
    assert after > before


def test_pseudocount_head_fit_recovers_a_known_head() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(-7.0, 1.0, (800, 400))
    events = rng.integers(0, 12, 800).astype(float)  # a wide range identifies b and c apart
    w48 = np.ones(800)
    true_a, true_b, true_c = -0.8, 0.9, 2.0
    shift = true_a + true_b * np.log((events + true_c) / w48)
    lam = (1.0 / (1.0 + np.exp(-(logits + shift[:, None])))).sum(axis=1)
    counts = rng.poisson(lam).astype(float)
    a, b, c, before, after = fit_head_pseudocount(logits, events, w48, counts)
    fitted = a + b * np.log((events + c) / w48)
    # (a, b, c) trade off along a ridge; the shift they make is what must come back, and the
    # fit must be at least as likely as the truth (a simplex started at b = 0 drifted to a
    # huge c and a flat shift, 100 log-likelihood units below it).
    assert np.abs(fitted - shift).max() < 0.25
    truth = float(np.sum(counts * np.log(lam) - lam))
    assert after >= truth - 0.5
    assert after > before


def test_pseudocount_head_reads_the_interval_count_back_from_the_feature() -> None:
    config = replace(CENTRES, prior_activity_head=True, prior_activity_pseudocount=True)
    model = NET2Forecaster(config).eval()
    assert model.denoiser.prior_activity is not None
    with torch.no_grad():
        model.denoiser.prior_activity.copy_(torch.tensor([0.2, 0.7, float(np.log(1.5))]))
    flags = torch.ones(3, PRIOR_ACTIVITY_FLAG + 1)
    events = torch.tensor([0.0, 3.0, 0.0])
    w48 = torch.tensor([1.0, 0.5, 1.0])
    flags[:, INTERVAL_FLAG] = w48
    flags[:, PRIOR_ACTIVITY_FLAG] = torch.log((events + 0.5) / w48)  # as prepare_study writes it
    flags[2, PRIOR_FLAG] = 0.0  # no prior visit: no shift
    expected = 0.2 + 0.7 * torch.log((events + 1.5) / w48)
    expected[2] = 0.0
    torch.testing.assert_close(model.denoiser.prior_activity_shift(flags), expected)


def test_prior_head_shifts_only_studies_with_a_prior_visit() -> None:
    config = replace(CENTRES, prior_activity_head=True)
    torch.manual_seed(0)
    model = NET2Forecaster(config).eval()
    assert model.denoiser.prior_activity is not None
    images = torch.randn(2, config.n_image_channels, *config.crop_shape)
    flags = torch.ones(2, PRIOR_ACTIVITY_FLAG + 1)
    flags[1, PRIOR_FLAG] = 0.0  # the second study has no prior visit
    flags[:, PRIOR_ACTIVITY_FLAG] = 1.7  # its feature is ignored
    x_t = torch.randn(2, 1, *(s // 4 for s in config.crop_shape))  # the cell map
    t = torch.tensor([10, 10])
    therapy = torch.tensor([0, 0])
    horizon = torch.tensor([48.0, 48.0])
    with torch.no_grad():
        off = model.denoiser(x_t, t, therapy, horizon, model.encoder(images, flags))
        model.denoiser.prior_activity.copy_(torch.tensor([0.25, 0.5]))
        on = model.denoiser(x_t, t, therapy, horizon, model.encoder(images, flags))
    torch.testing.assert_close(on[0] - off[0], torch.full_like(on[0], 0.25 + 0.5 * 1.7))
    torch.testing.assert_close(on[1], off[1])
