"""The cohort layout: write simulated cohorts, and read any cohort (simulated or real).

Layout (format ``ms-forecast-cohort`` version 1; documented in docs/cohort-format.md)::

    COHORT/
      cohort.json                       # format, grid, therapies, definitions, patient index
      patients/<PATIENT_ID>/
        patient.json                    # sidecar: therapy, horizon, truth, per-lesion table
        baseline/{flair,t1,t2,pd}.nii.gz
        baseline/lesions.nii.gz         # int16 lesion labels (ids match patient.json)
        followup/{flair,t1,t2,pd}.nii.gz  # under the factual therapy
        followup/lesions.nii.gz
        prior/{flair,lesions}.nii.gz    # optional: the visit before baseline (temporal context)
        net2/<therapy>.nii.gz           # uint8 NET2 mask per therapy (real data: factual)

Images are on one grid per cohort (template-aligned, RAS affine in each NIfTI); each patient's
``patient.json`` is written last and atomically, so a folder with a ``patient.json`` is complete
and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ms_forecast_node import __version__
from ms_forecast_node.anatomy.template import load_template_anatomy
from ms_forecast_node.errors import CohortFormatError
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.simulate.config import SimulationConfig
from ms_forecast_node.simulate.images import PRIOR_VISIT, VISITS, synthesize_visit
from ms_forecast_node.simulate.patient import RenderedPatient, design_patient, render_patient
from ms_forecast_node.simulate.protocols import MRSequence
from ms_forecast_node.simulate.therapies import load_therapies

log = logging.getLogger(__name__)

FORMAT_NAME = "ms-forecast-cohort"
FORMAT_VERSION = 1
SEQUENCE_FILES = {seq: f"{seq.value.lower()}.nii.gz" for seq in MRSequence}
NET2_DEFINITION = (
    "NET2 mask under a therapy = follow-up lesion voxels that are not lesion at baseline and "
    "belong to a new lesion or to an enlarging lesion (volume growth >= {threshold:.0%}); the "
    "NET2 count is the number of such lesions with at least one NET2 voxel on the grid."
)


def save_nifti(path: Path, array_kji: np.ndarray, grid: Grid, dtype: type) -> None:
    """Write a [k, j, i] array as NIfTI ([i, j, k] + RAS affine), atomically."""
    data = np.asarray(array_kji).transpose(2, 1, 0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    img = nib.Nifti1Image(data.astype(dtype), grid.nifti_affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(grid.nifti_affine, code=1)
    img.set_sform(grid.nifti_affine, code=1)
    tmp = path.with_name(path.name.replace(".nii.gz", ".tmp.nii.gz"))
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def load_nifti(path: Path) -> tuple[np.ndarray, Grid]:
    """Read a NIfTI file as a [k, j, i] float32 array with its grid."""
    try:
        img: Any = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except (OSError, ValueError, EOFError) as exc:
        raise CohortFormatError(f"cannot read {path}: {exc}") from exc
    grid = Grid.from_nifti_affine(data.shape[:3], img.affine)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), grid


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def patient_truth(rendered: RenderedPatient) -> dict[str, Any]:
    d = rendered.design
    voxel = rendered.grid.voxel_volume_mm3
    by_id = {rec.lesion_id: rec for rec in rendered.lesions}
    codes = [t.code for t in load_therapies()]
    counts = {c: len(rendered.net2_lesion_ids[c]) for c in codes}
    by_location = {
        c: dict(Counter(by_id[i].location or "unknown" for i in rendered.net2_lesion_ids[c]))
        for c in codes
    }
    return {
        "placebo_rate_per_48_weeks": round(d.activity.placebo_rate_48w, 6),
        "z_visible": round(d.activity.z_visible, 6),
        "z_hidden": round(d.activity.z_hidden, 6),
        "responsiveness": round(d.activity.responsiveness, 6),
        "rate_reduction": {c: round(v, 6) for c, v in d.activity.reductions.items()},
        "expected_net2_count": {
            c: round(d.activity.expected_count(c, d.horizon_weeks), 6) for c in codes
        },
        "net2_count": counts,
        "net2_active": {c: counts[c] > 0 for c in codes},
        "net2_volume_mm3": {c: round(float(rendered.net2[c].sum()) * voxel, 3) for c in codes},
        "net2_count_by_location": by_location,
        "baseline_lesion_count": int(len(np.unique(rendered.baseline_labels)) - 1),
        "baseline_lesion_volume_ml": round(
            float((rendered.baseline_labels > 0).sum()) * voxel / 1000, 4
        ),
        "followup_lesion_volume_ml": round(
            float((rendered.followup_labels > 0).sum()) * voxel / 1000, 4
        ),
        "young_lesion_count": sum(
            1 for r in rendered.lesions if r.kind == "baseline" and r.age == "young"
        ),
        "atrophy_ventricular_expansion_mm": round(d.atrophy_mm, 4),
        **_prior_truth(rendered),
    }


def _prior_truth(rendered: RenderedPatient) -> dict[str, Any]:
    """What changed between the prior visit and baseline (absent without a prior visit)."""
    d = rendered.design
    if rendered.prior_labels is None:
        return {}
    kinds = Counter(e.kind.value for e in d.prior_events)
    return {
        "prior_interval_weeks": d.prior_weeks,
        "prior_interval_new_count": kinds.get("new", 0),
        "prior_interval_enlarging_count": kinds.get("enlarge", 0),
        "prior_lesion_volume_ml": round(
            float((rendered.prior_labels > 0).sum()) * rendered.grid.voxel_volume_mm3 / 1000, 4
        ),
    }


def write_patient(rendered: RenderedPatient, folder: Path, index: int) -> dict[str, Any]:
    """Write one patient's files; ``patient.json`` last."""
    d = rendered.design
    grid = rendered.grid
    for visit_name in VISITS:
        (folder / visit_name).mkdir(parents=True, exist_ok=True)
    (folder / "net2").mkdir(parents=True, exist_ok=True)
    for v, visit_name in enumerate(VISITS):
        images = synthesize_visit(rendered, v)
        for seq, img in images.items():
            save_nifti(folder / visit_name / SEQUENCE_FILES[seq], img, grid, np.int16)
        labels = rendered.baseline_labels if v == 0 else rendered.followup_labels
        save_nifti(folder / visit_name / "lesions.nii.gz", labels, grid, np.int16)
    visits: dict[str, Any] = {}
    if rendered.prior_labels is not None:
        # FLAIR and the lesion labels: what the model's temporal context reads.
        (folder / "prior").mkdir(parents=True, exist_ok=True)
        prior = synthesize_visit(rendered, PRIOR_VISIT, (MRSequence.FLAIR,))
        save_nifti(
            folder / "prior" / SEQUENCE_FILES[MRSequence.FLAIR],
            prior[MRSequence.FLAIR],
            grid,
            np.int16,
        )
        save_nifti(folder / "prior" / "lesions.nii.gz", rendered.prior_labels, grid, np.int16)
        assert d.prior_scanner is not None
        visits["prior"] = {"week": -d.prior_weeks, "scanner": d.prior_scanner.name}
    for code, mask in rendered.net2.items():
        save_nifti(folder / "net2" / f"{code}.nii.gz", mask, grid, np.uint8)
    sidecar = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "patient_id": d.patient_id,
        "simulated": True,
        "seed": d.seed,
        "index": index,
        "sex": d.sex,
        "age_years": d.age_years,
        "factual_therapy": d.factual_therapy,
        "horizon_weeks": d.horizon_weeks,
        "visits": {
            **visits,
            "baseline": {"week": 0.0, "scanner": d.scanners[0].name},
            "followup": {"week": d.horizon_weeks, "scanner": d.scanners[1].name},
        },
        "sequences": [s.value for s in MRSequence],
        "truth": patient_truth(rendered),
        "lesions": [asdict(r) for r in rendered.lesions],
        "transforms": {
            "note": "template-aligned LPS mm -> scanner LPS mm at each visit: pose @ head",
            "head_affine_lps": d.head_affine.round(6).tolist(),
            "visit_poses_lps": [p.round(6).tolist() for p in d.visit_poses],
        },
    }
    _write_json(folder / "patient.json", sidecar)
    return sidecar


