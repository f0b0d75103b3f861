"""`simulate cohort`: the documented layout, readable by the cohort reader, resumable."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from ms_forecast_node.errors import CohortFormatError
from ms_forecast_node.simulate.cohort import read_cohort
from ms_forecast_node.simulate.therapies import therapy_codes

from .conftest import run_cli

pytestmark = pytest.mark.slow


def test_layout_is_complete_and_consistent(small_cohort) -> None:
    header = json.loads((small_cohort / "cohort.json").read_text())
    assert header["format"] == "ms-forecast-cohort" and header["format_version"] == 1
    assert header["n_patients"] == 4 and len(header["patients"]) == 4
    shape = tuple(header["grid"]["shape_kji"])
    affine = np.array(header["grid"]["affine_ras"])
    for entry in header["patients"]:
        folder = small_cohort / "patients" / entry["patient_id"]
        sidecar = json.loads((folder / "patient.json").read_text())
        assert sidecar["factual_therapy"] in therapy_codes()
        for visit in ("baseline", "followup"):
            for name in ("flair", "t1", "t2", "pd", "lesions"):
                img = nib.load(folder / visit / f"{name}.nii.gz")
                assert img.shape == shape[::-1]
                np.testing.assert_allclose(img.affine, affine, atol=1e-4)
        truth = sidecar["truth"]
        for code in therapy_codes():
            mask = np.asarray(nib.load(folder / "net2" / f"{code}.nii.gz").dataobj) > 0
            voxel = float(np.prod(header["grid"]["spacing_mm"]))
            assert truth["net2_volume_mm3"][code] == pytest.approx(mask.sum() * voxel, abs=1e-3)
            assert truth["net2_active"][code] == (truth["net2_count"][code] > 0)
        lesion_ids = {les["lesion_id"] for les in sidecar["lesions"]}
        labels = np.asarray(nib.load(folder / "baseline" / "lesions.nii.gz").dataobj)
        assert set(np.unique(labels[labels > 0]).tolist()) <= lesion_ids
        assert {les["location"] for les in sidecar["lesions"]} <= {
            "periventricular",
            "juxtacortical",
            "infratentorial",
            "deep_white_matter",
            None,
        }


def test_reader_accepts_and_resume_keeps_files(small_cohort) -> None:
    header, patients = read_cohort(small_cohort)
    assert len(patients) == 4
    first = patients[0].folder / "patient.json"
    before = first.stat().st_mtime_ns
    result = run_cli("simulate", "cohort", "--n", "4", "--out", str(small_cohort), "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert first.stat().st_mtime_ns == before


def test_reader_rejects_a_foreign_folder(tmp_path) -> None:
    (tmp_path / "cohort.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CohortFormatError):
        read_cohort(tmp_path)


def test_cli_help_and_typed_error_exit() -> None:
    assert run_cli("--help").returncode == 0
    assert "cohort" in run_cli("simulate", "--help").stdout
    bad = run_cli("simulate", "study", "--out", "/tmp/never", "--horizon", "500")
    assert bad.returncode == 2
    assert "horizon" in (bad.stderr + bad.stdout)
