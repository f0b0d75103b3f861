"""Forecast speed and sampler fidelity, on the same weights, in one run.

1. Few-step DDIM against the reference ancestral DDPM over all training steps, on held-out
   patients under their factual therapy: wall-time ratio, and per-patient deltas (DDIM − DDPM)
   of voxel Dice and lesion F1 of the sample masks against the truth, with bootstrap 95 % CIs.
2. The full forecast (6 therapies × 8 samples, default grid) with its stage timings and the
   peak resident memory of a fresh process.
3. The share of compute saved by encoding each study once instead of at every network call.

    .venv/bin/python benchmarks/forecast.py --cohort var/cohorts/heldout-s2000 \
        [--model PATH] [--patients 3] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ms_forecast_node.forecast import metrics as M
from ms_forecast_node.forecast.checkpoint import load_model
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.data import load_examples
from ms_forecast_node.forecast.registry import default_entry
from ms_forecast_node.forecast.sampling import forecast_study, sample_masks

SIX = [
    "glatiramer_acetate",
    "interferon_beta_1a_sc",
    "fingolimod",
    "dimethyl_fumarate",
    "natalizumab",
    "ocrelizumab",
]


def full_forecast_child(model_path: str, cohort: str) -> None:
    """Run in a fresh process: one full forecast, print timings and peak RSS as JSON."""
    model = load_model(Path(model_path))
    example = load_examples(Path(cohort), model.config, limit=1)[0]
    cfg = SamplerConfig()
    start = time.perf_counter()
    result = forecast_study(model, example.study, SIX, example.horizon_weeks, cfg)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall_s": wall, "timings": result.timings_s, "peak_rss_mb": peak_kb / 1024}))


def per_sample_scores(masks: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    dices = [M.dice(m, truth) for m in masks]
    f1s = [M.lesion_detection(m, truth).f1 for m in masks]
    return float(np.mean(dices)), float(np.mean(f1s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument(
        "--all-patients",
        action="store_true",
        help="also use patients without NET2 under their therapy (Dice/F1 then say little)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_path = args.model or default_entry().file
    if args.child:
        full_forecast_child(str(model_path), str(args.cohort))
        return
    model = load_model(model_path)
    examples = load_examples(args.cohort, model.config)
    if not args.all_patients:
        # Patients with NET2 lesions under their therapy: on the others both samplers score an
        # empty truth, and their Dice/F1 deltas are zero by construction.
        examples = [e for e in examples if e.target.any()]
    examples = examples[: args.patients]
    few = SamplerConfig(samples=args.samples, chunk_size=args.samples, seed=11)
    ref = replace(few, method="ddpm")
    rows = []
    few_s = ref_s = 0.0
    for e in examples:
        t0 = time.perf_counter()
        a, _ = sample_masks(model, e.study, [e.therapy], e.horizon_weeks, few)
        few_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        b, _ = sample_masks(model, e.study, [e.therapy], e.horizon_weeks, ref)
        ref_s += time.perf_counter() - t0
        da, fa = per_sample_scores(a[0], e.target)
        db, fb = per_sample_scores(b[0], e.target)
        rows.append(
            {
                "patient": e.patient_id,
                "dice_ddim": da,
                "dice_ddpm": db,
                "f1_ddim": fa,
                "f1_ddpm": fb,
            }
        )
    d_dice = np.array([r["dice_ddim"] - r["dice_ddpm"] for r in rows])
    d_f1 = np.array([r["f1_ddim"] - r["f1_ddpm"] for r in rows])

    # Encoding once vs at every call: time one encoder pass and one denoiser call.
    e = examples[0]
    images = torch.from_numpy(e.study.images[None]).float()
    flags = torch.from_numpy(e.study.flags[None]).float()
    with torch.no_grad():
        t0 = time.perf_counter()
        enc = model.encoder(images, flags)
        enc_s = time.perf_counter() - t0
        x = torch.randn(8, 1, *e.study.images.shape[1:])
        t0 = time.perf_counter()
        model.denoiser(
            x, torch.full((8,), 500), torch.zeros(8, dtype=torch.long), torch.full((8,), 48.0), enc
        )
        den_s = (time.perf_counter() - t0) / 8
    cfg = SamplerConfig()
    calls = len(SIX) * cfg.samples * cfg.steps
    once = enc_s + calls * den_s
    every = calls * (enc_s + den_s)

    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--cohort",
            str(args.cohort),
            "--model",
            str(model_path),
            "--child",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    full = json.loads(child.stdout.strip().splitlines()[-1])
    report = {
        "machine": f"{torch.get_num_threads()} torch threads, device cpu",
        "model": str(model_path),
        "sampler_fidelity": {
            "reference": f"DDPM ancestral, {model.config.timesteps} steps",
            "few_step": f"DDIM, {few.steps} steps",
            "patients": len(rows),
            "patients_selected": "all" if args.all_patients else "with NET2 under their therapy",
            "samples_per_patient": args.samples,
            "ddpm_seconds": round(ref_s, 1),
            "ddim_seconds": round(few_s, 2),
            "speedup_vs_reference": round(ref_s / few_s, 1),
            "delta_dice_mean_ci95": [round(v, 4) for v in M.bootstrap_ci(d_dice)],
            "delta_lesion_f1_mean_ci95": [round(v, 4) for v in M.bootstrap_ci(d_f1)],
            "per_patient": rows,
        },
        "full_forecast_6x8": {
            "therapies": len(SIX),
            "samples": cfg.samples,
            "steps": cfg.steps,
            "wall_s": round(full["wall_s"], 1),
            "stage_s": {k: round(v, 2) for k, v in full["timings"].items()},
            "peak_rss_mb": round(full["peak_rss_mb"]),
            "budget_s": 180,
            "goal_s": 120,
            "budget_peak_mb": 4096,
        },
        "encode_once": {
            "encoder_s": round(enc_s, 3),
            "denoiser_s_per_sample_step": round(den_s, 4),
            "network_calls": calls,
            "compute_share_saved": round(1 - once / every, 3),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