def _simulate_one(args: tuple[int, int, SimulationConfig, str]) -> dict[str, Any]:
    seed, index, config, out = args
    import torch

    torch.set_num_threads(1)  # one process per core
    folder = Path(out) / "patients" / f"SIM{seed:04d}{index:05d}"
    existing = folder / "patient.json"
    if existing.is_file():
        payload: dict[str, Any] = json.loads(existing.read_text(encoding="utf-8"))
        return payload
    design = design_patient(seed, index, config)
    rendered = render_patient(design)
    return write_patient(rendered, folder, index)


def cohort_header(seed: int, n: int, config: SimulationConfig) -> dict[str, Any]:
    grid = load_template_anatomy(config.grid_spacing_mm).grid
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "simulated": True,
        "generator": f"ms-forecast-node {__version__}",
        "seed": seed,
        "n_patients": n,
        "grid": {
            "shape_kji": list(grid.shape),
            "spacing_mm": list(grid.spacing),
            "affine_ras": grid.nifti_affine.round(6).tolist(),
            "space": "ICBM152 2009c symmetric (template-aligned, affine removed)",
        },
        "horizon_weeks": config.horizon_weeks,
        "therapies": [asdict(t) for t in load_therapies()],
        "definitions": {
            "net2": NET2_DEFINITION.format(threshold=config.enlarging_threshold),
            "enlarging_threshold": config.enlarging_threshold,
            "lesion_mask": "partial-volume fraction >= 0.5",
            "location_classes": "see ms_forecast_node.anatomy.locations",
        },
        "config": config.to_dict(),
    }


