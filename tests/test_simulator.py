"""The simulator: determinism, NET2 truth, counterfactual coherence, locations, efficacy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from ms_forecast_node.anatomy.locations import LocationClass, LocationMaps, classify_lesions
from ms_forecast_node.anatomy.template import load_template_anatomy
from ms_forecast_node.errors import ConfigurationError, SimulationError
from ms_forecast_node.simulate.activity import oracle_activity_auc
from ms_forecast_node.simulate.config import SimulationConfig
from ms_forecast_node.simulate.lesions import random_shape, render
from ms_forecast_node.simulate.patient import EventKind, design_patient, render_patient
from ms_forecast_node.simulate.therapies import load_therapies

THERAPIES = load_therapies()
BY_STRENGTH = sorted(THERAPIES, key=lambda t: t.efficacy_net2)


@pytest.fixture(scope="module")
def rendered_patients() -> list:
    # Seed 11 patients 0..5 include active and inactive ones (checked below).
    return [render_patient(design_patient(11, i)) for i in range(6)]


def test_same_seed_same_patient_and_different_index_differs() -> None:
    a = render_patient(design_patient(5, 2))
    b = render_patient(design_patient(5, 2))
    c = design_patient(5, 3)
    assert a.design.factual_therapy == b.design.factual_therapy
    np.testing.assert_array_equal(a.baseline_labels, b.baseline_labels)
    for code in a.net2:
        np.testing.assert_array_equal(a.net2[code], b.net2[code])
    assert [e.threshold for e in a.design.events] == [e.threshold for e in b.design.events]
    assert len(c.baseline_lesions) != len(a.design.baseline_lesions) or not np.allclose(
        c.baseline_lesions[0].shape.center, a.design.baseline_lesions[0].shape.center
    )


def test_net2_is_new_or_enlarged_follow_up_voxels_not_in_baseline(rendered_patients) -> None:
    for r in rendered_patients:
        factual = r.design.factual_therapy
        net2 = r.net2[factual]
        baseline = r.baseline_labels > 0
        followup = r.followup_labels > 0
        assert not np.any(net2 & baseline)
        assert np.all(followup[net2])
        active = {e.lesion_id for e in r.design.occurring_events(factual)}
        expected = followup & ~baseline & np.isin(r.followup_labels, list(active))
        np.testing.assert_array_equal(net2, expected)
        # Every NET2 lesion id is a new lesion or an enlargement that happens under the therapy.
        kinds = {e.lesion_id: e.kind for e in r.design.occurring_events(factual)}
        assert set(r.net2_lesion_ids[factual]) <= set(kinds)
        # Enlarging lesions at follow-up are bigger by at least the enlarging threshold.
        for lid, kind in kinds.items():
            if kind is EventKind.ENLARGE:
                bl = np.count_nonzero(r.baseline_labels == lid)
                fu = np.count_nonzero(r.followup_labels == lid)
                assert fu >= bl, (lid, bl, fu)


def test_counterfactuals_are_nested_by_therapy_strength(rendered_patients) -> None:
    any_difference = False
    for r in rendered_patients:
        for weaker, stronger in itertools.pairwise(BY_STRENGTH):
            a, b = r.net2[weaker.code], r.net2[stronger.code]
            assert not np.any(b & ~a), (r.design.patient_id, weaker.code, stronger.code)
            assert set(r.net2_lesion_ids[stronger.code]) <= set(r.net2_lesion_ids[weaker.code])
            any_difference |= bool(np.any(a & ~b))
    assert any_difference, "no patient differed between therapies: the test set is too quiet"


def test_every_therapy_is_simulated_and_placebo_has_activity(rendered_patients) -> None:
    codes = {t.code for t in THERAPIES}
    assert len(codes) == 7
    for r in rendered_patients:
        assert set(r.net2) == codes
    assert any(r.net2["placebo"].any() for r in rendered_patients)


def _plant_and_classify(zone_mask: np.ndarray, anatomy, rng: np.random.Generator) -> str:
    grid = anatomy.grid
    flat = rng.choice(np.flatnonzero(zone_mask))
    kji = np.array(np.unravel_index(flat, grid.shape), dtype=float)
    center = grid.index_to_world(kji[::-1][None])[0]
    shape = random_shape(rng, center, 4.0 / 3.0 * np.pi * 2.5**3)  # 5 mm lesion
    box, frac = render(shape, grid)
    labels = np.zeros(grid.shape, dtype=np.int32)
    labels[box][frac >= 0.5] = 1
    maps = LocationMaps(
        grid, anatomy.dist_ventricles_mm, anatomy.dist_cortex_mm, anatomy.infratentorial
    )
    return classify_lesions(labels, maps)[1].value


@pytest.mark.parametrize("trial", range(3))
def test_location_classes_of_planted_lesions(trial: int) -> None:
    anatomy = load_template_anatomy(1.0)
    rng = np.random.default_rng(trial)
    wm, dv, dc = anatomy.wm, anatomy.dist_ventricles_mm, anatomy.dist_cortex_mm
    infra = anatomy.infratentorial > 0.5
    deep_infra = ndimage.binary_erosion(infra, iterations=4)
    cases = {
        LocationClass.PERIVENTRICULAR: (wm > 0.7) & (dv > 1.0) & (dv < 2.0) & ~infra,
        LocationClass.JUXTACORTICAL: (wm > 0.5) & (dc > 1.0) & (dc < 1.8) & (dv > 15) & ~infra,
        LocationClass.INFRATENTORIAL: deep_infra & (wm > 0.7),
        LocationClass.DEEP_WHITE_MATTER: (wm > 0.95) & (dv > 10) & (dc > 8) & ~infra,
    }
    for expected, zone in cases.items():
        assert zone.any(), expected
        assert _plant_and_classify(zone, anatomy, rng) == expected.value


def test_cerebellum_lesion_at_mni_coordinate_is_infratentorial_and_left_is_left() -> None:
    anatomy = load_template_anatomy(1.0)
    grid = anatomy.grid
    # MNI RAS (-22, -62, -38): left cerebellar hemisphere -> LPS (22, 62, -38).
    idx = np.round(grid.world_to_index(np.array([[22.0, 62.0, -38.0]]))[0]).astype(int)
    assert anatomy.infratentorial[idx[2], idx[1], idx[0]] > 0.5
    # Left hemisphere in LPS has x > 0; the template grid's i axis runs towards the right.
    assert (
        grid.index_to_world(np.array([[0, 0, 0]]))[0, 0]
        > grid.index_to_world(np.array([[10, 0, 0]]))[0, 0]
    )


def test_efficacy_ordering_visible_in_cohort_averages() -> None:
    designs = [design_patient(21, i) for i in range(40)]
    horizon = designs[0].horizon_weeks
    expected = {
        t.code: np.mean([d.activity.expected_count(t.code, horizon) for d in designs])
        for t in THERAPIES
    }
    realised = {
        t.code: np.mean([len(d.occurring_events(t.code)) for d in designs]) for t in THERAPIES
    }
    ordered = [t.code for t in BY_STRENGTH]
    exp_values = [expected[c] for c in ordered]
    real_values = [realised[c] for c in ordered]
    assert all(a > b for a, b in itertools.pairwise(exp_values))
    assert all(a >= b for a, b in itertools.pairwise(real_values))
    # The cohort shows the trial effect: realised placebo counts far above the strongest arm.
    assert realised["placebo"] > 0.5
    assert realised[ordered[-1]] < 0.35 * realised["placebo"]


def test_oracle_auc_is_calibrated_near_085_and_images_carry_less() -> None:
    result = oracle_activity_auc(n_patients=20000, seed=0)
    assert 0.82 <= result["oracle_auc"] <= 0.88
    assert result["visible_only_auc"] < result["oracle_auc"] - 0.03
    assert 0.15 <= result["placebo_zero_share"] <= 0.5


def test_baseline_lesion_load_is_rrms_like() -> None:
    loads = [design_patient(31, i).lesion_load_target_ml for i in range(25)]
    assert min(loads) >= 0.6 and max(loads) <= 40.0
    assert 1.5 <= float(np.median(loads)) <= 10.0


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(SimulationError):
        SimulationConfig(horizon_weeks=200)
    with pytest.raises(SimulationError):
        design_patient(1, 0, factual_therapy="homeopathy")


def test_broken_therapy_table_is_a_configuration_error(tmp_path) -> None:
    bad = tmp_path / "therapies.yaml"
    bad.write_text("therapies:\n  - code: x\n    name: X\n")
    with pytest.raises(ConfigurationError):
        load_therapies.__wrapped__(bad)
