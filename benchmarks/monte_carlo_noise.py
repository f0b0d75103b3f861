"""What the number of samples costs: metrics of an exact forecast scored through S draws.

A forecaster's expected count and probability of activity are means over S samples, so they
carry Monte Carlo noise that lowers count Spearman and activity AUC and raises ECE, however
good the forecast is. This script takes a reference whose forecasts are exact (by default
``image_evidence`` from an ``evaluate`` report), replaces each patient's expected count λ by
the mean of S Poisson(λ) draws and its probability of activity by the share of those draws
above zero, and scores them as ``evaluate`` does, repeated ``--repeats`` times per S. The
reference row is the exact forecast itself, measured in the same run.

    .venv/bin/python benchmarks/monte_carlo_noise.py docs/evaluation/report.json \
        [--method image_evidence] [--samples 8 16 32 64] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ms_forecast_node.forecast import metrics as M


def scores(count: np.ndarray, activity: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    act = M.activity_metrics(activity, (truth > 0).astype(float))
    return {
        "spearman": M.count_errors(count, truth)["spearman"],
        "auc": act["auc"],
        "ece": act["ece"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report", type=Path, help="an evaluate report.json (per-patient records)")
    parser.add_argument("--method", default="image_evidence")
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    patients = json.loads(args.report.read_text(encoding="utf-8"))["patients"]
    truth = np.array([float(p["count"]) for p in patients])
    lam = np.array([float(p[args.method]["count"]) for p in patients])
    exact = scores(lam, np.array([float(p[args.method]["activity"]) for p in patients]), truth)
    rng = np.random.default_rng(args.seed)
    rows: dict[str, dict[str, float]] = {"exact (reference)": exact}
    for s in args.samples:
        runs = []
        for _ in range(args.repeats):
            draws = rng.poisson(lam[:, None], size=(len(lam), s))
            runs.append(scores(draws.mean(axis=1), (draws > 0).mean(axis=1), truth))
        rows[f"{s} samples"] = {k: float(np.mean([r[k] for r in runs])) for k in exact}
    print(f"{args.method} on {len(patients)} patients of {args.report}, {args.repeats} repeats")
    print(f"{'':<20} {'Spearman':>9} {'AUC':>7} {'ECE':>7}   Δ against the exact forecast")
    for name, r in rows.items():
        delta = (
            ""
            if r is exact
            else "   "
            + "  ".join(f"{k} {r[k] - exact[k]:+.3f}" for k in ("spearman", "auc", "ece"))
        )
        print(f"{name:<20} {r['spearman']:9.3f} {r['auc']:7.3f} {r['ece']:7.3f}{delta}")


if __name__ == "__main__":
    main()
