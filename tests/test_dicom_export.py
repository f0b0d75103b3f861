"""Tests of the simulated MR DICOM writer (classic MR and Enhanced MR Image Storage)."""

from __future__ import annotations

import dataclasses
import datetime
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from ms_forecast_node.errors import SimulationError
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.simulate.dicom_export import (
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    SIMULATED_DATA_MARKER,
    StudyIdentity,
    acquisition_grid,
    write_mr_series,
)
from ms_forecast_node.simulate.protocols import (
    AcquisitionProtocol,
    SliceOrientation,
    load_protocols,
)

ACQ_TIME = datetime.datetime(2024, 3, 5, 14, 7, 9)
MARKER_VALUE = 3000
# Marker box in LPS mm: patient's left (x > 0), anterior (y < 0), superior (z > 0).
MARKER_BOX = ((4.0, 10.0), (-10.0, -4.0), (4.0, 10.0))
ORIENTATIONS = list(SliceOrientation)
NEEDS_DCIODVFY = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed"
)


@pytest.fixture(scope="module")
def protocols() -> dict[str, AcquisitionProtocol]:
    return {p.name: p for p in load_protocols()}


@pytest.fixture(scope="module")
def identity() -> StudyIdentity:
    return StudyIdentity(
        patient_name="SIMULATED^PATIENT^ONE",
        patient_id="SIM-0042",
        patient_birth_date="19790611",
        patient_sex="F",
        study_instance_uid=generate_uid(entropy_srcs=["test-study"]),
        study_date="20240305",
        study_time="140000",
        accession_number="SIMACC01",
    )


def small_protocol(
    protocols: dict[str, AcquisitionProtocol],
    orientation: SliceOrientation,
    *,
    multiframe: bool,
    base: str = "t1_3d_mprage",
) -> AcquisitionProtocol:
    """A small version of a shipped protocol: 40 rows x 32 columns x 24 slices at 1 mm."""
    proto = protocols[base]
    return dataclasses.replace(
        proto,
        orientation=orientation,
        multiframe=multiframe,
        oblique_tilt_deg=12.0,
        pixel_spacing_mm=1.0,
        slice_thickness_mm=1.0,
        slice_gap_mm=0.0,
        field_of_view_mm=(40.0, 32.0, 24.0),
    )


def world_coordinates(grid: Grid) -> np.ndarray:
    """(nk, nj, ni, 3) LPS coordinates of every voxel centre."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    return grid.index_to_world(ijk).reshape((*grid.shape, 3))


def marked_volume(grid: Grid, seed: int = 0) -> np.ndarray:
    """Random background (so any flip shows) plus a bright left-anterior-superior block."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(50, 1500, size=grid.shape).astype(np.float32)
    xyz = world_coordinates(grid)
    mask = np.ones(grid.shape, dtype=bool)
    for axis, (lo, hi) in enumerate(MARKER_BOX):
        mask &= (xyz[..., axis] >= lo) & (xyz[..., axis] <= hi)
    assert mask.sum() > 20, "marker must cover voxels of the test grid"
    volume[mask] = MARKER_VALUE
    return volume


def write(
    volume: np.ndarray,
    grid: Grid,
    protocol: AcquisitionProtocol,
    identity: StudyIdentity,
    out_dir: Path,
    *,
    seed: str = "seed",
) -> list[Path]:
    return write_mr_series(
        volume,
        grid,
        protocol,
        identity,
        series_number=5,
        series_instance_uid=generate_uid(entropy_srcs=["series", protocol.name]),
        frame_of_reference_uid=generate_uid(entropy_srcs=["frame-of-reference"]),
        uid_prefix_seed=seed,
        out_dir=out_dir,
        acquisition_datetime=ACQ_TIME,
    )


