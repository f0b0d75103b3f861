"""Does the forecast keep its lesion count when the sampler takes more steps?

The ancestral sampler is exact for independent lesion centres at any step count
(``forecast/diffusion.py``), so a network whose clean-mask predictions agree across noise levels
gives the same expected number of lesions per sample with 1 step (the node's sampler, the
reference here) as with 3, 10 or 30. This script measures that ratio on held-out patients under
their factual therapy, twice on the same weights:

* ``network``: the diffusion network alone (trained weights and anchored therapy effects), the
  post-hoc heads off: the prior-activity head, the site head and the rate dispersion;
* ``shipped``: the model as the node runs it, heads on.

The heads were fitted on the network's first-step (pure-noise) marginal, and they add their logit
shift at every step. When the ratios of ``network`` stay near 1 and those of ``shipped`` fall,
the heads, not the network or the sampler, make many-step samplers (DDPM among them) disagree
with the one-step forecast.

    .venv/bin/python benchmarks/sampler_steps.py --cohort var/cohorts/heldout-s2000-prior \
        [--patients 10] [--samples 16] [--steps 1 3 10] [--out steps.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ms_forecast_node.forecast import metrics as M
from ms_forecast_node.forecast.checkpoint import load_model
from ms_forecast_node.forecast.data import load_examples
from ms_forecast_node.forecast.device import pick_device
from ms_forecast_node.forecast.registry import default_entry, entry_for_weights, model_sampler
from ms_forecast_node.forecast.sampling import _components, sample_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.steps[0] != 1:
        raise SystemExit("the first --steps is the reference and must be 1")
    model_path = args.model or default_entry().file
    device = pick_device()
    shipped = load_model(model_path, device=device)
    variants = {"network": shipped.without_heads(), "shipped": shipped}
    production = model_sampler(
        entry_for_weights(model_path), samples=None, seed=0, steps=None, method=None
    )
    examples = [e for e in load_examples(args.cohort, shipped.config) if e.target.any()]
    examples = examples[: args.patients]
    # counts[variant][steps] = per-patient mean lesions per sample
    counts: dict[str, dict[int, list[float]]] = {v: {s: [] for s in args.steps} for v in variants}
    jobs = [(i, e, v) for i, e in enumerate(examples) for v in variants]
    for i, e, v in tqdm(jobs, desc="patients × variants", unit="run"):
        for steps in args.steps:
            cfg = replace(
                production,
                method="ancestral",
                steps=steps,
                samples=args.samples,
                draws_per_pass=1,
                chunk_size=8,
                seed=7 + 1000 * i,
            )
            masks, _ = sample_masks(variants[v], e.study, [e.therapy], e.horizon_weeks, cfg)
            n = [_components(m, cfg.min_lesion_voxels)[1] for m in masks[0]]
            counts[v][steps].append(float(np.mean(n)))
    report: dict[str, Any] = {
        "model": str(model_path),
        "reference": "ancestral, 1 step (the node's sampler)",
        "patients": len(examples),
        "samples_per_patient": args.samples,
        "variants": {},
    }
    for v, by_steps in counts.items():
        ref = np.array(by_steps[1])
        rows = {}
        for steps, values in by_steps.items():
            x = np.array(values)
            rows[str(steps)] = {
                "lesions_per_sample": round(float(x.mean()), 3),
                # None when the 1-step samples hold no lesion at all (no ratio to take).
                "ratio_to_1_step": round(float(x.sum() / ref.sum()), 3) if ref.sum() else None,
                "delta_vs_1_step_mean_ci95": [round(d, 3) for d in M.bootstrap_ci(x - ref)],
            }
        report["variants"][v] = rows
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
