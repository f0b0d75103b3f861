"""Does the forecaster find the sites where new lesions will appear?

The simulator plants a faint pre-lesional change at baseline at 60 % of the sites where a new
lesion will arise (docs/simulator.md); under placebo every one of them becomes a lesion. For
each held-out patient this reads the network's first-step marginal under placebo (the
probability of a lesion centre in every 8 mm cell) and compares the cells that hold a visible
pre-lesional site with every other brain cell: the cell-level AUC, the probabilities at the
sites, the share of sites above a few thresholds and the rank of each site among its
patient's cells. Lesion F1 of a forecast mask needs a site's probability to reach the mask
threshold, so this says how far the network is from a non-empty, correct mask.

Reference, measured in the same run: a hand-made detector of the change itself, the FLAIR
minus its 7-voxel local median, outside the (dilated) current lesions, maximised per cell. It
says how visible the sites are on the model grid to a reader who knows what to look for.
One network pass per patient.

    .venv/bin/python benchmarks/prelesional_signal.py --cohort var/cohorts/heldout-s2000 \
        [--model PATH] [--limit 100] [--therapy placebo] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ms_forecast_node.forecast.anchoring import first_step_cell_probabilities
from ms_forecast_node.forecast.checkpoint import load_model
from ms_forecast_node.forecast.config import load_configs
from ms_forecast_node.forecast.data import brain_mask, load_examples, model_grid
from ms_forecast_node.forecast.device import pick_device
from ms_forecast_node.forecast.model import LesionDecoder, NET2Forecaster
from ms_forecast_node.forecast.registry import default_entry
from ms_forecast_node.simulate.activity import rank_auc

THRESHOLDS = (0.5, 0.2, 0.1, 0.05)
FLAIR, LESIONS = 0, 4  # channels of StudyTensors.images


def local_contrast(images: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The reference detector: FLAIR minus its 7-voxel local median, outside the current
    lesions (dilated by two voxels) and the brain; -inf there."""
    flair = images[FLAIR]
    excluded = ndimage.binary_dilation(images[LESIONS] > 0.5, iterations=2) | ~brain
    return np.where(excluded, -np.inf, flair - ndimage.median_filter(flair, size=7))


def to_cells(volume: np.ndarray, shape: tuple[int, ...], cell: int) -> np.ndarray:
    """The maximum of ``volume`` over each cell of ``cell``³ voxels."""
    blocks = volume[: shape[0] * cell, : shape[1] * cell, : shape[2] * cell].reshape(
        shape[0], cell, shape[1], cell, shape[2], cell
    )
    return blocks.max(axis=(1, 3, 5))


def _site_scores(
    score: np.ndarray, sites: set, brain_cells: np.ndarray
) -> tuple[list[float], list[float], np.ndarray]:
    is_site = np.zeros(brain_cells.shape, dtype=bool)
    for s in sites:
        is_site[s] = True
    brain_scores = score[brain_cells]
    values = [float(score[s]) for s in sites]
    ranks = [float(np.mean(brain_scores > v)) for v in values]
    return values, ranks, score[brain_cells & ~is_site]


def _detection(values: list[float], ranks: list[float], others: list[np.ndarray]) -> dict:
    sites_arr = np.asarray(values)
    rest = np.concatenate(others)
    labels = np.r_[np.ones(len(sites_arr)), np.zeros(len(rest))]
    finite = np.isfinite(np.r_[sites_arr, rest])
    scores = np.nan_to_num(np.r_[sites_arr, rest], neginf=-1e9)
    return {
        "cell_auc_sites_vs_other_brain_cells": rank_auc(scores, labels),
        "share_of_cells_scored": float(finite.mean()),
        "site_share_in_top_1_percent_of_own_brain_cells": float(np.mean(np.asarray(ranks) < 0.01)),
        "site_share_in_top_10_percent_of_own_brain_cells": float(np.mean(np.asarray(ranks) < 0.1)),
        "site_rank_median": float(np.median(ranks)),
    }


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
    parser.add_argument(
        "--reference-only",
        type=Path,
        default=None,
        metavar="CONFIG",
        help="no network: score only the reference detector on the grid of this YAML's model "
        "section (e.g. configs/gpu-1mm-centres.yaml on a cohort simulated at 1 mm), 8 mm cells",
    )
    args = parser.parse_args()
    model: NET2Forecaster | None = None
    if args.reference_only is not None:
        config = load_configs(args.reference_only)[0]
        model_path: Path | None = None
    else:
        model_path = args.model or default_entry().file
        model = load_model(model_path, device=pick_device())
        config = model.config
        if not config.centres:
            raise SystemExit("this probe reads lesion-centre models (diffusion_target: centres)")
    # 8 mm cells on any grid (the centre model's cells at 2 mm), so grids compare.
    cell = LesionDecoder.CELL if model is not None else int(round(8.0 / config.spacing_mm))
    grid, _ = model_grid(config.spacing_mm, config.crop_shape)
    brain = brain_mask(config.spacing_mm, config.crop_shape)
    cells_shape = tuple(n // cell for n in brain.shape)
    brain_cells = to_cells(brain, cells_shape, cell) > 0
    examples = load_examples(args.cohort, config, limit=args.limit)
    net: dict[str, list] = {"values": [], "ranks": [], "others": []}
    ref: dict[str, list] = {"values": [], "ranks": [], "others": []}
    expected: list[float] = []
    for e in tqdm(examples, desc="pre-lesional sites", unit="patient"):
        sites = site_cells(e.sidecar, grid, cell, cells_shape)
        contrast = to_cells(local_contrast(e.study.images, brain), cells_shape, cell)
        scored = [(ref, contrast)]
        if model is not None:
            p_cells = first_step_cell_probabilities(model, e, [args.therapy], samples=1)
            p_cells = p_cells[0].reshape(cells_shape)
            expected.append(float(p_cells.sum()))
            scored.append((net, p_cells))
        for store, score in scored:
            values, ranks, others = _site_scores(score, sites, brain_cells)
            store["values"] += values
            store["ranks"] += ranks
            store["others"].append(others)
    result: dict[str, Any] = {
        "model": str(model_path) if model_path else None,
        "cohort": str(args.cohort),
        "grid_mm": config.spacing_mm,
        "therapy": args.therapy,
        "n_patients": len(examples),
        "n_visible_sites": len(ref["values"]),
        "cell_mm": cell * config.spacing_mm,
        "reference_local_flair_contrast": _detection(ref["values"], ref["ranks"], ref["others"]),
    }
    if model is not None:
        site_p = np.asarray(net["values"])
        others = np.concatenate(net["others"])
        result["network_first_step_marginal"] = {
            **_detection(net["values"], net["ranks"], net["others"]),
            "site_probability_median": float(np.median(site_p)) if len(site_p) else None,
            "site_probability_mean": float(site_p.mean()) if len(site_p) else None,
            "other_cell_probability_mean": float(others.mean()),
            "other_cell_probability_p99": float(np.quantile(others, 0.99)),
            "site_share_at_or_above": {f"{t:g}": float(np.mean(site_p >= t)) for t in THRESHOLDS},
            "other_cells_at_or_above_per_patient": {
                f"{t:g}": float(np.sum(others >= t) / len(examples)) for t in THRESHOLDS
            },
            "mean_expected_lesions": float(np.mean(expected)),
        }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
