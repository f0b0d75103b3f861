"""A simulated patient as a two-visit DICOM study tree, with its ground truth beside it.

Each visit is acquired in scanner space: the patient's template-aligned anatomy is moved by the
patient's head affine (rotation, scale, translation) and by a per-visit re-positioning, then
sampled on each protocol's acquisition grid (thick 2D slices integrate over their thickness),
and written with :mod:`ms_forecast_node.simulate.dicom_export`.

Output::

    OUT/
      study.json                      # manifest: UIDs, series, grids, transforms, truth summary
      dicom/<visit>/<NN>_<protocol>/IM*.dcm
      truth/                          # the same patient in the cohort layout (model grid)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.uid import generate_uid

from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.simulate.cohort import cohort_header, write_patient
from ms_forecast_node.simulate.dicom_export import StudyIdentity, acquisition_grid, write_mr_series
from ms_forecast_node.simulate.images import VISITS, visit_fractions, visit_rng
from ms_forecast_node.simulate.mri import acquire, clean_signal
from ms_forecast_node.simulate.patient import (
    BRAIN_CENTER_LPS,
    PatientDesign,
    RenderedPatient,
    render_patient,
)
from ms_forecast_node.simulate.protocols import AcquisitionProtocol, AcquisitionType, load_protocols

log = logging.getLogger(__name__)

DEFAULT_BASELINE_DATE = datetime.datetime(2024, 3, 5, 9, 30, 0)


def visit_transform(design: PatientDesign, visit: int) -> np.ndarray:
    """4x4 LPS: template-aligned patient space -> scanner space at ``visit``."""
    return design.visit_poses[visit] @ design.head_affine


def sample_on_grid(
    volume: np.ndarray, source: Grid, target: Grid, world_from_source: np.ndarray
) -> np.ndarray:
    """Trilinear sample of ``volume`` (on ``source``) at the voxels of ``target``.

    ``world_from_source`` maps ``source`` world coordinates into ``target`` world coordinates
    (the patient's position in the scanner).
    """
    # target index -> target world -> source world -> source index
    m = np.linalg.inv(source.affine) @ np.linalg.inv(world_from_source) @ target.affine
    nk, nj, ni = target.shape
    mt = torch.from_numpy(m.astype(np.float32))
    kk = torch.arange(nk, dtype=torch.float32).view(nk, 1, 1)
    jj = torch.arange(nj, dtype=torch.float32).view(1, nj, 1)
    ii = torch.arange(ni, dtype=torch.float32).view(1, 1, ni)
    sk, sj, si = source.shape
    coords = []
    for row, n in ((0, si), (1, sj), (2, sk)):
        c = mt[row, 0] * ii + mt[row, 1] * jj + mt[row, 2] * kk + mt[row, 3]
        coords.append((c / (n - 1) * 2.0 - 1.0).expand(nk, nj, ni))
    grid = torch.stack(coords, dim=-1)[None]
    src = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()


def acquire_series(
    signal: np.ndarray,
    rendered: RenderedPatient,
    protocol: AcquisitionProtocol,
    grid: Grid,
    transform: np.ndarray,
) -> np.ndarray:
    """Sample the clean signal on the acquisition grid, integrating over thick slices."""
    thickness = protocol.slice_thickness_mm
    if protocol.acquisition_type is AcquisitionType.TWO_D and thickness > 1.5:
        n_sub = int(round(thickness))
        normal = grid.affine[:3, 2] / np.linalg.norm(grid.affine[:3, 2])
        acc = np.zeros(grid.shape, dtype=np.float32)
        for offset in (np.arange(n_sub) + 0.5) / n_sub * thickness - thickness / 2:
            shifted = np.array(grid.affine)
            shifted[:3, 3] += normal * offset
            acc += sample_on_grid(signal, rendered.grid, Grid(grid.shape, shifted), transform)
        return acc / n_sub
    return sample_on_grid(signal, rendered.grid, grid, transform)


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["ms-forecast-node-sim", *map(str, parts)]))


def write_study(
    design: PatientDesign,
    out: Path,
    protocols: list[AcquisitionProtocol] | None = None,
    baseline_datetime: datetime.datetime = DEFAULT_BASELINE_DATE,
    write_truth: bool = True,
) -> dict[str, Any]:
    """Write both visits as DICOM plus the truth; return the manifest (also ``study.json``)."""
    protocols = protocols or load_protocols()
    rendered = render_patient(design, 1.0)
    out.mkdir(parents=True, exist_ok=True)
    birth_year = baseline_datetime.year - design.age_years
    manifest: dict[str, Any] = {
        "patient_id": design.patient_id,
        "seed": design.seed,
        "simulated": True,
        "factual_therapy": design.factual_therapy,
        "horizon_weeks": design.horizon_weeks,
        "visits": [],
    }
    for v, visit_name in enumerate(VISITS):
        when = baseline_datetime + datetime.timedelta(weeks=design.horizon_weeks * v)
        study_uid = _uid(design.seed, design.patient_id, visit_name, "study")
        identity = StudyIdentity(
            patient_name=f"SIM^{design.patient_id}",
            patient_id=design.patient_id,
            patient_birth_date=f"{birth_year:04d}0101",
            patient_sex=design.sex,
            study_instance_uid=study_uid,
            study_date=when.strftime("%Y%m%d"),
            study_time=when.strftime("%H%M%S"),
            accession_number=f"A{zlib.crc32(study_uid.encode()) % 10**9:09d}",
            study_id=str(v + 1),
        )
        frame_of_reference = _uid(design.seed, design.patient_id, visit_name, "for")
        transform = visit_transform(design, v)
        center = transform[:3, :3] @ BRAIN_CENTER_LPS + transform[:3, 3]
        fractions = visit_fractions(rendered, v)
        scanner = design.scanners[v]
        rng = visit_rng(rendered, v, purpose=1)
        series_info = []
        for n, protocol in enumerate(protocols):
            grid = acquisition_grid(
                protocol, (float(center[0]), float(center[1]), float(center[2]))
            )
            signal = clean_signal(protocol.sequence, fractions, scanner)
            sampled = acquire_series(signal, rendered, protocol, grid, transform)
            image = acquire(sampled, grid, scanner, rng)
            series_number = 100 * (n + 2)
            series_uid = _uid(design.seed, design.patient_id, visit_name, protocol.name)
            folder = out / "dicom" / visit_name / f"{n + 1:02d}_{protocol.name}"
            paths = write_mr_series(
                image,
                grid,
                protocol,
                identity,
                series_number=series_number,
                series_instance_uid=series_uid,
                frame_of_reference_uid=frame_of_reference,
                uid_prefix_seed=f"{design.seed}-{design.patient_id}",
                out_dir=folder,
                acquisition_datetime=when + datetime.timedelta(minutes=5 * n + 2),
            )
            series_info.append(
                {
                    "protocol": protocol.name,
                    "sequence": protocol.sequence.value,
                    "series_number": series_number,
                    "series_instance_uid": series_uid,
                    "folder": str(folder.relative_to(out)),
                    "n_files": len(paths),
                    "multiframe": protocol.multiframe,
                    "grid_shape_kji": list(grid.shape),
                    "grid_affine_lps": grid.affine.round(6).tolist(),
                }
            )
        manifest["visits"].append(
            {
                "visit": visit_name,
                "study_instance_uid": study_uid,
                "frame_of_reference_uid": frame_of_reference,
                "study_date": identity.study_date,
                "patient_to_scanner_lps": transform.round(6).tolist(),
                "series": series_info,
            }
        )
    if write_truth:
        model_rendered = render_patient(design)
        truth = out / "truth"
        (truth / "patients").mkdir(parents=True, exist_ok=True)
        sidecar = write_patient(model_rendered, truth / "patients" / design.patient_id, 0)
        header = cohort_header(design.seed, 1, design.config)
        header["patients"] = [
            {
                "patient_id": design.patient_id,
                "factual_therapy": design.factual_therapy,
                "net2_count_factual": sidecar["truth"]["net2_count"][design.factual_therapy],
            }
        ]
        (truth / "cohort.json").write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
        manifest["truth"] = {"cohort": "truth", "summary": sidecar["truth"]}
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "study.json")
    return manifest
