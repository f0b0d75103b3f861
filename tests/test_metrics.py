"""Evaluation metrics, each checked against values computed by hand (arithmetic in comments)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ms_forecast_node.forecast.metrics import (
    LesionDetection,
    activity_metrics,
    average_effect,
    bootstrap_ci,
    bootstrap_statistic,
    count_errors,
    dice,
    expected_calibration_error,
    lesion_detection,
    per_patient_kendall,
    plot_reliability,
    pooled_detection,
    rank_auc,
    ranking_agreement,
    reliability_curve,
)

# ----------------------------------------------------------------------------- Dice


def test_dice_known_overlap() -> None:
    a = np.zeros((4, 4, 4), dtype=bool)
    b = np.zeros((4, 4, 4), dtype=bool)
    a[0:2, 0:2, 0:2] = True  # 8 voxels
    b[1:3, 0:2, 0:2] = True  # 8 voxels; overlap is a[1:2, 0:2, 0:2] = 1*2*2 = 4 voxels
    # Dice = 2 * 4 / (8 + 8) = 0.5
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == pytest.approx(1.0)
    # non-boolean masks: any non-zero voxel counts
    assert dice(a.astype(np.uint8) * 3, b.astype(float)) == pytest.approx(0.5)


def test_dice_empty_cases() -> None:
    empty = np.zeros((3, 3, 3))
    one = empty.copy()
    one[1, 1, 1] = 1
    assert dice(empty, empty) == 1.0  # both empty: defined as 1
    assert dice(one, empty) == 0.0  # 2*0 / (1 + 0)
    assert dice(empty, one) == 0.0
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


# ----------------------------------------------------------------------------- lesion detection


def _detection_volumes() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((12, 12, 12), dtype=bool)
    pred = np.zeros((12, 12, 12), dtype=bool)
    truth[1:3, 1:3, 1:3] = True  # T1, 8 voxels
    truth[6:8, 1:3, 1:3] = True  # T2, 8 voxels, no prediction near it -> missed
    truth[1:3, 7:9, 7:9] = True  # T3, 8 voxels
    truth[10, 10, 10] = True  # T4, 1 voxel (dropped when min_voxels=2)
    pred[2:4, 1:3, 1:3] = True  # P1, 8 voxels, overlaps T1 in [2:3,1:3,1:3] = 4 voxels
    pred[6:8, 7:9, 7:9] = True  # P2, 8 voxels, no truth there -> false positive
    pred[1:3, 7:9, 8:10] = True  # P3, 8 voxels, overlaps T3 in [1:3,7:9,8:9] = 4 voxels
    pred[10, 1, 10] = True  # P4, 1 voxel, no truth there (dropped when min_voxels=2)
    return pred, truth


def test_lesion_detection_blobs() -> None:
    pred, truth = _detection_volumes()
    d = lesion_detection(pred, truth, min_voxels=2)
    # kept truth: T1, T2, T3 -> T1, T3 detected, T2 missed
    # kept pred: P1, P2, P3 -> P1, P3 hit a lesion, P2 is a false positive
    assert d == LesionDetection(tp_truth=2, fn=1, tp_pred=2, fp=1, n_truth=3, n_pred=3)
    # precision = 2/3, recall = 2/3, F1 = 2*(2/3)*(2/3)/(4/3) = 2/3
    assert d.precision == pytest.approx(2 / 3)
    assert d.recall == pytest.approx(2 / 3)
    assert d.f1 == pytest.approx(2 / 3)


def test_lesion_detection_min_voxels_and_overlap() -> None:
    pred, truth = _detection_volumes()
    # min_voxels=1 keeps the specks: T4 is missed as well, P4 is a false positive as well
    d = lesion_detection(pred, truth, min_voxels=1)
    assert d == LesionDetection(tp_truth=2, fn=2, tp_pred=2, fp=2, n_truth=4, n_pred=4)
    # precision = 2/4, recall = 2/4, F1 = 2*0.25/1 = 0.5
    assert (d.precision, d.recall, d.f1) == pytest.approx((0.5, 0.5, 0.5))
    # T1 and T3 each share exactly 4 voxels with predictions
    assert lesion_detection(pred, truth, min_voxels=2, min_overlap_voxels=4).tp_truth == 2
    d5 = lesion_detection(pred, truth, min_voxels=2, min_overlap_voxels=5)
    # 4 < 5: no truth lesion is detected; P1 and P3 still overlap a lesion, so they are not FPs
    assert (d5.tp_truth, d5.fn, d5.tp_pred, d5.fp) == (0, 3, 2, 1)


def test_lesion_detection_26_connectivity_and_edge_cases() -> None:
    truth = np.zeros((4, 4, 4), dtype=bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True  # corner-touching voxels: one 26-connected lesion
    d = lesion_detection(np.zeros_like(truth), truth)
    assert d == LesionDetection(tp_truth=0, fn=1, tp_pred=0, fp=0, n_truth=1, n_pred=0)
    # no prediction: precision 1 by convention, recall 0/1 = 0, F1 = 0
    assert (d.precision, d.recall, d.f1) == (1.0, 0.0, 0.0)
    # predicting only the corner voxel (1 of 2 voxels) detects the lesion
    pred = np.zeros_like(truth)
    pred[1, 1, 1] = True
    assert lesion_detection(pred, truth).tp_truth == 1
    # both empty: P = R = F1 = 1
    e = lesion_detection(np.zeros_like(truth), np.zeros_like(truth))
    assert (e.n_truth, e.n_pred, e.precision, e.recall, e.f1) == (0, 0, 1.0, 1.0, 1.0)
    # predictions without any lesion: precision 0/1 = 0, recall 1 by convention, F1 = 0
    f = lesion_detection(pred, np.zeros_like(truth))
    assert (f.fp, f.precision, f.recall, f.f1) == (1, 0.0, 1.0, 0.0)


def test_pooled_detection_sums_counts() -> None:
    a = LesionDetection(tp_truth=2, fn=1, tp_pred=2, fp=1, n_truth=3, n_pred=3)
    b = LesionDetection(tp_truth=0, fn=1, tp_pred=0, fp=0, n_truth=1, n_pred=0)
    pooled = pooled_detection([a, b])
    assert pooled == LesionDetection(tp_truth=2, fn=2, tp_pred=2, fp=1, n_truth=4, n_pred=3)
    # micro precision = 2/3, recall = 2/4; F1 = 2*(2/3)*(1/2)/(2/3+1/2) = (2/3)/(7/6) = 4/7
    assert pooled.precision == pytest.approx(2 / 3)
    assert pooled.recall == pytest.approx(0.5)
    assert pooled.f1 == pytest.approx(4 / 7)
    assert pooled_detection([]) == LesionDetection(0, 0, 0, 0, 0, 0)


# ----------------------------------------------------------------------------- counts


def test_count_errors_known_permutation() -> None:
    pred = np.array([1, 2, 3, 4, 5])
    true = np.array([2, 1, 4, 3, 7])
    # |d| = 1,1,1,1,2 -> MAE = 6/5 = 1.2; d = -1,1,-1,1,-2 -> bias = -2/5 = -0.4
    # RMSE = sqrt((1+1+1+1+4)/5) = sqrt(1.6)
    # ranks of true = 2,1,4,3,5; rank differences = -1,1,-1,1,0, sum d^2 = 4
    # rho = 1 - 6*4 / (5*(25-1)) = 1 - 24/120 = 0.8
    out = count_errors(pred, true)
    assert out["mae"] == pytest.approx(1.2)
    assert out["bias"] == pytest.approx(-0.4)
    assert out["rmse"] == pytest.approx(math.sqrt(1.6))
    assert out["spearman"] == pytest.approx(0.8)


def test_count_errors_constant_input_gives_nan_rho() -> None:
    out = count_errors([2, 2, 2], [1, 2, 3])
    assert math.isnan(out["spearman"])
    assert out["mae"] == pytest.approx(2 / 3)  # |1| + |0| + |-1| = 2, over 3
    assert all(math.isnan(v) for v in count_errors([], []).values())


# ----------------------------------------------------------------------------- calibration


PROB = np.array([0.2, 0.4, 0.6, 0.9])
LABEL = np.array([0, 1, 1, 1])


def test_ece_by_hand() -> None:
    # 2 bins: [0, .5) holds 0.2, 0.4 -> mean prob 0.3, frac pos 0.5, gap 0.2
    #         [.5, 1] holds 0.6, 0.9 -> mean prob 0.75, frac pos 1.0, gap 0.25
    # ECE = 2/4 * 0.2 + 2/4 * 0.25 = 0.225
    assert expected_calibration_error(PROB, LABEL, n_bins=2) == pytest.approx(0.225)
    # 10 bins: one sample per bin, gaps |0.2-0|, |0.4-1|, |0.6-1|, |0.9-1| = .2, .6, .4, .1
    # ECE = (0.2 + 0.6 + 0.4 + 0.1) / 4 = 0.325
    assert expected_calibration_error(PROB, LABEL) == pytest.approx(0.325)
    # one bin: |mean prob - mean label| = |2.1/4 - 3/4| = |0.525 - 0.75| = 0.225
    assert expected_calibration_error(PROB, LABEL, n_bins=1) == pytest.approx(0.225)
    # perfectly calibrated: p = 1 in the closed last bin with label 1, p = 0 with label 0
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0


def test_reliability_curve_bins() -> None:
    c = reliability_curve(PROB, LABEL, n_bins=2)
    np.testing.assert_allclose(c.bin_edges, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(c.bin_centers, [0.25, 0.75])
    np.testing.assert_allclose(c.mean_prob, [0.3, 0.75])  # (0.2+0.4)/2, (0.6+0.9)/2
    np.testing.assert_allclose(c.frac_positive, [0.5, 1.0])  # 1/2, 2/2
    np.testing.assert_array_equal(c.counts, [2, 2])
    # 4 bins, both samples in bin 0 ([0, .25)): other bins empty -> nan / 0
    e = reliability_curve(np.array([0.1, 0.2]), np.array([0, 1]), n_bins=4)
    np.testing.assert_array_equal(e.counts, [2, 0, 0, 0])
    assert e.mean_prob[0] == pytest.approx(0.15)
    assert e.frac_positive[0] == pytest.approx(0.5)
    assert np.all(np.isnan(e.mean_prob[1:])) and np.all(np.isnan(e.frac_positive[1:]))
    with pytest.raises(ValueError):
        reliability_curve(np.array([1.2]), np.array([1]))
    with pytest.raises(ValueError):
        reliability_curve(np.array([0.5]), np.array([2]))


# ----------------------------------------------------------------------------- activity


def test_rank_auc_with_tie() -> None:
    score = np.array([0.1, 0.4, 0.4, 0.8])
    label = np.array([0, 0, 1, 1])
    # positive-negative pairs: (0.4 vs 0.1) = 1, (0.4 vs 0.4) = 0.5 (tie),
    # (0.8 vs 0.1) = 1, (0.8 vs 0.4) = 1 -> AUC = 3.5 / 4 = 0.875
    assert rank_auc(score, label) == pytest.approx(0.875)


def test_activity_metrics_by_hand() -> None:
    m = activity_metrics(PROB, LABEL, threshold=0.5)
    # thresholded: [0, 0, 1, 1] vs labels [0, 1, 1, 1] -> TP=2, TN=1, FP=0, FN=1
    assert m["accuracy"] == pytest.approx(0.75)  # (2 + 1) / 4
    assert m["sensitivity"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert m["specificity"] == pytest.approx(1.0)  # 1 / (1 + 0)
    # Brier = (0.2^2 + 0.6^2 + 0.4^2 + 0.1^2) / 4 = (0.04 + 0.36 + 0.16 + 0.01) / 4 = 0.1425
    assert m["brier"] == pytest.approx(0.1425)
    assert m["auc"] == pytest.approx(1.0)  # every positive (0.4, 0.6, 0.9) > the negative 0.2
    assert m["ece"] == pytest.approx(0.325)  # see test_ece_by_hand
    assert m["prevalence"] == pytest.approx(0.75)
    assert m["n"] == 4


def test_activity_metrics_without_positives() -> None:
    m = activity_metrics(np.array([0.1, 0.7]), np.array([0, 0]))
    assert math.isnan(m["auc"])  # AUC undefined with one class
    assert math.isnan(m["sensitivity"])  # no positives
    assert m["specificity"] == pytest.approx(0.5)  # 1 TN (0.1) / 2 negatives
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["brier"] == pytest.approx((0.01 + 0.49) / 2)
    assert math.isnan(rank_auc(np.array([0.3, 0.5]), np.array([1, 1])))


# ----------------------------------------------------------------------------- ranking


def test_ranking_agreement_two_of_three() -> None:
    pred = np.array(
        [
            [3.0, 2.0, 1.0],
            [1.0, 2.0, 3.0],
            [1.0, 2.0, 3.0],
        ]
    )
    truth = np.array(
        [
            # argmin pred = 2, true min 10 at index 2; identical order, tau = 1 -> agrees
            [30.0, 20.0, 10.0],
            # argmin pred = 0, true 10.5 <= 10 * 1.1 = 11; pairs (0,1) discordant,
            # (0,2), (1,2) concordant -> tau = (2 - 1) / 3 = 1/3 > 0 -> agrees
            [10.5, 10.0, 20.0],
            # argmin pred = 0, true 20 > 11 -> does not agree (tau = 1/3 as above)
            [20.0, 10.0, 30.0],
        ]
    )
    assert ranking_agreement(pred, truth) == pytest.approx(2 / 3)
    np.testing.assert_allclose(per_patient_kendall(pred, truth), [1.0, 1 / 3, 1 / 3])
    # rel_tol = 0: patient 2's pick (10.5) is no longer within tolerance -> 1/3
    assert ranking_agreement(pred, truth, rel_tol=0.0) == pytest.approx(1 / 3)
    # rel_tol = 1.0: 20 <= 10 * 2 -> all three agree
    assert ranking_agreement(pred, truth, rel_tol=1.0) == pytest.approx(1.0)


def test_ranking_agreement_needs_positive_tau() -> None:
    pred = np.array([[1.0, 40.0, 30.0, 20.0]])
    truth = np.array([[10.0, 10.5, 20.0, 30.0]])
    # best pick is right (index 0), but pairs (0,1), (0,2), (0,3) concordant and
    # (1,2), (1,3), (2,3) discordant -> tau = (3 - 3) / 6 = 0, not > 0 -> no agreement
    assert per_patient_kendall(pred, truth)[0] == pytest.approx(0.0)
    assert ranking_agreement(pred, truth) == 0.0


def test_per_patient_kendall_ties_and_nan() -> None:
    pred = np.array([[1.0, 1.0, 2.0], [5.0, 5.0, 5.0], [1.0, np.nan, 3.0]])
    truth = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 0.5]])
    tau = per_patient_kendall(pred, truth)
    # row 0: pair (0,1) tied in pred, (0,2), (1,2) concordant; tau-b = (2 - 0) /
    # sqrt((3 - 1) * (3 - 0)) = 2 / sqrt(6)
    assert tau[0] == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(tau[1])  # constant predicted row
    # row 2: therapy 1 dropped (nan); remaining pair (1 vs 3) against (1 vs 0.5): tau = -1
    assert tau[2] == pytest.approx(-1.0)
    # row 0 agrees (argmin index 0 has true 1 = min, tau > 0); row 1 (nan tau) and row 2
    # (non-finite value) do not -> 1/3
    assert ranking_agreement(pred, truth) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- effects


def test_average_effect_by_hand() -> None:
    counts = np.array([[4.0, 2.0, 1.0], [6.0, 2.0, 2.0]])
    out = average_effect(counts, ["placebo", "a", "b"])
    assert set(out) == {"a", "b"}
    # a: differences (2-4, 2-6) = (-2, -4), mean -3; 1 - mean(2, 2)/mean(4, 6) = 1 - 2/5 = 0.6
    assert out["a"]["mean_difference"] == pytest.approx(-3.0)
    assert out["a"]["relative_reduction"] == pytest.approx(0.6)
    # b: differences (1-4, 2-6) = (-3, -4), mean -3.5; 1 - 1.5/5 = 0.7
    assert out["b"]["mean_difference"] == pytest.approx(-3.5)
    assert out["b"]["relative_reduction"] == pytest.approx(0.7)


def test_average_effect_zero_reference_and_other_reference() -> None:
    counts = np.array([[0.0, 1.0], [0.0, 3.0]])
    out = average_effect(counts, ["placebo", "x"])
    assert out["x"]["mean_difference"] == pytest.approx(2.0)  # (1 + 3) / 2
    assert math.isnan(out["x"]["relative_reduction"])  # reference mean 0
    # x as reference: placebo - x = (-1, -3), mean -2; 1 - 0/2 = 1
    ref_x = average_effect(counts, ["placebo", "x"], reference="x")
    assert ref_x == {"placebo": {"mean_difference": -2.0, "relative_reduction": 1.0}}
    with pytest.raises(ValueError):
        average_effect(counts, ["a", "b"])


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_basic() -> None:
    values = np.array([1.0, 2.0, 3.0, 6.0])
    mean, lo, hi = bootstrap_ci(values)
    assert mean == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4
    assert 1.0 <= lo < mean < hi <= 6.0  # resampled means lie within [min, max]
    assert bootstrap_ci(values) == (mean, lo, hi)  # same seed, same interval
    # constant values: every resample mean is 2
    assert bootstrap_ci(np.array([2.0, 2.0, 2.0])) == (2.0, 2.0, 2.0)
    assert bootstrap_ci(np.array([5.0, np.nan])) == (5.0, 5.0, 5.0)  # nan dropped, n = 1
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([])))


def test_bootstrap_ci_narrows_with_more_data() -> None:
    rng = np.random.default_rng(42)
    small = rng.normal(0.3, 1.0, 20)
    large = rng.normal(0.3, 1.0, 2000)
    m_s, lo_s, hi_s = bootstrap_ci(small, n_boot=1000)
    m_l, lo_l, hi_l = bootstrap_ci(large, n_boot=1000)
    assert lo_s < m_s < hi_s and lo_l < m_l < hi_l
    # width ~ 2 * 1.96 * sd / sqrt(n): ~0.88 for n = 20, ~0.088 for n = 2000
    assert hi_l - lo_l < 0.25 * (hi_s - lo_s)
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * np.std(large) / math.sqrt(2000), rel=0.2)


# ----------------------------------------------------------------------------- plotting


def test_bootstrap_statistic_value_interval_and_seed() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.5 * y + rng.uniform(0, 0.6, 200), 0, 1)
    value, lo, hi = bootstrap_statistic(rank_auc, p, y, n_boot=500)
    assert value == rank_auc(p, y)
    assert lo < value < hi and hi - lo < 0.2
    assert bootstrap_statistic(rank_auc, p, y, n_boot=500) == (value, lo, hi)  # seeded
    assert bootstrap_statistic(rank_auc, p, y, n_boot=500, seed=1) != (value, lo, hi)


def test_bootstrap_statistic_undefined_statistic_gives_no_interval() -> None:
    value, lo, hi = bootstrap_statistic(rank_auc, np.array([0.2, 0.7]), np.array([1, 1]))
    assert all(math.isnan(x) for x in (value, lo, hi))  # AUC needs both outcomes
    with pytest.raises(ValueError):
        bootstrap_statistic(rank_auc, np.zeros(3), np.zeros(2))


def test_paired_bootstrap_is_narrower_than_either_methods_interval() -> None:
    """Two predictors that err on the same patients: their AUC difference is resolved by a
    paired resample although each AUC's own interval is wide."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    a = y * 0.3 + rng.normal(0, 0.3, 100)
    b = a + rng.normal(0, 0.05, 100)  # nearly the same forecasts
    _, lo_a, hi_a = bootstrap_statistic(rank_auc, a, y, n_boot=500)
    d, lo_d, hi_d = bootstrap_statistic(
        lambda pa, pb, yy: rank_auc(pa, yy) - rank_auc(pb, yy), a, b, y, n_boot=500
    )
    assert hi_d - lo_d < 0.5 * (hi_a - lo_a)
    assert lo_d <= d <= hi_d
    same, lo_s, hi_s = bootstrap_statistic(
        lambda pa, pb, yy: rank_auc(pa, yy) - rank_auc(pb, yy), a, a, y, n_boot=200
    )
    assert (same, lo_s, hi_s) == (0.0, 0.0, 0.0)


def test_plot_reliability_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    prob = rng.uniform(0, 1, 500)
    label = rng.uniform(0, 1, 500) < prob
    curve = reliability_curve(prob, label)
    out = plot_reliability(curve, tmp_path / "sub" / "reliability.png", "test reliability")
    assert out == tmp_path / "sub" / "reliability.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024
