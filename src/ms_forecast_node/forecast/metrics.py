"""Evaluation metrics for treatment-conditioned NET2 forecasts.

Everything here is pure numpy/scipy (matplotlib only in :func:`plot_reliability`) and works on
plain arrays, so the same functions score voxel masks, per-patient counts, activity
probabilities and per-therapy rankings.

Conventions used throughout (each function's docstring repeats the ones it needs):

* masks are cast with ``astype(bool)`` (any non-zero voxel is foreground);
* binary labels must contain only 0/1 (or ``False``/``True``);
* probabilities must be finite and lie in ``[0, 1]``;
* undefined ratios are ``nan`` unless a function documents another value
  (e.g. :func:`dice` of two empty masks is 1.0).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage, stats

from ms_forecast_node.simulate.activity import rank_auc

__all__ = [
    "LesionDetection",
    "ReliabilityCurve",
    "activity_metrics",
    "average_effect",
    "bootstrap_ci",
    "bootstrap_statistic",
    "count_errors",
    "dice",
    "expected_calibration_error",
    "lesion_detection",
    "per_patient_kendall",
    "plot_reliability",
    "pooled_detection",
    "rank_auc",
    "ranking_agreement",
    "reliability_curve",
]


# --------------------------------------------------------------------------- helpers


def _as_mask_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred).astype(bool)
    t = np.asarray(truth).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    return p, t


def _as_prob_label(prob: npt.ArrayLike, label: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and validate probabilities (finite, in [0, 1]) and 0/1 labels."""
    p = np.asarray(prob, dtype=float).ravel()
    raw = np.asarray(label).ravel()
    if p.shape != raw.shape:
        raise ValueError(f"prob and label sizes differ: {p.size} vs {raw.size}")
    if not np.all(np.isfinite(p)) or np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("probabilities must be finite and within [0, 1]")
    if raw.dtype != bool and not np.all((raw == 0) | (raw == 1)):
        raise ValueError("labels must be binary (0/1 or bool)")
    return p, raw.astype(bool)


def _is_constant(x: np.ndarray) -> bool:
    return x.size == 0 or bool(np.all(x == x[0]))


def _safe_ratio(num: float, den: float) -> float:
    return float(num / den) if den != 0 else float("nan")