def sorted_along_normal(grid: Grid, volume: np.ndarray) -> tuple[Grid, np.ndarray]:
    """The grid/array a reader that sorts slices along row x column returns.

    GDCM (SimpleITK's ImageSeriesReader + GetGDCMSeriesFileNames) orders classic slices along
    the normal row x column; for left-handed grids (SAGITTAL, k = +L = -(row x column)) that is
    the reverse of the written k order: same voxels in the same world places, k axis flipped.
    """
    d = grid.direction
    if float(np.dot(np.cross(d[:, 0], d[:, 1]), d[:, 2])) > 0:
        return grid, volume
    nk = grid.shape[0]
    affine = grid.affine.copy()
    affine[:3, 3] = grid.index_to_world(np.array([[0.0, 0.0, nk - 1.0]]))[0]
    affine[:3, 2] *= -1.0
    return Grid(grid.shape, affine), volume[::-1]


def assert_marker_left_anterior_superior(image: sitk.Image) -> None:
    array = sitk.GetArrayFromImage(image)
    grid = Grid.from_sitk(image)
    k, j, i = np.nonzero(array == MARKER_VALUE)
    assert k.size > 20
    centroid = grid.index_to_world(np.stack([i, j, k], axis=1)).mean(axis=0)
    assert centroid[0] > 0, f"marker not on the patient's left: {centroid}"
    assert centroid[1] < 0, f"marker not anterior: {centroid}"
    assert centroid[2] > 0, f"marker not superior: {centroid}"
    for axis, (lo, hi) in enumerate(MARKER_BOX):
        assert lo - 1.0 <= centroid[axis] <= hi + 1.0


def assert_same_geometry(image: sitk.Image, grid: Grid) -> None:
    assert image.GetSize() == grid.size_ijk
    np.testing.assert_allclose(image.GetOrigin(), grid.origin, atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), grid.spacing, atol=1e-3)
    np.testing.assert_allclose(
        np.asarray(image.GetDirection()).reshape(3, 3), grid.direction, atol=1e-3
    )


