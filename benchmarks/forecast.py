"""Forecast speed and sampler fidelity, on the same weights, in one run.

1. The few-step sampler the model was evaluated with (``models.json``; DDIM or
   DPM-Solver++(2M), or ``--method``/``--steps``) against the reference ancestral DDPM over all
   training steps, on held-out patients under their factual therapy: wall-time ratio, and
   per-patient deltas (few-step − DDPM) of voxel Dice, lesion F1 and the number of lesions per
   sample, with bootstrap 95 % CIs, and whether both CIs lie within ±0.02. The reference costs
   about a minute per sample on 2 cores, so this part can run alone (``--fidelity-only``) for
   hours: ``--state`` keeps every finished patient and a rerun resumes after them,
   ``--budget-minutes`` stops it cleanly, and ``--few-samples`` lets the cheap sampler draw
   many samples so that the deltas carry the reference's noise only. ``--without-heads``
   compares the samplers on the diffusion network alone: the post-hoc heads (site,
   prior activity, rate dispersion) were fitted on the first-step marginal and shift the logits
   at every step of a many-step sampler (``benchmarks/sampler_steps.py``).
2. The full forecast (6 therapies × 8 samples, one network pass each, default grid, the same
   sampler) with its stage timings and the peak resident memory of a fresh process; and the
   same at the model's evaluated number of samples (0.6.2: 64, drawn 8 per network pass), as
   the node runs it.
3. The share of compute saved by encoding each study once instead of at every network call.

    .venv/bin/python benchmarks/forecast.py --cohort var/cohorts/heldout-s2000 \
        [--model PATH] [--patients 3] [--samples 2] [--method dpmpp2m --steps 8]
    # the long, resumable sampler comparison (background; rerun the same line to resume)
    .venv/bin/python benchmarks/forecast.py --cohort var/cohorts/heldout-s2000-prior \
        --fidelity-only --patients 60 --samples 2 --few-samples 32 \
        --state var/bench/sampler-fidelity.json --budget-minutes 90 --out fidelity.json \
        [--without-heads]
    # on two cores: two processes (OMP_NUM_THREADS=1), --shard 0/2 and --shard 1/2, each its
    # own --state and --merge-state <the states finished so far> (else a shard redoes their
    # patients); then the line above with --merge-state <both shard states> --budget-minutes 0
    # writes the summary of all finished patients
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ms_forecast_node.forecast import metrics as M
from ms_forecast_node.forecast.checkpoint import load_model, sha256_of
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.data import Example, load_examples
from ms_forecast_node.forecast.device import autocast, pick_device, synchronize
from ms_forecast_node.forecast.model import NET2Forecaster
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


# Both CI bounds of the Dice and lesion-F1 deltas inside ±this: the acceptance of issue 3.
FIDELITY_TOLERANCE = 0.02


@dataclass(frozen=True)
class FidelityPlan:
    """How many samples each sampler draws per patient, and where rows accumulate.

    The few-step sampler is cheap, so it may draw many more samples than the reference: the
    per-patient delta of sample means is then dominated by the reference's own Monte Carlo
    error, and each patient's few-step side is nearly exact."""

    few_samples: int
    ddpm_samples: int
    state: Path | None  # JSON of finished patients; a rerun resumes after them
    budget_s: float | None  # start no patient that would end past this
    identity: dict[str, str]  # model, cohort, selection: a state file must match them
    # (k, n): this process takes patients i with i % n == k, so n processes (one core each,
    # each with its own --state) share one selection; their seeds stay those of a single run.
    shard: tuple[int, int] = (0, 1)
    merge: tuple[Path, ...] = ()  # other processes' state files, finished patients taken over


