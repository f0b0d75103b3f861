"""Output building speed: all objects for every therapy on a 1 mm 3D FLAIR reference.

The reference series is the simulated study's 3D sagittal FLAIR (one Enhanced MR object,
176 frames of 256 x 240). The forecasts are the synthetic test-fixture masks of
``tests/report_fixtures.py`` (planted spheres, one therapy empty); building cost does not
depend on where the masks came from. Objects: the template's default set (SEG, SR,
comparison SR, key images, PDF) for placebo + the six active therapies. The issue's budget is
10 s for six therapies; this builds seven.

Reference measured in the same run: deep-copying the reference series' datasets (pixel data
included) and writing them to disk, i.e. what re-sending the input series would cost.

    .venv/bin/python benchmarks/outputs.py [--study DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the synthetic forecasts live with the tests
    sys.path.insert(0, str(ROOT))

from tests.report_fixtures import FLAIR_FOLDER, make_report_input, read_reference  # noqa: E402

from ms_forecast_node.report.build import build_outputs, write_outputs  # noqa: E402
from ms_forecast_node.report.templates import load_templates  # noqa: E402

BUDGET_S = 10.0


def simulate(out: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ms_forecast_node",
            "simulate",
            "study",
            "--seed",
            "1",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def copy_and_write_reference(files: list[Path], out: Path) -> float:
    datasets = [pydicom.dcmread(f) for f in files]
    start = time.perf_counter()
    for i, ds in enumerate(datasets):
        copy.deepcopy(ds).save_as(out / f"ref_{i:04d}.dcm")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--study", type=Path, help="simulated study (default: simulate seed 1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        study = args.study or simulate(Path(tmp) / "study")
        folder = study / FLAIR_FOLDER
        reference = read_reference(folder)
        report_input = make_report_input(reference)
        templates = load_templates()
        runs = []
        for i in range(args.repeats):
            out = Path(tmp) / f"out_{i}"
            start = time.perf_counter()
            objects = build_outputs(report_input, templates)
            built = time.perf_counter()
            write_outputs(objects, out)
            runs.append((built - start, time.perf_counter() - built, len(objects)))
        ref_dir = Path(tmp) / "reference_copy"
        ref_dir.mkdir()
        files = sorted(p for p in folder.iterdir() if p.is_file())
        reference_s = copy_and_write_reference(files, ref_dir)

    totals = [b + w for b, w, _ in runs]
    steady = statistics.median(totals[1:]) if len(totals) > 1 else totals[0]
    result = {
        "reference_series": f"3D FLAIR {reference.grid.shape} (K, rows, cols), "
        f"{'Enhanced MR multi-frame' if reference.is_multiframe else 'classic'}",
        "therapies": len(report_input.native),
        "objects": runs[0][2],
        "first_build_s": round(runs[0][0], 2),
        "first_write_s": round(runs[0][1], 2),
        "first_total_s": round(totals[0], 2),
        "steady_total_median_s": round(steady, 2),
        "budget_s": BUDGET_S,
        "within_budget": totals[0] <= BUDGET_S,
        "reference": "deep-copy + write of the reference series' datasets (pixel data included)",
        "reference_s": round(reference_s, 3),
        "ratio_first_total_to_reference": round(totals[0] / reference_s, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
