"""Simulator speed: one patient at 1 mm, and cohort throughput at the 2 mm model grid.

Reference measured in the same run: the patient warp done the textbook way with
``scipy.ndimage.map_coordinates`` (order 1), against the simulator's ``torch`` grid_sample warp.

    .venv/bin/python benchmarks/simulator.py [--patients 3] [--cohort 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from ms_forecast_node.anatomy.template import load_template_anatomy
from ms_forecast_node.simulate.cohort import simulate_cohort
from ms_forecast_node.simulate.config import SimulationConfig
from ms_forecast_node.simulate.deform import warp_anatomy
from ms_forecast_node.simulate.images import synthesize_visit
from ms_forecast_node.simulate.patient import design_patient, render_patient


def one_patient_1mm(seed: int, index: int) -> float:
    start = time.perf_counter()
    design = design_patient(seed, index, SimulationConfig(grid_spacing_mm=1.0))
    rendered = render_patient(design, 1.0)  # all seven therapies
    for visit in (0, 1):
        synthesize_visit(rendered, visit)  # FLAIR, T1, T2, PD
    return time.perf_counter() - start


def scipy_warp_reference(seed: int, index: int) -> tuple[float, float]:
    """Same warp with map_coordinates vs torch; returns (scipy s, torch s)."""
    anatomy = load_template_anatomy(1.0)
    design = design_patient(seed, index)
    start = time.perf_counter()
    warp_anatomy(anatomy, design.displacement_control_mm, design.atrophy_mm)
    torch_s = time.perf_counter() - start
    # Reference: identity + smooth displacement evaluated on the full grid, then order-1
    # map_coordinates per channel (the straightforward scipy implementation).
    start = time.perf_counter()
    shape = anatomy.grid.shape
    zoom = [s / c for s, c in zip(shape, design.displacement_control_mm.shape[1:], strict=True)]
    disp = np.stack([ndimage.zoom(c, zoom, order=1) for c in design.displacement_control_mm])
    coords = np.indices(shape, dtype=np.float32) + disp[:, : shape[0], : shape[1], : shape[2]]
    for channel in anatomy.channels().values():
        ndimage.map_coordinates(channel, coords, order=1, mode="nearest")
    scipy_s = time.perf_counter() - start
    return scipy_s, torch_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    t0 = time.perf_counter()
    load_template_anatomy(1.0)
    load_template_anatomy(2.0)
    template_s = time.perf_counter() - t0
    cold = one_patient_1mm(101, 0)
    warm = [one_patient_1mm(101, i) for i in range(1, args.patients + 1)]
    scipy_s, torch_s = scipy_warp_reference(101, 0)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        simulate_cohort(Path(tmp), args.cohort, 202, SimulationConfig(), args.workers, False)
        cohort_s = time.perf_counter() - start
    result = {
        "template_load_s": round(template_s, 2),
        "patient_1mm_first_s": round(cold, 2),
        "patient_1mm_steady_median_s": round(float(np.median(warm)), 2),
        "patient_1mm_budget_s": 10.0,
        "warp_reference": "scipy.ndimage.map_coordinates order 1, same channels, 1 mm",
        "warp_scipy_s": round(scipy_s, 2),
        "warp_torch_s": round(torch_s, 2),
        "warp_speedup_vs_reference": round(scipy_s / torch_s, 1),
        "cohort_2mm_patients": args.cohort,
        "cohort_2mm_workers": args.workers,
        "cohort_2mm_s_per_patient": round(cohort_s / args.cohort, 2),
        "cohort_500_extrapolated_min": round(cohort_s / args.cohort * 500 / 60, 1),
        "cohort_500_budget_min": 60,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
