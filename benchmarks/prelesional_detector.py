"""What lesion F1 can a reader that *learns* to spot pre-lesional change reach, on each grid?

The evaluation's lesion F1 compares the forecast mask with the factual NET2 mask. The image
ceiling (``forecast/ceilings.py``) reaches about 0.46 by marking every visible pre-lesional
site perfectly; no image shows those sites perfectly. This benchmark measures how close the
site head's detector (``forecast/site_head.py``: blob responses and tissue context of FLAIR,
T1, T2 and PD in millimetres, a per-voxel MLP) gets on its own, on any grid:

* trained on half of the patients' visible pre-lesional sites (simulator lesion records) and
  applied to the other half (two folds, so every patient is scored once, by a detector that
  never saw it); the score threshold is the one with the best F1 on the training half;
* forecast mask: the components of the thresholded score, marked under the factual therapy
  when an event survives it with a population probability of at least 0.5 (the ceiling's
  rule), scored with ``metrics.lesion_detection`` against the factual NET2 mask, pooled over
  patients exactly as ``evaluate`` pools them.

Reference, measured on the same patients: the image ceiling's lesion F1.

    .venv/bin/python benchmarks/prelesional_detector.py --cohort var/cohorts/heldout-s2000 \
        --config configs/cpu-2mm-centres-v0.3.yaml --limit 40 --out FILE.json
    .venv/bin/python benchmarks/prelesional_detector.py --cohort var/cohorts/heldout-s2000-1mm \
        --config configs/gpu-1mm-centres.yaml --limit 40 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from ms_forecast_node.forecast.ceilings import (
    activity_parameters,
    event_survival,
    prelesional_detection_ceiling,
)
from ms_forecast_node.forecast.config import load_configs
from ms_forecast_node.forecast.data import Example, load_examples, read_cohort
from ms_forecast_node.forecast.metrics import LesionDetection, lesion_detection, pooled_detection
from ms_forecast_node.forecast.site_head import (
    SCORE_CLIP,
    SiteDetector,
    site_labels,
    train_detector,
)
from ms_forecast_node.simulate.activity import rank_auc

THRESHOLDS = np.arange(0.0, 30.0, 1.0)  # detector scores (log-odds, balanced training)
MIN_LESION_MM3 = 10.0  # smaller predicted components are dropped (about the 3 mm minimum lesion)


@torch.no_grad()
def scores_of(detector: SiteDetector, example: Example) -> np.ndarray:
    return detector.scores(torch.from_numpy(example.study.images[None]))[0, 0].numpy()


def forecast_mask(score: np.ndarray, marked: bool, threshold: float, min_voxels: int) -> np.ndarray:
    """The detector's lesions: components of ``score >= threshold`` of at least ``min_voxels``,
    when the factual therapy lets a pre-lesional event happen (else nothing)."""
    if not marked:
        return np.zeros(score.shape, dtype=bool)
    labels, n = ndimage.label(score >= threshold, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def pooled(
    examples: list[Example],
    scores: list[np.ndarray],
    marks: dict[str, bool],
    threshold: float,
    min_voxels: int,
) -> LesionDetection:
    return pooled_detection(
        lesion_detection(forecast_mask(s, marks[e.therapy], threshold, min_voxels), e.target)
        for e, s in zip(examples, scores, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="YAML with the model grid")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    config = replace(load_configs(args.config)[0], site_head=True)
    header, _ = read_cohort(args.cohort)
    params = activity_parameters(header)
    efficacy = {t["code"]: float(t["efficacy_net2"]) for t in header["therapies"]}
    marks = {t: event_survival(e, params) >= 0.5 for t, e in efficacy.items()}
    min_voxels = max(1, int(round(MIN_LESION_MM3 / config.spacing_mm**3)))
    examples = load_examples(args.cohort, config, cache=False, limit=args.limit)
    half = len(examples) // 2
    folds = [(examples[:half], examples[half:]), (examples[half:], examples[:half])]
    held_out: list[tuple[Example, np.ndarray, float]] = []
    fold_reports = []
    for index, (train, test) in enumerate(folds):
        torch.manual_seed(args.seed + index)
        detector = SiteDetector(config).eval()
        train_detector(detector, train, seed=args.seed + index)
        train_scores = [scores_of(detector, e) for e in train]
        f1 = {
            float(t): pooled(train, train_scores, marks, float(t), min_voxels).f1
            for t in THRESHOLDS
        }
        best = max(f1, key=lambda t: f1[t])
        test_scores = [scores_of(detector, e) for e in tqdm(test, desc="scoring", leave=False)]
        fold = pooled(test, test_scores, marks, best, min_voxels)
        fold_reports.append({"threshold": best, "train_f1": f1[best], "test_f1": fold.f1})
        held_out += [(e, s, best) for e, s in zip(test, test_scores, strict=True)]
    detection = pooled_detection(
        lesion_detection(forecast_mask(s, marks[e.therapy], t, min_voxels), e.target)
        for e, s, t in held_out
    )
    labels = [site_labels(e.sidecar, config) & (s > -SCORE_CLIP) for e, s, _ in held_out]
    reached = []  # (sites with a voxel at or above the threshold, sites), per patient
    for (_, s, t), lab in zip(held_out, labels, strict=True):
        site_ids, n_sites = ndimage.label(lab)
        reached.append((int(np.unique(site_ids[(s >= t) & lab]).size), int(n_sites)))
    inside = [s > -SCORE_CLIP for _, s, _ in held_out]
    ceiling = prelesional_detection_ceiling(
        [e.sidecar for e, _, _ in held_out], efficacy, params, 0.5
    )
    result = {
        "cohort": str(args.cohort),
        "grid_mm": config.spacing_mm,
        "n_patients": len(held_out),
        "n_visible_sites": sum(n for _, n in reached),
        "min_lesion_voxels": min_voxels,
        "detector": {
            "lesion_f1": detection.f1,
            "precision": detection.precision,
            "recall": detection.recall,
            "tp_truth": detection.tp_truth,
            "n_truth": detection.n_truth,
            "n_pred": detection.n_pred,
            "false_positives": detection.fp,
            "voxel_auc_site_vs_other_candidates": rank_auc(
                np.concatenate([s[m] for (_, s, _), m in zip(held_out, inside, strict=True)]),
                np.concatenate([lab[m] for lab, m in zip(labels, inside, strict=True)]).astype(
                    np.float64
                ),
            ),
            "sites_reached_at_tuned_threshold": sum(h for h, _ in reached)
            / max(sum(n for _, n in reached), 1),
            "folds": fold_reports,
        },
        "image_ceiling": {
            "lesion_f1": ceiling.f1,
            "precision": ceiling.precision,
            "recall": ceiling.recall,
            "n_truth": ceiling.n_truth,
            "n_pred": ceiling.n_pred,
        },
        "seconds": time.perf_counter() - started,
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