# --------------------------------------------------------------------------------------------
# acquisition_grid
# --------------------------------------------------------------------------------------------
EXPECTED_AXES = {
    SliceOrientation.AXIAL: ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    SliceOrientation.SAGITTAL: ((0, 1, 0), (0, 0, -1), (1, 0, 0)),
    SliceOrientation.CORONAL: ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_acquisition_grid_conventions(
    protocols: dict[str, AcquisitionProtocol], orientation: SliceOrientation
) -> None:
    proto = dataclasses.replace(
        protocols["t2_ax_tse"], orientation=orientation, oblique_tilt_deg=12.0
    )
    center = (3.0, -7.5, 21.0)
    grid = acquisition_grid(proto, center)
    # 230 / 0.9 = 255.6 -> 256 rows, 200 / 0.9 = 222.2 -> 222 columns, 150 / 3 = 50 slices
    assert grid.shape == (50, 256, 222)
    np.testing.assert_allclose(grid.spacing, (0.9, 0.9, 3.0), atol=1e-9)
    middle = (np.asarray(grid.size_ijk, dtype=float) - 1.0) / 2.0
    np.testing.assert_allclose(grid.index_to_world(middle[None, :])[0], center, atol=1e-9)
    if orientation is SliceOrientation.OBLIQUE:
        t = math.radians(12.0)
        expected = ((1, 0, 0), (0, math.cos(t), math.sin(t)), (0, -math.sin(t), math.cos(t)))
    else:
        expected = EXPECTED_AXES[orientation]
    np.testing.assert_allclose(grid.direction, np.array(expected, dtype=float).T, atol=1e-12)


def test_acquisition_grid_slice_gap(protocols: dict[str, AcquisitionProtocol]) -> None:
    proto = dataclasses.replace(protocols["pd_ax_tse"], slice_gap_mm=0.6)
    grid = acquisition_grid(proto, (0.0, 0.0, 0.0))
    assert grid.spacing[2] == pytest.approx(3.6)
    assert grid.shape[0] == round(150 / 3.6)


# --------------------------------------------------------------------------------------------
# Round trips through SimpleITK and pydicom
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_classic_series_round_trip(
    tmp_path: Path,
    protocols: dict[str, AcquisitionProtocol],
    identity: StudyIdentity,
    orientation: SliceOrientation,
) -> None:
    proto = small_protocol(protocols, orientation, multiframe=False)
    grid = acquisition_grid(proto, (0.0, 0.0, 0.0))
    assert grid.shape == (24, 40, 32)
    volume = marked_volume(grid)
    paths = write(volume, grid, proto, identity, tmp_path)
    assert [p.name for p in paths] == [f"IM{n:04d}.dcm" for n in range(1, 25)]

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(tmp_path))
    assert len(names) == grid.shape[0]
    reader.SetFileNames(names)
    image = reader.Execute()
    expected_grid, expected = sorted_along_normal(grid, volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected.astype(np.uint16))
    assert_same_geometry(image, expected_grid)
    assert_marker_left_anterior_superior(image)

    # Instance order is the grid's k order, whatever the handedness.
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == MR_IMAGE_STORAGE
        assert int(ds.InstanceNumber) == k + 1
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient],
            grid.index_to_world(np.array([[0.0, 0.0, float(k)]]))[0],
            atol=1e-4,
        )
        np.testing.assert_array_equal(ds.pixel_array, volume[k].astype(np.uint16))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_enhanced_mr_round_trip(
    tmp_path: Path,
    protocols: dict[str, AcquisitionProtocol],
    identity: StudyIdentity,
    orientation: SliceOrientation,
) -> None:
    proto = small_protocol(protocols, orientation, multiframe=True, base="flair_3d_sag")
    grid = acquisition_grid(proto, (0.0, 0.0, 0.0))
    volume = marked_volume(grid, seed=1)
    paths = write(volume, grid, proto, identity, tmp_path)
    assert [p.name for p in paths] == ["IM0001.dcm"]

    # SimpleITK 2.5 / GDCM read the Enhanced MR geometry correctly (origin from the first
    # frame's Plane Position, direction from Plane Orientation plus the frame positions, so
    # even the left-handed SAGITTAL stack comes back in written frame order).
    image = sitk.ReadImage(str(paths[0]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.astype(np.uint16))
    assert_same_geometry(image, grid)
    assert_marker_left_anterior_superior(image)

    # The functional groups themselves carry the same geometry.
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == ENHANCED_MR_IMAGE_STORAGE
    assert int(ds.NumberOfFrames) == grid.shape[0]
    shared = ds.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in measures.PixelSpacing], (grid.spacing[1], grid.spacing[0])
    )
    assert float(measures.SpacingBetweenSlices) == pytest.approx(grid.spacing[2])
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    np.testing.assert_allclose(iop, grid.direction[:, :2].T.ravel(), atol=1e-6)
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(
            position, grid.index_to_world(np.array([[0.0, 0.0, float(k)]]))[0], atol=1e-4
        )
        content = frame.FrameContentSequence[0]
        assert int(content.InStackPositionNumber) == k + 1
        assert [int(v) for v in content.DimensionIndexValues] == [1, k + 1]
    np.testing.assert_array_equal(ds.pixel_array, volume.astype(np.uint16))


@pytest.mark.parametrize("multiframe", [False, True])
def test_anisotropic_pixel_spacing_order(
    tmp_path: Path,
    protocols: dict[str, AcquisitionProtocol],
    identity: StudyIdentity,
    multiframe: bool,
) -> None:
    """PixelSpacing is [row spacing (j), column spacing (i)]; a swap would show here."""
    proto = small_protocol(protocols, SliceOrientation.AXIAL, multiframe=multiframe)
    grid = Grid.from_geometry((6, 10, 7), (0.8, 1.3, 2.5), (-3.0, 4.0, -5.0))
    volume = np.arange(np.prod(grid.shape), dtype=np.float64).reshape(grid.shape)
    paths = write(volume, grid, proto, identity, tmp_path)
    image = sitk.ReadImage(str(paths[0]) if multiframe else [str(p) for p in paths])
    assert_same_geometry(image, grid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.astype(np.uint16))


