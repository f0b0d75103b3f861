"""Summary statistics of a simulated cohort: what the docs quote and the tests check.

Includes the calibration check of the issue: the AUC of "any NET2 lesion under the factual
therapy" for the oracle (the true expected count) and for a predictor restricted to what the
baseline images show (lesion load, number of young lesions) plus the therapy's trial efficacy,
fitted by logistic regression with 5-fold cross-validation.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ms_forecast_node.simulate.activity import rank_auc
from ms_forecast_node.simulate.cohort import read_cohort


def _logistic_cv_scores(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities of an L2-regularised logistic regression (Newton steps)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    scores = np.zeros(len(y))
    xs = (x - x.mean(0)) / np.maximum(x.std(0), 1e-9)
    xs = np.hstack([np.ones((len(y), 1)), xs])
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        w = np.zeros(xs.shape[1])
        for _ in range(30):
            p = 1.0 / (1.0 + np.exp(-xs[train] @ w))
            grad = xs[train].T @ (p - y[train]) + 1e-2 * w
            hess = (xs[train].T * (p * (1 - p))) @ xs[train] + 1e-2 * np.eye(len(w))
            w -= np.linalg.solve(hess, grad)
        scores[test] = 1.0 / (1.0 + np.exp(-xs[test] @ w))
    return scores


def cohort_statistics(folder: Path) -> dict[str, Any]:
    header, patients = read_cohort(folder)
    codes = [t["code"] for t in header["therapies"]]
    efficacy = {t["code"]: t["efficacy_net2"] for t in header["therapies"]}
    counts = {c: np.array([p.sidecar["truth"]["net2_count"][c] for p in patients]) for c in codes}
    expected = {
        c: np.array([p.sidecar["truth"]["expected_net2_count"][c] for p in patients]) for c in codes
    }
    factual = [p.sidecar["factual_therapy"] for p in patients]
    y = np.array(
        [p.sidecar["truth"]["net2_count"][f] > 0 for p, f in zip(patients, factual, strict=True)]
    )
    oracle = np.array(
        [
            p.sidecar["truth"]["expected_net2_count"][f]
            for p, f in zip(patients, factual, strict=True)
        ]
    )
    load = np.array([p.sidecar["truth"]["baseline_lesion_volume_ml"] for p in patients])
    young = np.array([p.sidecar["truth"]["young_lesion_count"] for p in patients])
    n_lesions = np.array([p.sidecar["truth"]["baseline_lesion_count"] for p in patients])
    therapy_term = np.array([np.log(1.0 - efficacy[f] + 1e-6) for f in factual])
    features = np.stack([np.log(load + 0.1), np.log1p(young), therapy_term], axis=1)
    image_scores = _logistic_cv_scores(features, y.astype(float)) if 0 < y.sum() < len(y) else None
    locations = Counter(
        les["location"]
        for p in patients
        for les in p.sidecar["lesions"]
        if les["kind"] == "baseline"
    )
    total_locations = sum(locations.values())
    placebo_mean = float(counts["placebo"].mean())
    return {
        "n_patients": len(patients),
        "grid_spacing_mm": header["grid"]["spacing_mm"],
        "horizon_weeks": header["horizon_weeks"],
        "per_therapy": {
            c: {
                "trial_efficacy": efficacy[c],
                "mean_net2_count": round(float(counts[c].mean()), 3),
                "mean_expected_count": round(float(expected[c].mean()), 3),
                "share_active": round(float((counts[c] > 0).mean()), 3),
                "realised_reduction_vs_placebo": round(
                    1 - float(counts[c].mean()) / placebo_mean, 3
                )
                if placebo_mean > 0
                else None,
            }
            for c in codes
        },
        "factual_activity": {
            "share_active": round(float(y.mean()), 3),
            "oracle_auc": round(rank_auc(oracle, y), 3),
            "image_feature_auc_cv": None
            if image_scores is None
            else round(rank_auc(image_scores, y), 3),
        },
        "baseline": {
            "lesion_volume_ml_quantiles_5_25_50_75_95": [
                round(float(v), 2) for v in np.percentile(load, [5, 25, 50, 75, 95])
            ],
            "lesion_count_quantiles_5_50_95": [
                int(v) for v in np.percentile(n_lesions, [5, 50, 95])
            ],
            "location_shares": {
                str(k): round(v / total_locations, 3) for k, v in sorted(locations.items(), key=str)
            },
        },
    }
