"""Forecast speed and sampler fidelity, on the same weights, in one run.

1. The few-step sampler the model was evaluated with (``models.json``; DDIM or
   DPM-Solver++(2M), or ``--method``/``--steps``) against the reference ancestral DDPM over all
   training steps, on held-out patients under their factual therapy: wall-time ratio, and
   per-patient deltas (few-step − DDPM) of voxel Dice, lesion F1 and the number of lesions per
   sample, with bootstrap 95 % CIs.
2. The full forecast (6 therapies × 8 samples, one network pass each, default grid, the same
   sampler) with its stage timings and the peak resident memory of a fresh process; and the
   same at the model's evaluated number of samples (0.6.2: 64, drawn 8 per network pass), as
   the node runs it.
3. The share of compute saved by encoding each study once instead of at every network call.

    .venv/bin/python benchmarks/forecast.py --cohort var/cohorts/heldout-s2000 \
        [--model PATH] [--patients 3] [--samples 2] [--method dpmpp2m --steps 8]
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
from typing import Any

import numpy as np
import torch

from ms_forecast_node.forecast import metrics as M
from ms_forecast_node.forecast.checkpoint import load_model
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.data import load_examples
from ms_forecast_node.forecast.device import autocast, pick_device, synchronize
from ms_forecast_node.forecast.registry import default_entry, entry_for_weights, model_sampler
from ms_forecast_node.forecast.sampling import _components, forecast_study, sample_masks

SIX = [
    "glatiramer_acetate",
    "interferon_beta_1a_sc",
    "fingolimod",
    "dimethyl_fumarate",
    "natalizumab",
    "ocrelizumab",
]


def evaluated_sampler(model_path: Path, method: str | None, steps: int | None) -> SamplerConfig:
    """The sampler the model was evaluated with (samples included) when it is a registered
    model, else the defaults; ``method`` / ``steps`` override either."""
    return model_sampler(
        entry_for_weights(model_path), samples=None, seed=0, steps=steps, method=method
    )


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, bf16 autocast"
    return f"{torch.get_num_threads()} torch threads, device cpu"


def peak_rss_mb() -> float:
    """Peak resident memory of this process image. Linux's ``VmHWM`` starts afresh at exec;
    ``ru_maxrss`` keeps the peak of the forked parent's copy (here: the parent's whole
    held-out cohort), which inflated this number before it was read from ``VmHWM``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def full_forecast_child(model_path: str, cohort: str, cfg: SamplerConfig) -> None:
    """Run in a fresh process: one full forecast, print timings and peak memory as JSON. On a
    GPU a first, untimed forecast warms up the kernels (cuDNN picks its algorithms then)."""
    device = pick_device()
    model = load_model(Path(model_path), device=device)
    example = load_examples(Path(cohort), model.config, limit=1)[0]
    if device.type == "cuda":
        forecast_study(model, example.study, SIX, example.horizon_weeks, cfg)
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    result = forecast_study(model, example.study, SIX, example.horizon_weeks, cfg)
    synchronize(device)
    wall = time.perf_counter() - start
    out = {"wall_s": wall, "timings": result.timings_s, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out))