def _read_rows(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    state = json.loads(path.read_text())
    if state.get("header") != header:
        raise SystemExit(
            f"{path} was written for another run: {state.get('header')} != {header}; "
            "give another --state or delete it"
        )
    rows: list[dict[str, Any]] = state["rows"]
    return rows


def _load_state(plan: FidelityPlan, header: dict[str, Any]) -> list[dict[str, Any]]:
    """This run's finished patients: its own state, then those of the merged state files that
    it does not have yet (each file must have been written for the same run)."""
    rows = _read_rows(plan.state, header) if plan.state and plan.state.exists() else []
    done = {r["patient"] for r in rows}
    for other in plan.merge:
        for row in _read_rows(other, header):
            if row["patient"] not in done:
                rows.append(row)
                done.add(row["patient"])
    return rows


def parse_shard(text: str) -> tuple[int, int]:
    """``"k/n"`` → ``(k, n)`` with ``0 <= k < n``."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants k/n, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= k < n")
    return k, n


def _save_state(plan: FidelityPlan, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if plan.state is None:
        return
    plan.state.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    tmp.replace(plan.state)  # a kill leaves the previous, complete state


def sampler_fidelity(
    model: NET2Forecaster,
    examples: list[Example],
    few: SamplerConfig,
    ref: SamplerConfig,
    plan: FidelityPlan,
    device: torch.device,
) -> dict[str, Any]:
    """Few-step sampler against the DDPM reference, patient by patient (factual therapy).

    Patient ``i`` of the selection is sampled with seed ``11 + 1000·i`` by both samplers, so a
    resumed run reproduces the rows a single run would have written."""
    header = {
        **plan.identity,
        "few_step": f"{few.method}, {few.steps} steps, guidance {few.guidance_scale}",
        "reference": f"DDPM ancestral, {model.config.timesteps} steps",
        "few_step_samples": str(plan.few_samples),
        "ddpm_samples": str(plan.ddpm_samples),
    }
    rows = _load_state(plan, header)
    if plan.merge:
        _save_state(plan, header, rows)  # the merged state is the one to keep and resume
    done = {r["patient"] for r in rows}
    start = time.perf_counter()
    per_patient_s = 0.0
    k, n_shards = plan.shard
    todo = [
        (i, e) for i, e in enumerate(examples) if e.patient_id not in done and i % n_shards == k
    ]
    for n, (i, e) in enumerate(tqdm(todo, desc="sampler fidelity", unit="patient")):
        elapsed = time.perf_counter() - start
        if plan.budget_s is not None and rows and elapsed + per_patient_s > plan.budget_s:
            print(f"budget reached after {elapsed / 60:.1f} min", file=sys.stderr)
            break
        seed = 11 + 1000 * i
        a_cfg = replace(few, samples=plan.few_samples, chunk_size=8, seed=seed)
        b_cfg = replace(ref, samples=plan.ddpm_samples, chunk_size=8, seed=seed)
        if device.type == "cuda" and n == 0:  # warm-up of this process: cuDNN algorithms
            sample_masks(model, e.study, [e.therapy], e.horizon_weeks, a_cfg)
        synchronize(device)
        t0 = time.perf_counter()
        a, _ = sample_masks(model, e.study, [e.therapy], e.horizon_weeks, a_cfg)
        synchronize(device)
        few_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        b, _ = sample_masks(model, e.study, [e.therapy], e.horizon_weeks, b_cfg)
        synchronize(device)
        ref_s = time.perf_counter() - t0
        da, fa, ca = per_sample_scores(a[0], e.target, few.min_lesion_voxels)
        db, fb, cb = per_sample_scores(b[0], e.target, few.min_lesion_voxels)
        rows.append(
            {
                "patient": e.patient_id,
                "therapy": e.therapy,
                "seed": seed,
                "few_step_s_per_sample": few_s / plan.few_samples,
                "ddpm_s_per_sample": ref_s / plan.ddpm_samples,
                "dice_few_step": da,
                "dice_ddpm": db,
                "f1_few_step": fa,
                "f1_ddpm": fb,
                "lesions_per_sample_few_step": ca,
                "lesions_per_sample_ddpm": cb,
            }
        )
        _save_state(plan, header, rows)
        per_patient_s = few_s + ref_s
    # In selection order, so shards merged give the summary of one run (bootstrap included).
    rows.sort(key=lambda r: int(r["seed"]))
    return fidelity_summary(header, rows, machine(device))


def fidelity_summary(
    header: dict[str, Any], rows: list[dict[str, Any]], machine_text: str
) -> dict[str, Any]:
    """Deltas (few-step − DDPM) with bootstrap 95 % CIs over patients, and the verdict."""

    def delta(key: str) -> np.ndarray:
        return np.array([r[f"{key}_few_step"] - r[f"{key}_ddpm"] for r in rows])

    ci = {k: M.bootstrap_ci(delta(k)) for k in ("dice", "f1", "lesions_per_sample")}
    few_s = float(np.mean([r["few_step_s_per_sample"] for r in rows])) if rows else float("nan")
    ref_s = float(np.mean([r["ddpm_s_per_sample"] for r in rows])) if rows else float("nan")

    def within(key: str) -> bool:
        _, lo, hi = ci[key]
        return bool(lo >= -FIDELITY_TOLERANCE and hi <= FIDELITY_TOLERANCE)

    def covers_zero(key: str) -> bool:  # the weaker reading: no difference shows
        _, lo, hi = ci[key]
        return bool(lo <= 0.0 <= hi)

    return {
        **{
            k: header.get(k)
            for k in ("reference", "few_step", "few_step_samples", "ddpm_samples", "heads")
        },
        "patients": len(rows),
        "machine": machine_text,
        "ddpm_seconds_per_sample": round(ref_s, 2),
        "few_step_seconds_per_sample": round(few_s, 4),
        "speedup_vs_reference": round(ref_s / few_s, 1),
        "delta_dice_mean_ci95": [round(v, 4) for v in ci["dice"]],
        "delta_lesion_f1_mean_ci95": [round(v, 4) for v in ci["f1"]],
        "delta_lesions_per_sample_mean_ci95": [round(v, 3) for v in ci["lesions_per_sample"]],
        "tolerance": FIDELITY_TOLERANCE,
        "dice_within_tolerance": within("dice"),
        "lesion_f1_within_tolerance": within("f1"),
        "dice_ci_covers_zero": covers_zero("dice"),
        "lesion_f1_ci_covers_zero": covers_zero("f1"),
        "per_patient": rows,
    }


def emit(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")


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
    parser.add_argument(
        "--few-samples",
        type=int,
        default=None,
        help="few-step samples per patient (default: --samples); cheap, so more lowers noise",
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        help="JSON that keeps each finished patient of the sampler comparison; a rerun resumes",
    )
    parser.add_argument(
        "--budget-minutes", type=float, default=None, help="start no patient past this"
    )
    parser.add_argument(
        "--shard",
        type=parse_shard,
        default=(0, 1),
        metavar="K/N",
        help="take patients i with i %% N == K (one process per core, each its own --state)",
    )
    parser.add_argument(
        "--merge-state",
        type=Path,
        nargs="*",
        default=[],
        help="take over the finished patients of these state files (other shards)",
    )
    parser.add_argument(
        "--fidelity-only", action="store_true", help="only the few-step vs DDPM comparison"
    )
    parser.add_argument(
        "--without-heads",
        action="store_true",
        help="compare the samplers on the diffusion network alone (post-hoc heads off)",
    )
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
    few = replace(production, draws_per_pass=1)
    ref = replace(few, method="ddpm")
    fidelity = sampler_fidelity(
        model.without_heads() if args.without_heads else model,
        examples,
        few,
        ref,
        FidelityPlan(
            few_samples=args.few_samples or args.samples,
            ddpm_samples=args.samples,
            state=args.state,
            budget_s=None if args.budget_minutes is None else 60.0 * args.budget_minutes,
            shard=args.shard,
            merge=tuple(args.merge_state),
            identity={
                "model_sha256": sha256_of(model_path),
                "cohort": str(args.cohort),
                "patients_selected": "all" if args.all_patients else "with NET2",
                "heads": "off" if args.without_heads else "as shipped",
            },
        ),
        device,
    )
    fidelity["patients_selected"] = "all" if args.all_patients else "with NET2 under their therapy"
    if args.fidelity_only:
        emit(
            {"machine": machine(device), "model": str(model_path), "sampler_fidelity": fidelity},
            args.out,
        )
        return

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
        "sampler_fidelity": fidelity,
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
    emit(report, args.out)


if __name__ == "__main__":
    main()