# --------------------------------------------------------------------------- voxel overlap


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Binary Dice coefficient ``2 |P ∩ T| / (|P| + |T|)``.

    Inputs are cast with ``astype(bool)`` and must have the same shape. When both masks are
    empty the denominator is 0; this case is defined as **1.0** (a correct "no new lesion"
    forecast). If only one mask is empty the Dice is 0.0.
    """
    p, t = _as_mask_pair(pred, truth)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return float(2.0 * int(np.logical_and(p, t).sum()) / denom)


# --------------------------------------------------------------------------- lesion detection


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise detection counts.

    ``tp_truth + fn == n_truth`` (truth lesions detected / missed) and
    ``tp_pred + fp == n_pred`` (predicted components that hit a truth lesion / hit none).
    """

    tp_truth: int
    fn: int
    tp_pred: int
    fp: int
    n_truth: int
    n_pred: int

    @property
    def precision(self) -> float:
        """``tp_pred / n_pred``; **1.0 when n_pred == 0** (no prediction, no false positive)."""
        return 1.0 if self.n_pred == 0 else self.tp_pred / self.n_pred

    @property
    def recall(self) -> float:
        """``tp_truth / n_truth``; **1.0 when n_truth == 0** (nothing to detect)."""
        return 1.0 if self.n_truth == 0 else self.tp_truth / self.n_truth

    @property
    def f1(self) -> float:
        """``2 P R / (P + R)`` from :attr:`precision` and :attr:`recall`; 0.0 when P + R == 0.

        With the conventions above, both-empty gives P = R = F1 = 1; predictions without any
        truth lesion give R = 1, P = 0, F1 = 0; missed lesions without predictions give
        P = 1, R = 0, F1 = 0.
        """
        p, r = self.precision, self.recall
        return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def _components(mask: np.ndarray, min_voxels: int) -> tuple[np.ndarray, int]:
    """Full-connectivity labels (26-connected in 3-D) with components < min_voxels removed.

    Returns ``(labels, n)`` with the kept components renumbered ``1..n`` and 0 elsewhere.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)  # 3x3x3 ones in 3-D
    labels, n = ndimage.label(mask, structure=structure)
    labels = np.asarray(labels)
    if n == 0:
        return labels, 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= max(int(min_voxels), 1)
    keep[0] = False
    new_id = np.zeros(n + 1, dtype=labels.dtype)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return new_id[labels], int(keep.sum())


def lesion_detection(
    pred: np.ndarray,
    truth: np.ndarray,
    min_voxels: int = 1,
    min_overlap_voxels: int = 1,
) -> LesionDetection:
    """Lesion-wise detection of connected components.

    Definitions:

    * components are found with :func:`scipy.ndimage.label` and full connectivity
      (a 3x3x3 structure of ones for 3-D masks, i.e. 26-connectivity);
    * components with fewer than ``min_voxels`` voxels are dropped on **both** sides, before
      any matching; their voxels then count as background (a predicted component that only
      touches a dropped truth speck is a false positive);
    * a truth lesion is detected (``tp_truth``) when at least ``min_overlap_voxels`` of its
      voxels lie inside the union of the kept predicted components; otherwise it is a
      false negative (``fn``);
    * a kept predicted component is a false positive (``fp``) when it overlaps no kept truth
      lesion at all (zero shared voxels); otherwise it counts as ``tp_pred``.

    Note that with ``min_overlap_voxels > 1`` the two sides are not symmetric: a predicted
    component sharing 1 to ``min_overlap_voxels - 1`` voxels with a lesion is not a false
    positive, while that lesion is still a false negative.
    """
    p, t = _as_mask_pair(pred, truth)
    pred_lab, n_pred = _components(p, min_voxels)
    truth_lab, n_truth = _components(t, min_voxels)

    pred_any = pred_lab > 0
    truth_any = truth_lab > 0
    # voxels of each truth lesion covered by any kept predicted component
    covered = np.bincount(truth_lab[pred_any].ravel(), minlength=n_truth + 1)[1:]
    tp_truth = int(np.sum(covered >= max(int(min_overlap_voxels), 1)))
    # voxels of each predicted component inside any kept truth lesion
    hit = np.bincount(pred_lab[truth_any].ravel(), minlength=n_pred + 1)[1:]
    tp_pred = int(np.sum(hit > 0))
    return LesionDetection(
        tp_truth=tp_truth,
        fn=n_truth - tp_truth,
        tp_pred=tp_pred,
        fp=n_pred - tp_pred,
        n_truth=n_truth,
        n_pred=n_pred,
    )


def pooled_detection(items: Iterable[LesionDetection]) -> LesionDetection:
    """Micro-average: the sum of every count over ``items`` (an empty iterable gives zeros)."""
    tp_truth = fn = tp_pred = fp = n_truth = n_pred = 0
    for d in items:
        tp_truth += d.tp_truth
        fn += d.fn
        tp_pred += d.tp_pred
        fp += d.fp
        n_truth += d.n_truth
        n_pred += d.n_pred
    return LesionDetection(tp_truth, fn, tp_pred, fp, n_truth, n_pred)


# --------------------------------------------------------------------------- counts


def count_errors(pred_counts: npt.ArrayLike, true_counts: npt.ArrayLike) -> dict[str, float]:
    """Errors of predicted lesion counts (flattened, same size).

    Returns

    * ``mae`` = mean |pred − true|,
    * ``rmse`` = sqrt(mean (pred − true)²),
    * ``bias`` = mean (pred − true) (positive: over-prediction),
    * ``spearman`` = Spearman rank correlation (:func:`scipy.stats.spearmanr`, average ranks
      for ties); ``nan`` when fewer than 2 values or when either input is constant.

    All values are ``nan`` for empty inputs.
    """
    p = np.asarray(pred_counts, dtype=float).ravel()
    t = np.asarray(true_counts, dtype=float).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred_counts and true_counts sizes differ: {p.size} vs {t.size}")
    nan = float("nan")
    if p.size == 0:
        return {"mae": nan, "rmse": nan, "bias": nan, "spearman": nan}
    diff = p - t
    if p.size < 2 or _is_constant(p) or _is_constant(t):
        rho = nan
    else:
        rho = float(stats.spearmanr(p, t).statistic)
    return {
        "mae": float(np.mean(np.abs(diff))),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "bias": float(np.mean(diff)),
        "spearman": rho,
    }


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityCurve:
    """Binned calibration data (``n_bins`` equal-width bins on [0, 1]).

    ``bin_edges`` has ``n_bins + 1`` entries; ``mean_prob`` and ``frac_positive`` are ``nan``
    for empty bins, whose ``counts`` are 0.
    """

    bin_edges: np.ndarray
    bin_centers: np.ndarray
    mean_prob: np.ndarray
    frac_positive: np.ndarray
    counts: np.ndarray

    @property
    def n(self) -> int:
        return int(self.counts.sum())


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """``min(floor(p * n_bins), n_bins - 1)``: bin ``i`` is ``[i/n_bins, (i+1)/n_bins)``.

    The last bin also holds ``p == 1``.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    return np.asarray(np.minimum(np.floor(p * n_bins).astype(int), n_bins - 1))


