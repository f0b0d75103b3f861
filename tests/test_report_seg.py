"""SEG per therapy: frames, references, mask read back (highdicom, dcmqi), empty forecast,
probability SEG, and the overlay rendered from the SEG on the source slices."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import matplotlib.image as mpimg
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ms_forecast_node import __version__
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.report.inputs import ReportInput
from ms_forecast_node.report.keyimages import overlay_rgb
from ms_forecast_node.report.templates import OutputKind

from .report_fixtures import (
    EMPTY_THERAPY,
    FIXTURE_MODEL,
    WrittenCase,
    cached_templates,
    written_case,
)

SEGIMAGE2ITKIMAGE = Path(sys.executable).parent / "segimage2itkimage"
DISCLAIMER_ASCII = "RESEARCH FORECAST - NOT FOR DIAGNOSTIC USE"


Case = WrittenCase


@pytest.fixture(scope="module", params=["enhanced_flair", "classic_t2"])
def case(
    request: pytest.FixtureRequest,
    simulated_study: tuple[Path, dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Case:
    study, _ = simulated_study
    return written_case(study, request.param, tmp_path_factory.mktemp(f"seg_{request.param}"))


def seg_on_grid(seg: hd.seg.Segmentation, report_input: ReportInput) -> np.ndarray:
    """Place every SEG frame on the reference grid through the frame's *own* source reference
    (Derivation Image Sequence), not through the code that wrote it."""
    reference = report_input.reference
    where = {}
    for k, source in enumerate(reference.slice_sources):
        header = reference.headers[source.instance]
        where[(str(header.SOPInstanceUID), source.frame)] = k
    frames = seg.pixel_array.reshape(-1, *reference.grid.shape[1:])
    out = np.zeros(reference.grid.shape, dtype=frames.dtype)
    for n, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(ref.get("ReferencedFrameNumber", 0))
        out[where[(str(ref.ReferencedSOPInstanceUID), frame)]] = frames[n]
    return out


def test_seg_lies_on_the_reference_frames_and_gives_back_the_mask(case: Case) -> None:
    report_input = case.report_input
    reference = report_input.reference
    source_uids = {str(h.SOPInstanceUID) for h in reference.headers}
    for therapy, native in report_input.native.items():
        seg = hd.seg.segread(case.path(OutputKind.SEG, therapy))
        assert seg.SegmentationType == "BINARY"
        assert seg.FrameOfReferenceUID == reference.frame_of_reference_uid
        assert seg.StudyInstanceUID == reference.headers[0].StudyInstanceUID
        assert seg.PatientID == reference.headers[0].PatientID
        assert seg.SeriesInstanceUID != reference.series_instance_uid
        # Every frame kept and every frame references one source frame of the reference.
        assert int(seg.NumberOfFrames) == reference.grid.shape[0]
        referenced = {
            str(s.ReferencedSOPInstanceUID)
            for s in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        }
        assert referenced == source_uids
        assert np.array_equal(seg_on_grid(seg, report_input).astype(bool), native.mask), therapy


def test_seg_mask_via_highdicom_source_frame_lookup(case: Case) -> None:
    """highdicom's own lookup by source instance/frame gives the same mask."""
    report_input = case.report_input
    reference = report_input.reference
    therapy = "placebo"
    seg = hd.seg.segread(case.path(OutputKind.SEG, therapy))
    mask = report_input.native[therapy].mask
    if reference.is_multiframe:
        uid = str(reference.headers[0].SOPInstanceUID)
        frames = [s.frame for s in reference.slice_sources]
        pixels = seg.get_pixels_by_source_frame(uid, source_frame_numbers=frames)
    else:
        uids = [str(reference.headers[s.instance].SOPInstanceUID) for s in reference.slice_sources]
        pixels = seg.get_pixels_by_source_instance(uids)
    assert np.array_equal(pixels[..., 0].astype(bool), mask)


