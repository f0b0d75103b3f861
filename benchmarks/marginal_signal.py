"""Is the forecaster's patient-level signal in the network or lost in sampling?

For each held-out patient this reads the network's first-step marginal under the factual
therapy (the sum of its lesion-centre probabilities: the expected number of new lesions the
network believes in before any sampling) and scores it the way the evaluation scores the
sampled forecasts: Spearman against the realised count, against the true expected count and
against the image-visible activity ``z_visible`` (overall and within each therapy arm), and
the activity AUC and ECE of ``1 − exp(−marginal)`` (what the one-step sampler's share of
active samples tends to as the number of samples grows). With ``--report`` (an ``evaluate``
folder of the same model and cohort, with per-patient records) the sampled forecasts are
scored beside it.
One network pass per patient: minutes on a CPU.

    .venv/bin/python benchmarks/marginal_signal.py --cohort var/cohorts/heldout-s2000 \
        [--model PATH] [--limit 100] [--report var/eval-0.3.0] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tqdm import tqdm

from ms_forecast_node.forecast.checkpoint import load_model
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.data import load_examples
from ms_forecast_node.forecast.device import pick_device
from ms_forecast_node.forecast.metrics import expected_calibration_error
from ms_forecast_node.forecast.registry import default_entry
from ms_forecast_node.forecast.sampling import sample_masks
from ms_forecast_node.simulate.activity import rank_auc


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _scores(pred: np.ndarray, truth: dict[str, np.ndarray], arms: np.ndarray) -> dict[str, Any]:
    within = {
        arm: _spearman(pred[arms == arm], truth["z_visible"][arms == arm])
        for arm in sorted(set(arms))
    }
    return {
        "spearman_vs_realised_count": _spearman(pred, truth["count"]),
        "spearman_vs_expected_count": _spearman(pred, truth["expected"]),
        "spearman_vs_z_visible": _spearman(pred, truth["z_visible"]),
        "spearman_vs_z_visible_within_arm_mean": float(np.nanmean(list(within.values()))),
        "spearman_vs_z_visible_within_arm": within,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model_path = args.model or default_entry().file
    model = load_model(model_path, device=pick_device())
    examples = load_examples(args.cohort, model.config, limit=args.limit)
    probe = replace(SamplerConfig(), samples=1, chunk_size=1, method="ddim", steps=1)
    marginal = []
    for e in tqdm(examples, desc="first-step marginals", unit="patient"):
        out = np.zeros((1, *e.study.images.shape[1:]), dtype=np.float32)
        sample_masks(model, e.study, [e.therapy], e.horizon_weeks, probe, marginal_out=out)
        marginal.append(float(out.sum(dtype=np.float64)))
    m = np.asarray(marginal)
    truth = {
        "count": np.array([e.sidecar["truth"]["net2_count"][e.therapy] for e in examples], float),
        "expected": np.array(
            [e.sidecar["truth"]["expected_net2_count"][e.therapy] for e in examples], float
        ),
        "z_visible": np.array([e.sidecar["truth"]["z_visible"] for e in examples], float),
    }
    active = (truth["count"] > 0).astype(int)
    arms = np.array([e.therapy for e in examples])
    result: dict[str, Any] = {
        "model": str(model_path),
        "cohort": str(args.cohort),
        "n_patients": len(examples),
        "marginal": {
            "mean_expected_lesions": float(m.mean()),
            "activity_auc": rank_auc(1 - np.exp(-m), active),
            # What the one-step sampler's share of active samples tends to with many samples.
            "activity_ece": expected_calibration_error(1 - np.exp(-m), active),
            **_scores(m, truth, arms),
        },
        "oracle_expected_count": {
            "activity_auc": rank_auc(1 - np.exp(-truth["expected"]), active),
            "activity_ece": expected_calibration_error(1 - np.exp(-truth["expected"]), active),
            **_scores(truth["expected"], truth, arms),
        },
    }
    if args.report is not None:
        report = json.loads((args.report / "report.json").read_text())
        rows = {r["patient_id"]: r for r in report["patients"]}
        picked = [rows[e.patient_id]["diffusion"] for e in examples]
        sampled = np.array([p["count"] for p in picked])
        result["sampled"] = {
            "report": str(args.report),
            "mean_expected_lesions": float(sampled.mean()),
            "activity_auc": rank_auc(np.array([p["activity"] for p in picked]), active),
            "activity_ece": expected_calibration_error(
                np.array([p["activity"] for p in picked]), active
            ),
            **_scores(sampled, truth, arms),
        }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
