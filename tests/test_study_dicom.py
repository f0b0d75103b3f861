"""`simulate study`: a valid two-visit DICOM tree whose geometry and sides survive a read-back."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ms_forecast_node.image.geometry import Grid

pytestmark = pytest.mark.slow


def _read_series(folder: Path) -> sitk.Image:
    files = sorted(folder.glob("*.dcm"))
    if len(files) == 1:
        return sitk.ReadImage(str(files[0]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _series(manifest: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(visit, s) for visit in manifest["visits"] for s in visit["series"]]


def test_tree_has_two_visits_with_four_sequences(simulated_study) -> None:
    out, manifest = simulated_study
    assert [v["visit"] for v in manifest["visits"]] == ["baseline", "followup"]
    for visit in manifest["visits"]:
        assert {s["sequence"] for s in visit["series"]} == {"FLAIR", "T1", "T2", "PD"}
        assert any(s["multiframe"] for s in visit["series"])
        assert any(not s["multiframe"] for s in visit["series"])
    uids = {v["study_instance_uid"] for v in manifest["visits"]}
    assert len(uids) == 2


@pytest.mark.external
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_reports_no_error(simulated_study) -> None:
    out, manifest = simulated_study
    for _visit, series in _series(manifest):
        files = sorted((out / series["folder"]).glob("*.dcm"))
        for path in {files[0], files[len(files) // 2], files[-1]}:
            result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [
                ln for ln in (result.stdout + result.stderr).splitlines() if ln.startswith("Error")
            ]
            assert not errors, (path, errors)


def test_geometry_read_back_matches_the_simulated_grid(simulated_study) -> None:
    out, manifest = simulated_study
    for _visit, series in _series(manifest):
        image = _read_series(out / series["folder"])
        expected = Grid(tuple(series["grid_shape_kji"]), np.array(series["grid_affine_lps"]))
        got = Grid.from_sitk(image)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.spacing, expected.spacing, atol=1e-3)
        # Same voxel centres in the world, whatever order a reader stacks the slices in.
        corners = np.array([[0, 0, 0], [7, 11, 3], [20, 30, expected.shape[0] - 1]], float)
        world = expected.index_to_world(corners)
        back = got.world_to_index(world)
        assert np.all(np.abs(back - np.round(back)) < 1e-3)


def test_pydicom_and_simpleitk_agree_on_pixels(simulated_study) -> None:
    out, manifest = simulated_study
    visit, series = next(
        (v, s) for v, s in _series(manifest) if s["sequence"] == "T2" and not s["multiframe"]
    )
    folder = out / series["folder"]
    image = _read_series(folder)
    array = sitk.GetArrayFromImage(image)
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    grid = Grid(tuple(series["grid_shape_kji"]), np.array(series["grid_affine_lps"]))
    for ds in datasets[::7]:
        pos = np.array([float(v) for v in ds.ImagePositionPatient])
        k_sitk = int(round(Grid.from_sitk(image).world_to_index(pos[None])[0, 2]))
        np.testing.assert_array_equal(array[k_sitk], ds.pixel_array)
        k_grid = int(round(grid.world_to_index(pos[None])[0, 2]))
        assert k_grid == int(ds.InstanceNumber) - 1
    enhanced = next(s for _v, s in _series(manifest) if s["multiframe"])
    ds = pydicom.dcmread(next((out / enhanced["folder"]).glob("*.dcm")))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
    assert int(ds.NumberOfFrames) == enhanced["grid_shape_kji"][0]
    assert visit["study_instance_uid"] == str(
        pydicom.dcmread(folder / "IM0001.dcm").StudyInstanceUID
    )


def _value_at(image: sitk.Image, array: np.ndarray, point: np.ndarray) -> float:
    """Mean of the 3x3x3 voxels around the voxel that contains ``point``."""
    i, j, k = image.TransformPhysicalPointToIndex(tuple(float(v) for v in point))
    patch = array[max(k - 1, 0) : k + 2, max(j - 1, 0) : j + 2, max(i - 1, 0) : i + 2]
    return float(patch.mean())


def test_left_lesion_stays_left_in_every_series(simulated_study) -> None:
    """A lesion in the left hemisphere is bright on FLAIR/T2 (dark on T1) at its own position
    in scanner space, and the mirror point in the right hemisphere is not."""
    out, manifest = simulated_study
    lesions = manifest["truth"]["summary"]
    import json

    sidecar = json.loads(next((out / "truth" / "patients").glob("*/patient.json")).read_text())
    baseline = [
        les
        for les in sidecar["lesions"]
        if les["kind"] == "baseline"
        and les["volume_mm3"] > 60
        and les["centroid_lps_mm"][0] > 12
        and les["location"] != "infratentorial"
    ]
    assert baseline, "expected at least one sizeable left-hemisphere lesion for seed 1"
    assert lesions["baseline_lesion_count"] >= len(baseline)
    visit = manifest["visits"][0]
    transform = np.array(visit["patient_to_scanner_lps"])
    checked = 0
    for series in visit["series"]:
        image = _read_series(out / series["folder"])
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        wins = 0
        for les in baseline:
            p = np.array(les["centroid_lps_mm"])
            mirror = p * np.array([-1.0, 1.0, 1.0])  # template midline is x = 0
            at = transform[:3, :3] @ p + transform[:3, 3]
            opposite = transform[:3, :3] @ mirror + transform[:3, 3]
            lesion_value = _value_at(image, array, at)
            mirror_value = _value_at(image, array, opposite)
            if series["sequence"] == "T1":
                wins += lesion_value < mirror_value
            elif series["sequence"] in ("FLAIR", "T2"):
                wins += lesion_value > mirror_value
            else:
                wins += lesion_value > 0
        assert wins >= 0.75 * len(baseline), (series["protocol"], wins, len(baseline))
        checked += 1
    assert checked == 4


def test_visits_are_dated_apart_by_the_horizon(simulated_study) -> None:
    out, manifest = simulated_study
    import datetime

    d0, d1 = (datetime.datetime.strptime(v["study_date"], "%Y%m%d") for v in manifest["visits"])
    assert (d1 - d0).days == int(manifest["horizon_weeks"] * 7)
    ds0 = pydicom.dcmread(next((out / manifest["visits"][0]["series"][0]["folder"]).glob("*.dcm")))
    ds1 = pydicom.dcmread(next((out / manifest["visits"][1]["series"][0]["folder"]).glob("*.dcm")))
    assert ds0.PatientID == ds1.PatientID and ds0.PatientName == ds1.PatientName
    assert ds0.FrameOfReferenceUID != ds1.FrameOfReferenceUID  # the patient was re-positioned