def test_segment_description_and_provenance(case: Case) -> None:
    templates = cached_templates()
    for therapy in case.report_input.native:
        seg = hd.seg.segread(case.path(OutputKind.SEG, therapy))
        segment = seg.get_segment_description(1)
        assert segment.segment_label == "forecast NET2 lesions"
        assert segment.segmented_property_category == hd.sr.CodedConcept("49755003", "SCT", "x")
        assert segment.segmented_property_type == hd.sr.CodedConcept("52988006", "SCT", "x")
        algorithm = segment.algorithm_identification
        assert algorithm is not None
        assert (algorithm[0].AlgorithmName, algorithm[0].AlgorithmVersion) == FIXTURE_MODEL[:2]
        assert algorithm[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # AI
        assert FIXTURE_MODEL[2] in algorithm[0].AlgorithmParameters
        assert "threshold=0.5" in algorithm[0].AlgorithmParameters
        lab = np.asarray(seg.SegmentSequence[0].RecommendedDisplayCIELabValue)
        expected = np.asarray(templates.colour(therapy).as_cielab().value)
        assert np.array_equal(lab, expected)
        assert seg.SeriesDescription.endswith(DISCLAIMER_ASCII)
        assert seg.ContentQualification == "RESEARCH"
        assert seg.Manufacturer == templates.outputs.equipment.manufacturer
        assert f"ms-forecast-node {__version__}" in seg.SoftwareVersions
        descriptions = [
            e.get("ContributionDescription", "") for e in seg.ContributingEquipmentSequence
        ]
        assert any(FIXTURE_MODEL[2] in d and FIXTURE_MODEL[0] in d for d in descriptions)


def test_empty_forecast_keeps_every_frame(case: Case) -> None:
    reference = case.report_input.reference
    assert not case.report_input.native[EMPTY_THERAPY].mask.any()
    seg = hd.seg.segread(case.path(OutputKind.SEG, EMPTY_THERAPY))
    assert int(seg.NumberOfFrames) == reference.grid.shape[0]
    assert len(seg.SegmentSequence) == 1
    assert not seg.pixel_array.any()
    assert seg.get_segment_numbers() == [1]


def test_probability_seg_is_fractional_and_gives_back_the_probability(case: Case) -> None:
    report_input = case.report_input
    therapy = "placebo"
    seg = hd.seg.segread(case.path(OutputKind.PROBABILITY_SEG, therapy))
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    stored = seg_on_grid(seg, report_input).astype(np.float32) / float(seg.MaximumFractionalValue)
    expected = report_input.native[therapy].probability
    assert np.abs(stored - expected).max() <= 0.5 / 255 + 1e-6


@pytest.mark.external
@pytest.mark.slow
@pytest.mark.skipif(
    not SEGIMAGE2ITKIMAGE.exists(), reason="dcmqi (segimage2itkimage) not installed"
)
@pytest.mark.parametrize("therapy", ["placebo", EMPTY_THERAPY])
def test_dcmqi_reads_the_same_mask_on_the_same_voxels(
    case: Case, therapy: str, tmp_path: Path
) -> None:
    reference = case.report_input.reference
    mask = case.report_input.native[therapy].mask
    result = subprocess.run(
        [
            str(SEGIMAGE2ITKIMAGE),
            "--inputDICOM",
            str(case.path(OutputKind.SEG, therapy)),
            "--outputDirectory",
            str(tmp_path),
            "--outputType",
            "nrrd",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    image = sitk.ReadImage(str(tmp_path / "1.nrrd"))
    array = sitk.GetArrayFromImage(image)
    grid = Grid.from_sitk(image)
    # dcmqi's voxels must be the reference's voxels: its index->world map composed with the
    # reference's world->index map is a signed permutation with an integer offset.
    to_reference = np.linalg.inv(reference.grid.affine) @ grid.affine
    assert np.allclose(to_reference[:3, :3], np.round(to_reference[:3, :3]), atol=1e-3)
    assert np.allclose(np.abs(np.round(to_reference[:3, :3])).sum(axis=0), 1.0)
    assert np.allclose(to_reference[:3, 3], np.round(to_reference[:3, 3]), atol=1e-2)
    assert sorted(array.shape) == sorted(reference.grid.shape)
    kji = np.argwhere(array > 0)
    ijk = grid.index_to_world(kji[:, ::-1].astype(float))
    ref_ijk = np.round(reference.grid.world_to_index(ijk)).astype(int)
    got = np.zeros(reference.grid.shape, dtype=bool)
    got[ref_ijk[:, 2], ref_ijk[:, 1], ref_ijk[:, 0]] = True
    assert int(array.astype(bool).sum()) == int(mask.sum())
    assert np.array_equal(got, mask)


def _source_pixels(case: Case, instance: int, frame: int) -> np.ndarray:
    """The stored pixels of one source frame, read from the reference file itself."""
    ds = pydicom.dcmread(case.report_input.reference.files[instance])
    pixels = ds.pixel_array
    return pixels[frame - 1] if frame > 0 else pixels


def test_seg_overlay_rendered_on_source_slices_matches_the_mask(case: Case, tmp_path: Path) -> None:
    """Render the SEG (as read back) over its source frames to PNG and check the colours."""
    report_input = case.report_input
    reference = report_input.reference
    therapy = "placebo"
    seg = hd.seg.segread(case.path(OutputKind.SEG, therapy))
    rgb = hd.color.CIELabColor.from_dicom_value(
        seg.SegmentSequence[0].RecommendedDisplayCIELabValue
    ).to_rgb()
    frames = seg.pixel_array.reshape(-1, *reference.grid.shape[1:])
    busiest = np.argsort(-frames.reshape(len(frames), -1).sum(axis=1).astype(np.int64))[:2]
    where = {
        (str(reference.headers[s.instance].SOPInstanceUID), s.frame): (k, s)
        for k, s in enumerate(reference.slice_sources)
    }
    for n in busiest:
        assert frames[n].any()
        ref = (
            seg.PerFrameFunctionalGroupsSequence[int(n)]
            .DerivationImageSequence[0]
            .SourceImageSequence[0]
        )
        k, source = where[
            (str(ref.ReferencedSOPInstanceUID), int(ref.get("ReferencedFrameNumber", 0)))
        ]
        pixels = _source_pixels(case, source.instance, source.frame)
        window = tuple(float(v) for v in np.percentile(pixels, [1, 99.5]))
        png = tmp_path / f"overlay_{n}.png"
        mpimg.imsave(png, overlay_rgb(pixels, frames[n], rgb, 0.55, (window[0], window[1] + 1.0)))
        image = (mpimg.imread(png)[..., :3] * 255).round().astype(int)
        coloured = (image.max(axis=2) - image.min(axis=2)) > 8
        assert np.array_equal(coloured, report_input.native[therapy].mask[k])


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.external
def test_empty_seg_passes_dciodvfy(case: Case) -> None:
    result = subprocess.run(
        ["dciodvfy", str(case.path(OutputKind.SEG, EMPTY_THERAPY))],
        capture_output=True,
        text=True,
        check=False,
    )
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert errors == []
