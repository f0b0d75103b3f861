"""Does the forecaster find the sites where new lesions will appear?

The simulator plants a faint pre-lesional change at baseline at 60 % of the sites where a new
lesion will arise (docs/simulator.md); under placebo every one of them becomes a lesion. For
each held-out patient this reads the network's first-step marginal under placebo (the
probability of a lesion centre in every 8 mm cell) and compares the cells that hold a visible
pre-lesional site with every other brain cell: the cell-level AUC, the probabilities at the
sites, the share of sites above a few thresholds and the rank of each site among its
patient's cells. Lesion F1 of a forecast mask needs a site's probability to reach the mask
threshold, so this says how far the network is from a non-empty, correct mask.
One network pass per patient.

    .venv/bin/python benchmarks/prelesional_signal.py --cohort var/cohorts/heldout-s2000 \
        [--model PATH] [--limit 100] [--therapy placebo] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ms_forecast_node.forecast.checkpoint import load_model
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.data import brain_mask, load_examples, model_grid
from ms_forecast_node.forecast.device import pick_device
from ms_forecast_node.forecast.model import LesionDecoder
from ms_forecast_node.forecast.registry import default_entry
from ms_forecast_node.forecast.sampling import sample_masks
from ms_forecast_node.simulate.activity import rank_auc

THRESHOLDS = (0.5, 0.2, 0.1, 0.05)


def site_cells(sidecar: dict[str, Any], grid: Any, cell: int, shape: tuple[int, ...]) -> set:
    """Cells (k, j, i on the cell grid) of the patient's visible pre-lesional sites."""
    out = set()
    for lesion in sidecar.get("lesions", []):
        if lesion.get("kind") != "new" or not lesion.get("prodrome_visible"):
            continue
        ijk = grid.world_to_index(np.asarray(lesion["centroid_lps_mm"], float)[None])[0]
        kji = np.rint(ijk[::-1]).astype(int) // cell
        if np.all(kji >= 0) and np.all(kji < np.asarray(shape)):
            out.add(tuple(int(v) for v in kji))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--therapy", default="placebo")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model_path = args.model or default_entry().file
    model = load_model(model_path, device=pick_device())
    config = model.config
    if not config.centres:
        raise SystemExit("this probe reads lesion-centre models (diffusion_target: centres)")
    cell = LesionDecoder.CELL
    grid, _ = model_grid(config.spacing_mm, config.crop_shape)
    brain = brain_mask(config.spacing_mm, config.crop_shape)
    cells_shape = tuple(n // cell for n in brain.shape)
    brain_cells = (
        brain[: cells_shape[0] * cell, : cells_shape[1] * cell, : cells_shape[2] * cell]
        .reshape(cells_shape[0], cell, cells_shape[1], cell, cells_shape[2], cell)
        .any(axis=(1, 3, 5))
    )
    examples = load_examples(args.cohort, config, limit=args.limit)
    probe = replace(SamplerConfig(), samples=1, chunk_size=1, method="ddim", steps=1)
    site_p: list[float] = []
    site_rank: list[float] = []
    other_p: list[np.ndarray] = []
    expected: list[float] = []
    n_sites_total = 0
    for e in tqdm(examples, desc="first-step marginals", unit="patient"):
        out = np.zeros((1, *e.study.images.shape[1:]), dtype=np.float32)
        sample_masks(model, e.study, [args.therapy], e.horizon_weeks, probe, marginal_out=out)
        # The marginal is the centre probability spread over its cell: sum a cell back.
        p_cells = (
            out[0]
            .reshape(cells_shape[0], cell, cells_shape[1], cell, cells_shape[2], cell)
            .sum(axis=(1, 3, 5))
        )
        expected.append(float(p_cells.sum()))
        sites = site_cells(e.sidecar, grid, cell, cells_shape)
        n_sites_total += len(sites)
        is_site = np.zeros(cells_shape, dtype=bool)
        for s in sites:
            is_site[s] = True
        brain_p = p_cells[brain_cells]
        for s in sites:
            site_p.append(float(p_cells[s]))
            site_rank.append(float(np.mean(brain_p > p_cells[s])))
        other_p.append(p_cells[brain_cells & ~is_site])
    others = np.concatenate(other_p)
    sites_arr = np.asarray(site_p)
    labels = np.r_[np.ones(len(sites_arr)), np.zeros(len(others))]
    result: dict[str, Any] = {
        "model": str(model_path),
        "cohort": str(args.cohort),
        "therapy": args.therapy,
        "n_patients": len(examples),
        "n_visible_sites": int(n_sites_total),
        "cell_mm": cell * config.spacing_mm,
        "cell_auc_sites_vs_other_brain_cells": rank_auc(np.r_[sites_arr, others], labels),
        "site_probability_median": float(np.median(sites_arr)) if len(sites_arr) else None,
        "site_probability_mean": float(sites_arr.mean()) if len(sites_arr) else None,
        "other_cell_probability_mean": float(others.mean()),
        "other_cell_probability_p99": float(np.quantile(others, 0.99)),
        "site_share_at_or_above": {f"{t:g}": float(np.mean(sites_arr >= t)) for t in THRESHOLDS},
        "other_cells_at_or_above_per_patient": {
            f"{t:g}": float(np.sum(others >= t) / len(examples)) for t in THRESHOLDS
        },
        "site_share_in_top_1_percent_of_own_brain_cells": float(
            np.mean(np.asarray(site_rank) < 0.01)
        ),
        "mean_expected_lesions": float(np.mean(expected)),
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
