"""`ms-forecast-node forecast`: the whole chain offline, on a simulated two-visit study."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from .conftest import run_cli
from .dicom_cases import localizer_only_study, study_without_flair

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


@pytest.fixture(scope="module")
def forecast_run(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    root, _ = simulated_study
    out = tmp_path_factory.mktemp("forecast")
    # Few samples and steps keep the test quick; the chain is the same as the default's.
    result = run_cli(
        "forecast", str(root / "dicom"), "--out", str(out), "--samples", "2", "--steps", "2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_every_therapy_gets_seg_sr_and_fallbacks(
    forecast_run: tuple[Path, dict[str, Any]], simulated_study: tuple[Path, dict[str, Any]]
) -> None:
    out, summary = forecast_run
    _, manifest = simulated_study
    therapies = {row["therapy"] for row in summary["therapies_ranked"]}
    assert len(therapies) == 7  # placebo and the six treatments
    by_kind: dict[str, set[str | None]] = {}
    for entry in summary["outputs"]:
        by_kind.setdefault(entry["kind"], set()).add(entry["therapy"])
    for kind in ("seg", "sr", "key_images"):
        assert by_kind[kind] == therapies, kind
    assert by_kind["comparison_sr"] == {None}
    assert by_kind["pdf"] == {None}
    files = sorted((out / "dicom").glob("*.dcm"))
    assert len(files) == len(summary["outputs"])
    classes = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}
    assert classes == {SEG, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, ENCAPSULATED_PDF}
    # Outputs belong to the current (follow-up) study, registered on its FLAIR.
    followup = manifest["visits"][1]
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.StudyInstanceUID == followup["study_instance_uid"]
        assert "RESEARCH" in str(ds.SeriesDescription).upper()
    assert summary["prior"].startswith("prior study")
    assert summary["preprocessing"]["prior_interval_weeks"] == pytest.approx(48.0)
    assert (out / "summary.png").stat().st_size > 10_000


@pytest.mark.slow
def test_seg_lies_on_the_reference_flair(
    forecast_run: tuple[Path, dict[str, Any]], simulated_study: tuple[Path, dict[str, Any]]
) -> None:
    out, summary = forecast_run
    root, manifest = simulated_study
    flair = next(s for s in manifest["visits"][1]["series"] if s["sequence"] == "FLAIR")
    assert summary["preprocessing"]["reference_series"] == flair["series_instance_uid"]
    seg_file = next(iter(sorted((out / "dicom").glob("seg_*.dcm"))))
    seg = hd.seg.segread(seg_file)
    referenced = {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}
    assert referenced == {flair["series_instance_uid"]}
    assert seg.FrameOfReferenceUID == manifest["visits"][1]["frame_of_reference_uid"]


@pytest.mark.slow
@pytest.mark.external
def test_outputs_pass_dciodvfy(forecast_run: tuple[Path, dict[str, Any]]) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    out, _ = forecast_run
    for f in sorted((out / "dicom").glob("*.dcm")):
        run = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, check=False)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert not errors, f"{f.name}: {errors[:5]}"


@pytest.mark.slow
def test_study_without_flair_exits_with_its_reason(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = simulated_study
    study = study_without_flair(root / "dicom" / "followup", tmp_path / "study")
    out = tmp_path / "out"
    result = run_cli("forecast", str(study), "--out", str(out))
    assert result.returncode == 2
    assert "required_series_missing" in result.stderr
    assert "FLAIR" in result.stderr
    error = json.loads((out / "error.json").read_text())
    assert error["reason"] == "required_series_missing"


def test_localizer_only_study_exits_with_its_reason(tmp_path: Path) -> None:
    study = localizer_only_study(tmp_path / "study")
    result = run_cli("forecast", str(study), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no_usable_series" in result.stderr


def test_empty_folder_exits_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("forecast", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no_dicom_found" in result.stderr


def test_unknown_therapy_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli(
        "forecast",
        str(tmp_path / "empty"),
        "--out",
        str(tmp_path / "out"),
        "--therapies",
        "aspirin",
    )
    assert result.returncode == 2
    assert "therapy_unknown" in result.stderr
    assert not (tmp_path / "out" / "dicom").exists()