def per_sample_scores(
    masks: np.ndarray, truth: np.ndarray, min_voxels: int
) -> tuple[float, float, float]:
    dices = [M.dice(m, truth) for m in masks]
    f1s = [M.lesion_detection(m, truth).f1 for m in masks]
    counts = [_components(m, min_voxels)[1] for m in masks]
    return float(np.mean(dices)), float(np.mean(f1s)), float(np.mean(counts))


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
    parser.add_argument("--method", default=None, help="few-step sampler (default: evaluated)")
    parser.add_argument("--steps", type=int, default=None, help="its steps (default: evaluated)")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="samples per network call (full forecast)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-samples", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--child-draws", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_path = args.model or default_entry().file
    production = evaluated_sampler(model_path, args.method, args.steps)
    if args.chunk_size is not None:
        production = replace(production, chunk_size=args.chunk_size)
    if args.child:
        child_cfg = replace(production, samples=args.child_samples, draws_per_pass=args.child_draws)
        full_forecast_child(str(model_path), str(args.cohort), child_cfg)
        return
    device = pick_device()
    model = load_model(model_path, device=device)
    examples = load_examples(args.cohort, model.config)
    if not args.all_patients:
        # Patients with NET2 lesions under their therapy: on the others both samplers score an
        # empty truth, and their Dice/F1 deltas are zero by construction.
        examples = [e for e in examples if e.target.any()]
    examples = examples[: args.patients]
    # One draw per pass: the DDPM reference has no several-draws form, so both samplers pay
    # one network trajectory per sample here.
    few = replace(
        production, samples=args.samples, chunk_size=args.samples, seed=11, draws_per_pass=1
    )
    ref = replace(few, method="ddpm")
    rows: list[dict[str, Any]] = []
    few_s = ref_s = 0.0
    if device.type == "cuda" and examples:  # warm-up: cuDNN algorithm choice, allocations
        e = examples[0]
        sample_masks(model, e.study, [e.therapy], e.horizon_weeks, few)
    for e in examples:
        synchronize(device)
        t0 = time.perf_counter()
        a, _ = sample_masks(model, e.study, [e.therapy], e.horizon_weeks, few)
        synchronize(device)
        few_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        b, _ = sample_masks(model, e.study, [e.therapy], e.horizon_weeks, ref)
        synchronize(device)
        ref_s += time.perf_counter() - t0
        da, fa, ca = per_sample_scores(a[0], e.target, few.min_lesion_voxels)
        db, fb, cb = per_sample_scores(b[0], e.target, few.min_lesion_voxels)
        rows.append(
            {
                "patient": e.patient_id,
                "dice_few_step": da,
                "dice_ddpm": db,
                "f1_few_step": fa,
                "f1_ddpm": fb,
                "lesions_per_sample_few_step": ca,
                "lesions_per_sample_ddpm": cb,
            }
        )
    d_dice = np.array([r["dice_few_step"] - r["dice_ddpm"] for r in rows])
    d_f1 = np.array([r["f1_few_step"] - r["f1_ddpm"] for r in rows])
    d_count = np.array(
        [r["lesions_per_sample_few_step"] - r["lesions_per_sample_ddpm"] for r in rows]
    )

    # Encoding once vs at every call: time one encoder pass and one denoiser call.
    e = examples[0]
    images = torch.from_numpy(e.study.images[None]).float().to(device)
    flags = torch.from_numpy(e.study.flags[None]).float().to(device)
    cell = model.decoder.CELL if model.decoder is not None else 1
    x = torch.randn(8, 1, *(n // cell for n in e.study.images.shape[1:]), device=device)
    t_mid = torch.full((8,), model.config.timesteps // 2, device=device)
    th0 = torch.zeros(8, dtype=torch.long, device=device)
    hz = torch.full((8,), 48.0, device=device)
    repeats = 10 if device.type == "cuda" else 1
    with torch.no_grad(), autocast(device):
        enc = model.encoder(images, flags)  # warm-up
        model.denoiser(x, t_mid, th0, hz, enc)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            enc = model.encoder(images, flags)
        synchronize(device)
        enc_s = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.denoiser(x, t_mid, th0, hz, enc)
        synchronize(device)
        den_s = (time.perf_counter() - t0) / 8 / repeats
    cfg = replace(production, samples=8, draws_per_pass=1)
    calls = len(SIX) * cfg.samples * cfg.steps
    once = enc_s + calls * den_s
    every = calls * (enc_s + den_s)

    def run_child(samples: int, draws: int) -> dict[str, Any]:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--cohort",
                str(args.cohort),
                "--model",
                str(model_path),
                "--method",
                cfg.method,
                "--steps",
                str(cfg.steps),
                "--chunk-size",
                str(cfg.chunk_size),
                "--child",
                "--child-samples",
                str(samples),
                "--child-draws",
                str(draws),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
        return result

    def summary(full: dict[str, Any], samples: int, draws: int) -> dict[str, Any]:
        return {
            "therapies": len(SIX),
            "samples": samples,
            "draws_per_pass": draws,
            "network_passes_per_therapy": -(-samples // draws) * cfg.steps,
            "method": cfg.method,
            "steps": cfg.steps,
            "wall_s": round(full["wall_s"], 1),
            "stage_s": {k: round(v, 2) for k, v in full["timings"].items()},
            "peak_rss_mb": round(full["peak_rss_mb"]),
            "peak_gpu_mb": round(full["peak_gpu_mb"]) if "peak_gpu_mb" in full else None,
            "chunk_size": cfg.chunk_size,
            "budget_s": 180,
            "goal_s": 120,
            "budget_peak_mb": 4096,
        }

    full = run_child(8, 1)
    node_samples, node_draws = production.samples, production.draws_per_pass
    node_full = run_child(node_samples, node_draws)
    report = {
        "machine": machine(device),
        "grid": {
            "spacing_mm": model.config.spacing_mm,
            "crop_shape": list(model.config.crop_shape),
        },
        "model": str(model_path),
        "sampler_fidelity": {
            "reference": f"DDPM ancestral, {model.config.timesteps} steps",
            "few_step": f"{few.method}, {few.steps} steps",
            "patients": len(rows),
            "patients_selected": "all" if args.all_patients else "with NET2 under their therapy",
            "samples_per_patient": args.samples,
            "ddpm_seconds": round(ref_s, 1),
            "few_step_seconds": round(few_s, 2),
            "speedup_vs_reference": round(ref_s / few_s, 1),
            "delta_dice_mean_ci95": [round(v, 4) for v in M.bootstrap_ci(d_dice)],
            "delta_lesion_f1_mean_ci95": [round(v, 4) for v in M.bootstrap_ci(d_f1)],
            "delta_lesions_per_sample_mean_ci95": [round(v, 3) for v in M.bootstrap_ci(d_count)],
            "per_patient": rows,
        },
        "full_forecast_6x8": summary(full, 8, 1),
        # What the node runs by default: the model's evaluated samples and draws per pass.
        "full_forecast_node_default": summary(node_full, node_samples, node_draws),
        "encode_once": {
            "encoder_s": round(enc_s, 3),
            "denoiser_s_per_sample_step": round(den_s, 4),
            "network_calls": calls,
            "compute_share_saved": round(1 - once / every, 3),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