def reliability_curve(prob: np.ndarray, label: np.ndarray, n_bins: int = 10) -> ReliabilityCurve:
    """Reliability diagram data for binary events.

    Equal-width bins ``[i/n_bins, (i+1)/n_bins)`` (the last bin closed at 1). Per bin:
    ``counts`` = number of samples, ``mean_prob`` = mean predicted probability,
    ``frac_positive`` = mean label (observed frequency); ``nan`` for empty bins.
    """
    p, y = _as_prob_label(prob, label)
    idx = _bin_index(p, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.where(counts > 0, sum_p / np.maximum(counts, 1), np.nan)
        frac_pos = np.where(counts > 0, sum_y / np.maximum(counts, 1), np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return ReliabilityCurve(
        bin_edges=edges,
        bin_centers=0.5 * (edges[:-1] + edges[1:]),
        mean_prob=mean_prob,
        frac_positive=frac_pos,
        counts=counts.astype(int),
    )


def expected_calibration_error(prob: np.ndarray, label: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error with equal-width bins.

    ``ECE = sum_b (n_b / N) * |mean(prob in b) - mean(label in b)|`` over the non-empty bins
    of :func:`reliability_curve` (bins ``[i/n_bins, (i+1)/n_bins)``, last one closed at 1).
    ``nan`` for empty input.
    """
    curve = reliability_curve(prob, label, n_bins)
    n = curve.n
    if n == 0:
        return float("nan")
    full = curve.counts > 0
    gaps = np.abs(curve.mean_prob[full] - curve.frac_positive[full])
    return float(np.sum(curve.counts[full] / n * gaps))


def activity_metrics(
    prob: np.ndarray, label: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Metrics for "any NET2 lesion" probabilities against 0/1 outcomes.

    A sample is predicted active when ``prob >= threshold``. Returns

    * ``auc``: Mann–Whitney AUC with average ranks for ties
      (:func:`ms_forecast_node.simulate.activity.rank_auc`); ``nan`` without both classes;
    * ``accuracy``: share of correct thresholded predictions;
    * ``sensitivity``: TP / (TP + FN), ``nan`` without positives;
    * ``specificity``: TN / (TN + FP), ``nan`` without negatives;
    * ``brier``: mean (prob − label)²;
    * ``ece``: :func:`expected_calibration_error` with 10 bins;
    * ``prevalence``: mean label; ``n``: number of samples.

    Everything except ``n`` is ``nan`` for empty input.
    """
    p, y = _as_prob_label(prob, label)
    nan = float("nan")
    keys = ("auc", "accuracy", "sensitivity", "specificity", "brier", "ece", "prevalence")
    if p.size == 0:
        return {**dict.fromkeys(keys, nan), "n": 0.0}
    hat = p >= threshold
    tp = int(np.sum(hat & y))
    tn = int(np.sum(~hat & ~y))
    fp = int(np.sum(hat & ~y))
    fn = int(np.sum(~hat & y))
    return {
        "auc": rank_auc(p, y),
        "accuracy": (tp + tn) / p.size,
        "sensitivity": _safe_ratio(tp, tp + fn),
        "specificity": _safe_ratio(tn, tn + fp),
        "brier": float(np.mean((p - y.astype(float)) ** 2)),
        "ece": expected_calibration_error(p, y),
        "prevalence": float(np.mean(y)),
        "n": float(p.size),
    }


# --------------------------------------------------------------------------- therapy ranking


def _as_patient_matrix(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=float)
    t = np.asarray(truth, dtype=float)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(
            f"pred and truth must be (n_patients, n_therapies) arrays of one shape; "
            f"got {p.shape} and {t.shape}"
        )
    return p, t


def _kendall_row(p: np.ndarray, t: np.ndarray) -> float:
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    if p.size < 2 or _is_constant(p) or _is_constant(t):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.kendalltau(p, t).statistic)  # tau-b (scipy's default variant)


def per_patient_kendall(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Kendall tau-b between each patient's predicted and true per-therapy values.

    ``pred`` and ``truth`` are ``(n_patients, n_therapies)``. Per row, therapies where either
    value is non-finite are left out; the result is ``nan`` when fewer than 2 therapies remain
    or when either remaining row is constant (tau-b undefined). Shape ``(n_patients,)``.
    """
    p, t = _as_patient_matrix(pred, truth)
    return np.array([_kendall_row(p[i], t[i]) for i in range(p.shape[0])], dtype=float)


def ranking_agreement(pred: np.ndarray, truth: np.ndarray, rel_tol: float = 0.1) -> float:
    """Share of patients for whom the forecast ranks the therapies in agreement with the truth.

    ``pred`` and ``truth`` are ``(n_patients, n_therapies)`` predicted and true expected NET2
    counts. Patient *i* agrees when both hold:

    1. the therapy with the lowest predicted count (``argmin``, first index on ties) has a true
       count ``<= m + rel_tol * |m|`` where ``m`` is the patient's true minimum, i.e. it is
       among the therapies within ``rel_tol`` (relative) of the true best; and
    2. Kendall tau-b between the two rows (:func:`per_patient_kendall`) is ``> 0``
       (a ``nan`` tau, e.g. a constant predicted row, does not agree).

    Rows with any non-finite value never agree. ``nan`` when there are no patients.
    """
    p, t = _as_patient_matrix(pred, truth)
    if p.shape[0] == 0:
        return float("nan")
    tau = per_patient_kendall(p, t)
    agree = np.zeros(p.shape[0], dtype=bool)
    for i in range(p.shape[0]):
        if not (np.all(np.isfinite(p[i])) and np.all(np.isfinite(t[i]))):
            continue
        m = float(np.min(t[i]))
        best_ok = t[i, int(np.argmin(p[i]))] <= m + rel_tol * abs(m)
        agree[i] = bool(best_ok) and bool(tau[i] > 0)
    return float(np.mean(agree))


# --------------------------------------------------------------------------- effects


def average_effect(
    counts: np.ndarray, therapies: Sequence[str], reference: str = "placebo"
) -> dict[str, dict[str, float]]:
    """Average therapy effect against ``reference`` from ``(n_patients, n_therapies)`` counts.

    Column *k* of ``counts`` belongs to ``therapies[k]``. For every therapy other than the
    reference:

    * ``mean_difference`` = mean over patients of ``counts[:, k] - counts[:, ref]``
      (negative: fewer lesions than on the reference);
    * ``relative_reduction`` = ``1 - mean(counts[:, k]) / mean(counts[:, ref])``;
      ``nan`` when the reference mean is 0.

    The reference itself is not in the result. Empty ``counts`` (no patients) gives ``nan``.
    """
    c = np.asarray(counts, dtype=float)
    names = list(therapies)
    if c.ndim != 2 or c.shape[1] != len(names):
        raise ValueError(f"counts must be (n_patients, {len(names)}); got {c.shape}")
    if reference not in names:
        raise ValueError(f"reference {reference!r} not among therapies {names}")
    ref = names.index(reference)
    nan = float("nan")
    ref_mean = float(np.mean(c[:, ref])) if c.shape[0] else nan
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(names):
        if k == ref:
            continue
        if c.shape[0] == 0:
            out[name] = {"mean_difference": nan, "relative_reduction": nan}
            continue
        mean_k = float(np.mean(c[:, k]))
        out[name] = {
            "mean_difference": float(np.mean(c[:, k] - c[:, ref])),
            "relative_reduction": 1.0 - mean_k / ref_mean if ref_mean != 0 else nan,
        }
    return out


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap CI of the mean of (paired-difference) values.

    ``values`` are typically per-patient metric differences between two samplers on the same
    patients. Non-finite values are dropped first. Returns ``(mean, lo, hi)`` where ``lo`` and
    ``hi`` are the ``alpha/2`` and ``1 - alpha/2`` quantiles (numpy's default linear
    interpolation) of ``n_boot`` means of resamples drawn with replacement
    (``numpy.random.default_rng(seed)``). One value gives ``(v, v, v)``; none gives nan.
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        nan = float("nan")
        return nan, nan, nan
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    mean = float(np.mean(v))
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=float)
    chunk = max(1, min(n_boot, 4_000_000 // v.size))  # bound memory of the index matrix
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        means[start:stop] = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return mean, float(lo), float(hi)


def bootstrap_statistic(
    statistic: Callable[..., float],
    *columns: npt.ArrayLike,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A statistic of per-patient columns with a percentile bootstrap CI over patients.

    ``statistic(*columns)`` is evaluated on the data and on ``n_boot`` resamples of the rows
    (the same rows for every column, so paired statistics such as a difference of two methods'
    AUCs on the same patients keep their pairing). Resamples where the statistic is not finite
    (an AUC of a resample without both outcomes) are dropped. Returns ``(value, lo, hi)``;
    ``lo`` and ``hi`` are nan when fewer than half of the resamples give a finite value.
    """
    cols = [np.asarray(c) for c in columns]
    if not cols:
        raise ValueError("at least one column is needed")
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise ValueError("columns must have the same length")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    value = float(statistic(*cols)) if n else float("nan")
    nan = float("nan")
    if n == 0:
        return nan, nan, nan
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot, dtype=float)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant resamples: Spearman is nan, by design
            draws[b] = float(statistic(*(c[idx] for c in cols)))
    finite = draws[np.isfinite(draws)]
    if finite.size < n_boot / 2:
        return value, nan, nan
    lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return value, float(lo), float(hi)


# --------------------------------------------------------------------------- plotting


def plot_reliability(curve: ReliabilityCurve, path: Path, title: str) -> Path:
    """Write a reliability diagram (PNG or any format matplotlib infers from ``path``).

    Top panel: the diagonal (perfect calibration), observed frequency per bin as bars at the
    bin positions and as points at the bin's mean predicted probability. Bottom panel: number
    of samples per bin. Uses the Agg backend; the parent folder is created. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = float(np.diff(curve.bin_edges).mean()) if curve.bin_edges.size > 1 else 1.0
    full = curve.counts > 0

    fig, (ax, axh) = plt.subplots(
        2, 1, figsize=(5.0, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    try:
        ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
        ax.bar(
            curve.bin_centers[full],
            curve.frac_positive[full],
            width=width * 0.9,
            color="tab:blue",
            alpha=0.35,
            edgecolor="tab:blue",
            label="observed frequency",
        )
        ax.plot(
            curve.mean_prob[full],
            curve.frac_positive[full],
            "o-",
            color="tab:red",
            ms=4,
            label="bin mean prob. vs frequency",
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("observed frequency")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8)

        axh.bar(curve.bin_centers, curve.counts, width=width * 0.9, color="0.4")
        axh.set_xlabel("predicted probability")
        axh.set_ylabel("count")
        axh.set_xlim(0, 1)
        fig.text(0.99, 0.01, f"n = {curve.n}", ha="right", va="bottom", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