# --------------------------------------------------------------------------------------------
# Header content
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("multiframe", [False, True])
def test_header_identity_dates_and_simulation_marker(
    tmp_path: Path,
    protocols: dict[str, AcquisitionProtocol],
    identity: StudyIdentity,
    multiframe: bool,
) -> None:
    proto = small_protocol(protocols, SliceOrientation.SAGITTAL, multiframe=multiframe)
    grid = acquisition_grid(proto, (0.0, 0.0, 0.0))
    paths = write(marked_volume(grid), grid, proto, identity, tmp_path)
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.PatientID == identity.patient_id
    assert str(ds.PatientName) == identity.patient_name
    assert ds.PatientAge == "044Y"
    assert ds.StudyInstanceUID == identity.study_instance_uid
    assert (ds.StudyDate, ds.StudyTime) == ("20240305", "140000")
    assert (ds.SeriesDate, ds.SeriesTime) == ("20240305", "140709")
    assert (ds.ContentDate, ds.ContentTime) == ("20240305", "140709")
    assert ds.AcquisitionDateTime == "20240305140709"
    assert ds.Modality == "MR"
    assert ds.SeriesDescription == proto.series_description
    assert ds.ImageComments == SIMULATED_DATA_MARKER
    assert ds.PatientComments == SIMULATED_DATA_MARKER
    assert "SIMULAT" in ds.Manufacturer
    assert ds.MRAcquisitionType == "3D"
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored) == (
        "MONOCHROME2",
        16,
        12,
    )
    if multiframe:
        shared = ds.SharedFunctionalGroupsSequence[0]
        timing = shared.MRTimingAndRelatedParametersSequence[0]
        assert float(timing.RepetitionTime) == pytest.approx(proto.repetition_time_ms)
        assert float(shared.MREchoSequence[0].EffectiveEchoTime) == pytest.approx(
            proto.echo_time_ms
        )
        inversion_times = np.atleast_1d(shared.MRModifierSequence[0].InversionTimes)
        assert inversion_times.tolist() == [proto.inversion_time_ms]
        assert float(shared.FrameVOILUTSequence[0].WindowWidth) > 0
    else:
        assert list(ds.ScanningSequence) == list(proto.scanning_sequence)
        assert float(ds.RepetitionTime) == pytest.approx(proto.repetition_time_ms)
        assert float(ds.EchoTime) == pytest.approx(proto.echo_time_ms)
        assert float(ds.InversionTime) == pytest.approx(proto.inversion_time_ms or -1.0)
        assert ds.SequenceName == proto.sequence_name
        assert float(ds.WindowWidth) > 0
        assert float(ds.MagneticFieldStrength) == pytest.approx(3.0)


