"""The series reader: every geometry the study may bring, and a typed error for each bad case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ms_forecast_node.errors import SeriesGeometryError
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.image.series import read_series

from .dicom_cases import (
    LOSSLESS_TRANSFER_SYNTAXES,
    dicom_files,
    encode_series,
    mr700_path,
    philips_mprage_with_pixels,
    series_with_missing_slice,
)


def _written_grid(entry: dict[str, Any]) -> Grid:
    return Grid(tuple(entry["grid_shape_kji"]), np.asarray(entry["grid_affine_lps"]))


def _same_world_voxels(read: Grid, written: Grid) -> bool:
    """Same voxel centres; the slice axis may run the other way (sorted along the normal)."""
    if read.same_as(written):
        return True
    flipped = written.affine.copy()
    flipped[:3, 3] = written.index_to_world(np.array([[0, 0, written.shape[0] - 1]]))[0]
    flipped[:3, 2] = -written.affine[:3, 2]
    return read.same_as(Grid(written.shape, flipped))


@pytest.mark.slow
def test_every_simulated_series_reads_back_on_its_written_grid(
    simulated_study: tuple[Path, dict[str, Any]],
) -> None:
    root, manifest = simulated_study
    for visit in manifest["visits"]:
        for entry in visit["series"]:
            series = read_series(dicom_files(root / entry["folder"]))
            assert series.is_multiframe == entry["multiframe"]
            assert _same_world_voxels(series.grid, _written_grid(entry)), entry["protocol"]
            assert series.pixels.shape == tuple(entry["grid_shape_kji"])
            assert float(series.pixels.max()) > 0
            assert len(series.slice_sources) == series.grid.shape[0]


@pytest.mark.slow
def test_reader_agrees_with_simpleitk_on_classic_series(
    simulated_study: tuple[Path, dict[str, Any]],
) -> None:
    root, manifest = simulated_study
    entry = next(e for e in manifest["visits"][1]["series"] if e["sequence"] == "T2")
    files = dicom_files(root / entry["folder"])
    series = read_series(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(root / entry["folder"])))
    itk = reader.Execute()
    ours = series.to_sitk()
    assert np.allclose(ours.GetOrigin(), itk.GetOrigin(), atol=1e-3)
    assert np.allclose(ours.GetDirection(), itk.GetDirection(), atol=1e-5)
    assert np.allclose(ours.GetSpacing(), itk.GetSpacing(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(itk).astype(np.float32), series.pixels)


@pytest.mark.slow
@pytest.mark.parametrize("syntax", LOSSLESS_TRANSFER_SYNTAXES, ids=lambda u: u.name)
def test_compressed_series_decode_to_the_same_volume(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path: Path, syntax: pydicom.uid.UID
) -> None:
    root, manifest = simulated_study
    for kind in ("T2", "FLAIR"):  # classic single-frame and Enhanced MR multi-frame
        entry = next(e for e in manifest["visits"][1]["series"] if e["sequence"] == kind)
        source = read_series(dicom_files(root / entry["folder"]))
        encoded = encode_series(root / entry["folder"], tmp_path / kind, syntax)
        assert pydicom.dcmread(encoded[0]).file_meta.TransferSyntaxUID == syntax
        again = read_series(encoded)
        assert again.grid.same_as(source.grid)
        assert np.array_equal(again.pixels, source.pixels)


@pytest.mark.slow
def test_real_philips_enhanced_mr_header(tmp_path: Path) -> None:
    path = philips_mprage_with_pixels(tmp_path)
    series = read_series([path])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert series.is_multiframe
    assert series.grid.shape[0] == int(ds.NumberOfFrames)
    # Slice positions come from the per-frame functional groups of the vendor header.
    first = series.slice_sources[0].frame
    item = ds.PerFrameFunctionalGroupsSequence[first - 1]
    position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
    assert np.allclose(series.grid.index_to_world(np.array([[0, 0, 0]]))[0], position, atol=1e-3)
    assert float(series.pixels.max()) > 0  # template brain pixels were filled in


def test_mr700_non_parallel_slices_are_refused() -> None:
    with pytest.raises(SeriesGeometryError) as info:
        read_series(dicom_files(mr700_path()), min_slices=3)
    assert info.value.reason == "non_parallel_slices"


@pytest.mark.slow
def test_missing_slice_is_named(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, manifest = simulated_study
    entry = next(e for e in manifest["visits"][1]["series"] if e["sequence"] == "T2")
    case = series_with_missing_slice(root / entry["folder"], tmp_path)
    with pytest.raises(SeriesGeometryError) as info:
        read_series(case.files)
    assert info.value.reason == "missing_slice"
    assert "missing" in str(info.value)


@pytest.mark.slow
def test_too_few_slices_and_mixed_series(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, manifest = simulated_study
    series = {
        e["sequence"]: dicom_files(root / e["folder"]) for e in manifest["visits"][1]["series"]
    }
    with pytest.raises(SeriesGeometryError) as info:
        read_series(series["T2"][:3])
    assert info.value.reason == "too_few_slices"
    with pytest.raises(SeriesGeometryError) as info:
        read_series(series["T2"][:20] + series["PD"][:20])
    assert info.value.reason == "mixed_series"


@pytest.mark.slow
def test_sheared_stack_is_rejected_not_resampled(
    simulated_study: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, manifest = simulated_study
    entry = next(e for e in manifest["visits"][1]["series"] if e["sequence"] == "T2")
    out = tmp_path / "tilted"
    out.mkdir()
    for path in dicom_files(root / entry["folder"]):
        ds = pydicom.dcmread(path)
        # Shift each slice in-plane in proportion to its slice index: a gantry-tilt shear.
        shift = 0.3 * int(ds.InstanceNumber)
        row = np.asarray([float(v) for v in ds.ImageOrientationPatient[:3]])
        ds.ImagePositionPatient = [
            f"{v:.4f}" for v in np.asarray(ds.ImagePositionPatient, float) + shift * row
        ]
        ds.save_as(out / path.name)
    with pytest.raises(SeriesGeometryError) as info:
        read_series(dicom_files(out))
    assert info.value.reason == "gantry_tilt"


def test_source_order_maps_slices_back_to_frames(
    simulated_study: tuple[Path, dict[str, Any]],
) -> None:
    root, manifest = simulated_study
    entry = next(e for e in manifest["visits"][1]["series"] if e["sequence"] == "FLAIR")
    series = read_series(dicom_files(root / entry["folder"]))
    frames = series.source_order(series.pixels)
    ds = pydicom.dcmread(series.files[0])
    raw = ds.pixel_array.astype(np.float32)
    assert np.array_equal(frames, raw)  # identity rescale in simulated data