def simulate_cohort(
    out: Path, n: int, seed: int, config: SimulationConfig, workers: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Write (or resume) a cohort of ``n`` patients; returns the cohort header."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "patients").mkdir(exist_ok=True)
    header = cohort_header(seed, n, config)
    load_template_anatomy(config.grid_spacing_mm)  # derive/cache once before forking
    jobs = [(seed, i, config, str(out)) for i in range(n)]
    results: list[dict[str, Any]] = []
    bar = tqdm(total=n, desc="simulating patients", unit="patient", disable=not progress)
    if workers <= 1:
        for job in jobs:
            results.append(_simulate_one(job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for payload in pool.map(_simulate_one, jobs, chunksize=1):
                results.append(payload)
                bar.update()
    bar.close()
    header["patients"] = [
        {
            "patient_id": r["patient_id"],
            "factual_therapy": r["factual_therapy"],
            "net2_count_factual": r["truth"]["net2_count"][r["factual_therapy"]],
        }
        for r in results
    ]
    _write_json(out / "cohort.json", header)
    return header


@dataclass(frozen=True)
class CohortPatient:
    folder: Path
    sidecar: dict[str, Any]

    @property
    def patient_id(self) -> str:
        return str(self.sidecar["patient_id"])

    def image_path(self, visit: str, sequence: MRSequence) -> Path:
        return self.folder / visit / SEQUENCE_FILES[sequence]

    def net2_path(self, therapy: str) -> Path:
        return self.folder / "net2" / f"{therapy}.nii.gz"


def read_cohort(folder: Path) -> tuple[dict[str, Any], list[CohortPatient]]:
    """Open and validate a cohort folder; raises :class:`CohortFormatError` with the reason."""
    header_path = folder / "cohort.json"
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CohortFormatError(f"{header_path}: {exc}") from exc
    if header.get("format") != FORMAT_NAME or header.get("format_version") != FORMAT_VERSION:
        raise CohortFormatError(
            f"{header_path}: expected format {FORMAT_NAME} v{FORMAT_VERSION}, "
            f"got {header.get('format')} v{header.get('format_version')}"
        )
    patients: list[CohortPatient] = []
    for entry in header.get("patients", []):
        pid = str(entry["patient_id"])
        pfolder = folder / "patients" / pid
        try:
            sidecar = json.loads((pfolder / "patient.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CohortFormatError(f"patient {pid}: {exc}") from exc
        patient = CohortPatient(pfolder, sidecar)
        required = [patient.image_path("baseline", MRSequence.FLAIR)]
        required += [pfolder / "baseline" / "lesions.nii.gz"]
        required += [patient.net2_path(sidecar["factual_therapy"])]
        missing = [str(p.relative_to(folder)) for p in required if not p.is_file()]
        if missing:
            raise CohortFormatError(f"patient {pid}: missing {missing}")
        patients.append(patient)
    return header, patients
