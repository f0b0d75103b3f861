"""How many solver steps does the forecast need? Lesions per sample of each few-step sampler
against the ancestral DDPM reference over all training steps, on the same weights, patients,
therapies and number of samples, and the network's own expected count (the sum of its
first-step lesion-centre marginal) as a second reference that costs no sampling.

A sampler that loses rare events forecasts too few lesions and too little activity. On a CPU
the reference costs minutes per patient; on a GPU seconds. Without DDPM in ``--samplers`` the
first sampler is the reference (``--samplers ancestral:1 ancestral:3 ancestral:10`` compares
step counts of the exact ancestral sampler against the node's one step, cheaply).

``--without-heads`` runs the diffusion network alone (``NET2Forecaster.without_heads``). The
post-hoc heads (site, prior activity, rate dispersion) were fitted on the first-step marginal
and add their logit shift at every step; running both ways tells what the heads change.

    .venv/bin/python benchmarks/sampler_steps.py --cohort var/cohorts/heldout-s2000 \
        [--model PATH] [--patients 16] [--samples 32] \
        [--samplers ddpm:1000 dpmpp2m:6 ancestral:8 ddim:25] [--without-heads] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ms_forecast_node.forecast import metrics as M
from ms_forecast_node.forecast.checkpoint import load_model
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.data import load_examples
from ms_forecast_node.forecast.device import pick_device, synchronize
from ms_forecast_node.forecast.registry import default_entry
from ms_forecast_node.forecast.sampling import _components, sample_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=["ddpm:1000", "dpmpp2m:6", "dpmpp2m:10", "dpmpp2m:16", "dpmpp2m:25", "ddim:25"],
    )
    parser.add_argument("--without-heads", action="store_true", help="post-hoc heads off")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = pick_device()
    model_path = args.model or default_entry().file
    model = load_model(model_path, device=device)
    if args.without_heads:
        model = model.without_heads()
    examples = [e for e in load_examples(args.cohort, model.config) if e.target.any()]
    examples = examples[: args.patients]
    base = SamplerConfig(samples=args.samples, chunk_size=args.samples, seed=11)
    report: dict[str, object] = {
        "model": str(model_path),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "patients": len(examples),
        "samples_per_patient": args.samples,
        "heads": "off" if args.without_heads else "as shipped",
        "samplers": {},
    }
    marginal_counts = []
    for e in examples:
        marginal = np.zeros((1, *e.study.images.shape[1:]), dtype=np.float32)
        sample_masks(
            model,
            e.study,
            [e.therapy],
            e.horizon_weeks,
            replace(base, samples=4, chunk_size=4, method="ddim", steps=2),
            marginal_out=marginal,
        )
        marginal_counts.append(float(marginal.sum(dtype=np.float64)))
    report["expected_lesions_from_marginal"] = float(np.mean(marginal_counts))
    per_sampler: dict[str, list[float]] = {}
    for spec in args.samplers:
        method, steps = spec.split(":")
        cfg = replace(base, method=method, steps=int(steps))
        counts, seconds, rows = [], 0.0, []
        for e in examples:
            synchronize(device)
            t0 = time.perf_counter()
            masks, _ = sample_masks(model, e.study, [e.therapy], e.horizon_weeks, cfg)
            synchronize(device)
            seconds += time.perf_counter() - t0
            counts.append(
                float(np.mean([_components(m, cfg.min_lesion_voxels)[1] for m in masks[0]]))
            )
            rows.append(
                {
                    "patient": e.patient_id,
                    "lesions_per_sample": counts[-1],
                    "dice": float(np.mean([M.dice(m, e.target) for m in masks[0]])),
                    "lesion_f1": float(
                        np.mean([M.lesion_detection(m, e.target).f1 for m in masks[0]])
                    ),
                }
            )
        per_sampler[spec] = counts
        report["samplers"][spec] = {  # type: ignore[index]
            "lesions_per_sample": float(np.mean(counts)),
            "seconds": round(seconds, 2),
            "per_patient": rows,
        }
        print(spec, float(np.mean(counts)), round(seconds, 1), flush=True)
    reference = next((k for k in per_sampler if k.startswith("ddpm")), args.samplers[0])
    report["reference"] = reference
    ref = np.asarray(per_sampler[reference])
    for spec, counts in per_sampler.items():
        delta = np.asarray(counts) - ref
        entry = report["samplers"][spec]  # type: ignore[index]
        entry["delta_vs_reference_mean_ci95"] = [round(v, 3) for v in M.bootstrap_ci(delta)]
        # None when the reference's samples hold no lesion at all.
        entry["ratio_vs_reference"] = (
            round(float(np.mean(counts) / ref.mean()), 3) if ref.mean() > 0 else None
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