def test_values_are_rounded_and_clipped_to_uint16(
    tmp_path: Path, protocols: dict[str, AcquisitionProtocol], identity: StudyIdentity
) -> None:
    proto = small_protocol(protocols, SliceOrientation.AXIAL, multiframe=False)
    grid = Grid.from_geometry((2, 3, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volume = np.full(grid.shape, 1.6)
    volume[1, 2, 3] = 70000.0
    paths = write(volume, grid, proto, identity, tmp_path)
    first, last = (pydicom.dcmread(p) for p in paths)
    assert first.BitsStored == 16
    assert int(first.pixel_array[0, 0]) == 2
    assert int(last.pixel_array[2, 3]) == 65535


# --------------------------------------------------------------------------------------------
# Validity (dciodvfy)
# --------------------------------------------------------------------------------------------
@pytest.mark.external
@NEEDS_DCIODVFY
@pytest.mark.parametrize(
    ("base", "orientation", "multiframe", "iod"),
    [
        ("t1_3d_mprage", SliceOrientation.SAGITTAL, False, "MRImage"),
        ("t2_ax_tse", SliceOrientation.OBLIQUE, False, "MRImage"),
        ("flair_3d_sag", SliceOrientation.SAGITTAL, True, "EnhancedMRImage"),
        ("pd_ax_tse", SliceOrientation.CORONAL, True, "EnhancedMRImage"),
    ],
)
def test_dciodvfy_reports_no_errors(
    tmp_path: Path,
    protocols: dict[str, AcquisitionProtocol],
    identity: StudyIdentity,
    base: str,
    orientation: SliceOrientation,
    multiframe: bool,
    iod: str,
) -> None:
    proto = dataclasses.replace(
        protocols[base],
        orientation=orientation,
        multiframe=multiframe,
        field_of_view_mm=(40.0, 32.0, 16.0 * protocols[base].slice_spacing_mm),
    )
    grid = acquisition_grid(proto, (0.0, 0.0, 0.0))
    paths = write(marked_volume(grid), grid, proto, identity, tmp_path)
    result = subprocess.run(
        ["dciodvfy", str(paths[len(paths) // 2])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    assert iod in [line.strip() for line in lines], lines
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == []
    warnings = [line for line in lines if line.startswith("Warning")]
    assert len(warnings) <= 2, warnings


# --------------------------------------------------------------------------------------------
# Determinism and bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("multiframe", [False, True])
def test_writing_is_deterministic(
    tmp_path: Path,
    protocols: dict[str, AcquisitionProtocol],
    identity: StudyIdentity,
    multiframe: bool,
) -> None:
    proto = small_protocol(protocols, SliceOrientation.OBLIQUE, multiframe=multiframe)
    grid = acquisition_grid(proto, (1.0, 2.0, 3.0))
    volume = marked_volume(grid)
    first = write(volume, grid, proto, identity, tmp_path / "a")
    second = write(volume, grid, proto, identity, tmp_path / "b")
    other_seed = write(volume, grid, proto, identity, tmp_path / "c", seed="other")
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in first]
    assert uids == [pydicom.dcmread(p).SOPInstanceUID for p in second]
    assert len(set(uids)) == len(uids)
    assert not set(uids) & {pydicom.dcmread(p).SOPInstanceUID for p in other_seed}
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


@pytest.mark.parametrize("problem", ["shape", "nan", "negative", "inf"])
def test_bad_volume_raises(
    tmp_path: Path,
    protocols: dict[str, AcquisitionProtocol],
    identity: StudyIdentity,
    problem: str,
) -> None:
    proto = small_protocol(protocols, SliceOrientation.AXIAL, multiframe=False)
    grid = acquisition_grid(proto, (0.0, 0.0, 0.0))
    volume = np.ones(grid.shape, dtype=np.float32)
    if problem == "shape":
        volume = volume[:, :, :-1]
    elif problem == "nan":
        volume[3, 4, 5] = np.nan
    elif problem == "negative":
        volume[3, 4, 5] = -1.0
    else:
        volume[3, 4, 5] = np.inf
    with pytest.raises(SimulationError):
        write(volume, grid, proto, identity, tmp_path)
    assert not list(tmp_path.glob("*.dcm"))


@pytest.mark.parametrize(
    "change",
    [
        {"patient_sex": "X"},
        {"study_date": "2024-03-05"},
        {"study_instance_uid": "not.a.uid!"},
        {"station_name": "A STATION NAME LONGER THAN SIXTEEN"},
    ],
)
def test_bad_identity_raises(identity: StudyIdentity, change: dict[str, Any]) -> None:
    with pytest.raises(SimulationError):
        dataclasses.replace(identity, **change)


# --------------------------------------------------------------------------------------------
# Full size (speed is measured in benchmarks/, never asserted here)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["t1_3d_mprage", "flair_3d_sag"])
def test_full_size_series_writes_every_slice(
    tmp_path: Path,
    protocols: dict[str, AcquisitionProtocol],
    identity: StudyIdentity,
    name: str,
) -> None:
    proto = protocols[name]
    grid = acquisition_grid(proto, (0.0, -10.0, 15.0))
    assert grid.shape == (176, 256, 240)
    volume = np.random.default_rng(3).uniform(0, 1200, grid.shape).astype(np.float32)
    paths = write(volume, grid, proto, identity, tmp_path)
    assert len(paths) == (1 if proto.multiframe else 176)
