"""Preprocessing speed and the built-in lesion segmenter's accuracy on held-out simulated studies.

For each simulated two-visit study (seeds not used elsewhere), the current visit's 1 mm 3D FLAIR,
3D T1 and axial T2 go through :func:`preprocess` (registration, co-registration, resampling,
lesion mask). Reference measured in the same run: reading the same three series and resampling
them onto the model grid with the *known* head pose — what preprocessing would cost if
registration and segmentation were free. The segmenter is scored against the simulator's
lesion labels on the model grid (voxel Dice, lesion-level precision/recall/F1), for both visits.

    .venv/bin/python benchmarks/preprocess.py [--studies 5] [--first-seed 9001] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ms_forecast_node.forecast.data import model_grid
from ms_forecast_node.forecast.metrics import lesion_detection
from ms_forecast_node.image.preprocess import VisitSeries, preprocess
from ms_forecast_node.image.registration import resample
from ms_forecast_node.image.series import read_series
from ms_forecast_node.pipeline.visits import load_visits
from ms_forecast_node.simulate.cohort import load_nifti
from ms_forecast_node.simulate.protocols import MRSequence

CROP = (72, 88, 72)


def simulate(seed: int, out: Path) -> dict[str, Any]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ms_forecast_node",
            "simulate",
            "study",
            "--seed",
            str(seed),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return json.loads((out / "study.json").read_text())


def reference_cost(root: Path, manifest: dict[str, Any]) -> float:
    """Read FLAIR, T1, T2 and resample them with the true pose (no registration/segmentation)."""
    patient = json.loads(
        (root / "truth" / "patients" / manifest["patient_id"] / "patient.json").read_text()
    )
    pose = np.asarray(patient["transforms"]["visit_poses_lps"][1]) @ np.asarray(
        patient["transforms"]["head_affine_lps"]
    )
    transform = sitk.AffineTransform(pose[:3, :3].ravel().tolist(), pose[:3, 3].tolist())
    grid, _ = model_grid(2.0, CROP)
    start = time.perf_counter()
    for entry in manifest["visits"][1]["series"]:
        if entry["sequence"] in ("FLAIR", "T1", "T2"):
            series = read_series(sorted((root / entry["folder"]).glob("*")))
            resample(series.to_sitk(), grid, transform)
    return time.perf_counter() - start


def score(found: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    dice = 2.0 * float((found & truth).sum()) / max(int(found.sum() + truth.sum()), 1)
    det = lesion_detection(found, truth)
    return {"dice": dice, "precision": det.precision, "recall": det.recall, "f1": det.f1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=9001)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    grid, slices = model_grid(2.0, CROP)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.studies):
            seed = args.first_seed + n
            root = Path(tmp) / f"s{seed}"
            manifest = simulate(seed, root)
            visits = load_visits(root / "dicom")
            current = VisitSeries(
                visits.current.flair,
                {
                    s: v
                    for s, v in visits.current.others.items()
                    if s in (MRSequence.T1, MRSequence.T2)
                },
                None,
                visits.current.study_instance_uid,
                visits.current.study_date,
            )
            start = time.perf_counter()
            result = preprocess(current, grid)
            seconds = time.perf_counter() - start
            reference = reference_cost(root, manifest)
            truth_dir = root / "truth" / "patients" / manifest["patient_id"]
            follow = load_nifti(truth_dir / "followup" / "lesions.nii.gz")[0][slices] > 0
            row: dict[str, Any] = {
                "seed": seed,
                "preprocess_s": seconds,
                "reference_s": reference,
                "stages_s": result.timings_s,
                "head_dice": result.quality.head_dice,
                "followup": score(result.lesion_mask, follow),
            }
            if visits.prior is not None:
                with_prior = preprocess(visits.current, grid, prior=visits.prior)
                assert with_prior.prior is not None
                base = load_nifti(truth_dir / "baseline" / "lesions.nii.gz")[0][slices] > 0
                row["baseline"] = score(with_prior.prior.lesion_mask, base)
            rows.append(row)
            print(
                f"seed {seed}: preprocess {seconds:.1f} s (reference {reference:.1f} s, "
                f"ratio {seconds / reference:.1f}x); follow-up Dice {row['followup']['dice']:.2f} "
                f"F1 {row['followup'].get('f1', float('nan')):.2f}",
                flush=True,
            )
    times = [r["preprocess_s"] for r in rows]
    refs = [r["reference_s"] for r in rows]
    summary = {
        "studies": len(rows),
        "preprocess_s_median": statistics.median(times),
        "preprocess_s_max": max(times),
        "reference_s_median": statistics.median(refs),
        "ratio_to_reference": statistics.median(times) / statistics.median(refs),
        "segmenter": {
            visit: {
                k: float(np.mean([r[visit][k] for r in rows if visit in r]))
                for k in rows[0]["followup"]
            }
            for visit in ("followup", "baseline")
        },
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
