"""DICOM test cases for the imaging pipeline, built on demand into a folder the test owns.

Not a test module: ``from .dicom_cases import ...`` from any test. Every builder writes
new files (sources are never modified) and returns what it wrote. Builders that need an
optional encoder call :func:`pytest.skip` with the reason when it is missing, like the
``external`` marker's tests.

Cases (see each function): compressed transfer syntaxes (:func:`encode_series`), a real vendor
Enhanced MR header with template brain pixels (:func:`philips_mprage_with_pixels`), a missing
slice (:func:`series_with_missing_slice`), a localizer-only study
(:func:`localizer_only_study`), a study without FLAIR (:func:`study_without_flair`), a derived
reformat (:func:`derived_copy`) and pydicom's non-parallel series MR700 (:func:`mr700_path`).
"""

from __future__ import annotations

import datetime
import gzip
import io
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    generate_uid,
)
from scipy import ndimage

from ms_forecast_node.anatomy.template import ICBM_FILES, find_icbm_directory
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.simulate.dicom_export import StudyIdentity, acquisition_grid, write_mr_series
from ms_forecast_node.simulate.protocols import (
    AcquisitionProtocol,
    AcquisitionType,
    MRSequence,
    SliceOrientation,
)

__all__ = [
    "LOSSLESS_TRANSFER_SYNTAXES",
    "MissingSlice",
    "derived_copy",
    "dicom_files",
    "encode_series",
    "localizer_only_study",
    "mr700_path",
    "philips_mprage_source",
    "philips_mprage_with_pixels",
    "series_with_missing_slice",
    "study_without_flair",
]

#: The compressed transfer syntaxes the pipeline must read (all lossless, so pixels compare
#: exactly with the source).
LOSSLESS_TRANSFER_SYNTAXES: tuple[UID, ...] = (JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1)

#: dcmtk command lines used when pydicom has no encoder for a transfer syntax (pydicom 3.0
#: has none for JPEG Lossless SV1; dcmtk has none for JPEG 2000).
_DCMTK_ENCODERS: dict[str, list[str]] = {
    JPEGLSLossless: ["dcmcjpls", "+el"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
}
_UID_SEED = "ms-forecast-node test case"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of a folder (not recursive), sorted by InstanceNumber then name."""
    found: list[tuple[int, str, Path]] = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"])
        except pydicom.errors.InvalidDicomError:
            continue
        found.append((int(ds.get("InstanceNumber") or 0), path.name, path))
    return [p for _n, _name, p in sorted(found)]


def _new_uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=[_UID_SEED, *map(str, parts)]))


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_sop_instance_uid(ds: Dataset, uid: str) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)


# --------------------------------------------------------------------------------------------
# Compressed transfer syntaxes
# --------------------------------------------------------------------------------------------
def _encode_with_pydicom(src: Path, dst: Path, transfer_syntax: UID) -> None:
    ds = pydicom.dcmread(src)
    # Lossless compression keeps the SOP Instance UID (PS3.5 §8.2): the pixels do not change.
    ds.compress(transfer_syntax, generate_instance_uid=False)
    _write(ds, dst)


def _encode_with_dcmtk(src: Path, dst: Path, transfer_syntax: UID) -> None:
    command = _DCMTK_ENCODERS.get(transfer_syntax)
    if command is None or shutil.which(command[0]) is None:
        pytest.skip(f"no encoder for {transfer_syntax.name}: pydicom has none and dcmtk is absent")
    dst.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [*command, str(src), str(dst)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed on {src}: {result.stderr.strip()}")


def encode_series(src_dir: Path, dst_dir: Path, transfer_syntax: str) -> list[Path]:
    """Re-encode every DICOM file of ``src_dir`` (a classic series or one Enhanced MR file)
    into ``dst_dir`` with a lossless compressed ``transfer_syntax`` (one of
    :data:`LOSSLESS_TRANSFER_SYNTAXES`), keeping names and UIDs.

    pydicom's encoders (pyjpegls, pylibjpeg-openjpeg) are used where they exist, dcmtk's
    ``dcmcjpls`` / ``dcmcjpeg`` otherwise; skips the calling test when neither is available.
    Returns the written paths in instance order.
    """
    ts = UID(transfer_syntax)
    if ts not in LOSSLESS_TRANSFER_SYNTAXES:
        raise ValueError(f"{ts} is not one of the lossless test transfer syntaxes")
    try:
        use_pydicom = get_encoder(ts).is_available
    except NotImplementedError:  # pydicom 3.0 has no JPEG Lossless SV1 encoder at all
        use_pydicom = False
    written = []
    for src in dicom_files(src_dir):
        dst = Path(dst_dir) / src.name
        if use_pydicom:
            _encode_with_pydicom(src, dst, ts)
        else:
            _encode_with_dcmtk(src, dst, ts)
        written.append(dst)
    if not written:
        raise ValueError(f"no DICOM files in {src_dir}")
    return written


# --------------------------------------------------------------------------------------------
# A real vendor Enhanced MR header with brain pixels
# --------------------------------------------------------------------------------------------
def philips_mprage_source() -> Path:
    """nibabel's Philips Achieva 3D T1 TFE ("MPRAGE_S2") Enhanced MR file, gzipped: 176
    sagittal-ish frames of 256×256 at 1 mm, slightly oblique, all pixels zero."""
    return Path(nib.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"


def _frame_item(ds: Dataset, frame: Dataset, macro: str) -> Dataset:
    """A functional group item of one frame, falling back to the shared groups."""
    if macro in frame:
        return frame[macro].value[0]
    return ds.SharedFunctionalGroupsSequence[0][macro].value[0]


def _template_t1() -> tuple[np.ndarray, Grid]:
    """The ICBM152 2009 T1 (brain only, 0..255) as a ``[k, j, i]`` array and its LPS grid."""
    image = nib.Nifti1Image.from_filename(find_icbm_directory() / ICBM_FILES["t1"])
    data = np.asarray(image.dataobj, dtype=np.float32)
    grid = Grid.from_nifti_affine(data.shape, image.affine)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), grid


def philips_mprage_with_pixels(dst_dir: Path) -> Path:
    """Fill the Philips MPRAGE frames with the ICBM152 T1 template and write a valid file.

    Every frame is sampled (trilinear) at its own Image Position / Orientation / Pixel
    Spacing, so the header's geometry is kept exactly; the template is only translated so
    that its brain lies in the middle of the field of view. Pixel values are template × 12
    (≤ 3060, Bits Stored 12), the frame VOI windows are set to match, the SOP Instance UID
    is new (the pixels differ from the original's) and every other attribute, private ones
    included, is the vendor's. The header's own dciodvfy errors (VelocityEncodingDirection
    and SlabOrientation of 0\\0\\0) are kept: real vendor files have such errors.
    Returns the path of ``dst_dir/philips_mprage.dcm``.
    """
    with gzip.open(philips_mprage_source()) as fh:
        ds = pydicom.dcmread(io.BytesIO(fh.read()))
    brain, grid = _template_t1()
    frames = ds.PerFrameFunctionalGroupsSequence
    rows, cols = int(ds.Rows), int(ds.Columns)
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    planes = []
    for frame in frames:
        ipp = np.asarray(_frame_item(ds, frame, "PlanePositionSequence").ImagePositionPatient)
        iop = np.asarray(_frame_item(ds, frame, "PlaneOrientationSequence").ImageOrientationPatient)
        spacing = _frame_item(ds, frame, "PixelMeasuresSequence").PixelSpacing
        # PixelSpacing = (between rows, between columns); IOP = (row direction, column direction)
        planes.append((ipp.astype(float), iop.astype(float), float(spacing[0]), float(spacing[1])))
    centers = [
        ipp + iop[:3] * dc * (cols - 1) / 2 + iop[3:] * dr * (rows - 1) / 2
        for ipp, iop, dr, dc in planes
    ]
    fov_center = np.mean(centers, axis=0)
    brain_center = grid.index_to_world(np.asarray(ndimage.center_of_mass(brain > 0))[None, ::-1])[0]
    shift = brain_center - fov_center
    pixels = np.zeros((len(planes), rows, cols), dtype=np.uint16)
    for f, (ipp, iop, dr, dc) in enumerate(planes):
        world = ipp + ii[..., None] * dc * iop[:3] + jj[..., None] * dr * iop[3:] + shift
        ijk = grid.world_to_index(world.reshape(-1, 3))
        values = ndimage.map_coordinates(brain, ijk[:, ::-1].T, order=1, cval=0.0)
        pixels[f] = np.rint(np.clip(values, 0, 255) * 12).astype(np.uint16).reshape(rows, cols)
    ds.PixelData = pixels.tobytes()
    slope = float(_frame_item(ds, frames[0], "PixelValueTransformationSequence").RescaleSlope)
    inside = pixels[pixels > 0]
    lo, hi = (float(v) * slope for v in np.percentile(inside, [1, 99]))
    for frame in frames:
        if "FrameVOILUTSequence" in frame:
            voi = frame.FrameVOILUTSequence[0]
            voi.WindowCenter = f"{(lo + hi) / 2:.1f}"
            voi.WindowWidth = f"{hi - lo:.1f}"
    _set_sop_instance_uid(ds, _new_uid(ds.SOPInstanceUID, "template pixels"))
    ds.ImageComments = "ICBM152 2009 T1 template pixels on a Philips header (test case)"
    return _write(ds, Path(dst_dir) / "philips_mprage.dcm")


# --------------------------------------------------------------------------------------------
# Negative cases
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MissingSlice:
    """A classic series with one middle slice removed."""

    folder: Path
    files: tuple[Path, ...]
    dropped_instance_number: int
    dropped_position: tuple[float, float, float]  # its Image Position (Patient)


def series_with_missing_slice(src_dir: Path, dst_dir: Path) -> MissingSlice:
    """Copy a classic single-frame series without its middle instance (by InstanceNumber):
    the remaining slices have one gap of twice the slice spacing; UIDs are unchanged."""
    files = dicom_files(src_dir)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    if len(files) < 3 or any(int(h.get("NumberOfFrames") or 1) > 1 for h in headers):
        raise ValueError(f"{src_dir} is not a classic series of at least 3 slices")
    middle = len(files) // 2
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    kept = []
    for n, path in enumerate(files):
        if n != middle:
            kept.append(Path(shutil.copy2(path, dst / path.name)))
    position = tuple(float(v) for v in headers[middle].ImagePositionPatient)
    return MissingSlice(
        dst,
        tuple(kept),
        int(headers[middle].InstanceNumber),
        (position[0], position[1], position[2]),
    )


def _localizer_protocol(orientation: SliceOrientation) -> AcquisitionProtocol:
    # Three 8 mm slices 12 mm apart, 128 × 128 at 2 mm: a typical fast gradient-echo scout.
    return AcquisitionProtocol(
        name=f"localizer_{orientation.value.lower()}",
        sequence=MRSequence.T1,
        series_description="3-plane localizer",
        orientation=orientation,
        acquisition_type=AcquisitionType.TWO_D,
        pixel_spacing_mm=2.0,
        slice_thickness_mm=8.0,
        slice_gap_mm=4.0,
        field_of_view_mm=(256.0, 256.0, 36.0),
        repetition_time_ms=8.6,
        echo_time_ms=4.0,
        inversion_time_ms=None,
        flip_angle_deg=20.0,
        echo_train_length=1,
        scanning_sequence=("GR",),
        sequence_variant=("SP",),
        scan_options=(),
        sequence_name="*fl2d1",
    )


def _head_phantom(grid: Grid) -> np.ndarray:
    """An ellipsoidal 'head' (1000) with a darker core, enough to look like a scout."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    xyz = grid.index_to_world(np.stack([i, j, k], axis=-1).reshape(-1, 3)).reshape(*grid.shape, 3)
    r = np.sqrt(((xyz / np.array([75.0, 95.0, 80.0])) ** 2).sum(axis=-1))
    return np.where(r < 1.0, np.where(r < 0.6, 600.0, 1000.0), 0.0).astype(np.float32)


def localizer_only_study(dst_dir: Path) -> Path:
    """A study holding only a 3-plane localizer: one series "3-plane localizer" of 9 slices
    (3 sagittal, 3 coronal, 3 axial), ImageType ORIGINAL\\PRIMARY\\LOCALIZER, written with
    the simulator's DICOM writer. Returns the series folder ``dst_dir/01_localizer``."""
    when = datetime.datetime(2024, 3, 5, 9, 30)
    study_uid = _new_uid("localizer-only", "study")
    identity = StudyIdentity(
        patient_name="SIM^LOCALIZER",
        patient_id="SIM-LOC-1",
        patient_birth_date="19800101",
        patient_sex="F",
        study_instance_uid=study_uid,
        study_date=when.strftime("%Y%m%d"),
        study_time=when.strftime("%H%M%S"),
    )
    series_uid = _new_uid("localizer-only", "series")
    frame_of_reference = _new_uid("localizer-only", "for")
    folder = Path(dst_dir) / "01_localizer"
    folder.mkdir(parents=True, exist_ok=True)
    number = 0
    with tempfile.TemporaryDirectory(dir=dst_dir) as tmp:
        for plane in (SliceOrientation.SAGITTAL, SliceOrientation.CORONAL, SliceOrientation.AXIAL):
            protocol = _localizer_protocol(plane)
            grid = acquisition_grid(protocol, (0.0, 0.0, 10.0))
            paths = write_mr_series(
                _head_phantom(grid),
                grid,
                protocol,
                identity,
                series_number=1,
                series_instance_uid=series_uid,
                frame_of_reference_uid=frame_of_reference,
                uid_prefix_seed=f"localizer-{plane.value}",
                out_dir=Path(tmp) / plane.value,
                acquisition_datetime=when,
            )
            for path in paths:
                number += 1
                ds = pydicom.dcmread(path)
                ds.InstanceNumber = number
                ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
                _write(ds, folder / f"IM{number:04d}.dcm")
    return folder


def _is_flair(ds: Dataset) -> bool:
    description = f"{ds.get('SeriesDescription', '')} {ds.get('ProtocolName', '')}".upper()
    return "FLAIR" in description or ds.get("AcquisitionContrast") == "FLUID_ATTENUATED"


def study_without_flair(src_study_dicom_dir: Path, dst_dir: Path) -> Path:
    """Copy one simulated visit (``OUT/dicom/baseline``: one sub-folder per series) without
    its FLAIR series (recognised from its header, not by folder name). Returns ``dst_dir``."""
    src = Path(src_study_dicom_dir)
    removed = 0
    for series_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        files = dicom_files(series_dir)
        if not files:
            continue
        if _is_flair(pydicom.dcmread(files[0], stop_before_pixels=True)):
            removed += 1
            continue
        shutil.copytree(series_dir, Path(dst_dir) / series_dir.name)
    if removed == 0:
        raise ValueError(f"{src} has no FLAIR series to leave out")
    return Path(dst_dir)


def derived_copy(
    src_dir: Path,
    dst_dir: Path,
    *,
    image_type: Sequence[str] = ("DERIVED", "SECONDARY", "MPR"),
    description_suffix: str = " MPR",
    edit: Callable[[Dataset], None] | None = None,
) -> list[Path]:
    """Copy a series as a new derived series (a scanner-made reformat): new Series and SOP
    Instance UIDs, SeriesNumber + 1000, ``image_type`` and ``description_suffix`` appended
    to the description; ``edit`` may change each dataset further. Pixels are unchanged."""
    files = dicom_files(src_dir)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series_uid = _new_uid(first.SeriesInstanceUID, "derived", *image_type, description_suffix)
    written = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        _set_sop_instance_uid(ds, _new_uid(series_uid, ds.SOPInstanceUID))
        ds.SeriesNumber = int(ds.get("SeriesNumber") or 0) + 1000
        ds.SeriesDescription = f"{ds.get('SeriesDescription', '')}{description_suffix}"[:64]
        ds.ImageType = list(image_type)
        if edit is not None:
            edit(ds)
        written.append(_write(ds, Path(dst_dir) / path.name))
    return written


def mr700_path() -> Path:
    """pydicom's test series MR700: the folder ``dicomdirtests/98892003/MR700``.

    MR700 is a folder, not a file. Its 7 files (4467, 4528, 4558, 4588, 4618, 4648, 4678)
    are one complete series: SeriesInstanceUID ...18148.0.118, SeriesNumber 700, Instance
    Numbers 1–7, "ANGIO Projected from   C", ImageType DERIVED\\SECONDARY\\PROJECTION IMAGE,
    a 1.5 T Philips MR angiogram (Brain-MRA study of patient 98890234), 16×16 pixels (the
    test data were down-sampled), 0.39 mm pixels. They are maximum-intensity projections of
    the same 3D angiogram viewed from 7 angles: the column direction is (nearly) -S for all,
    while the row direction turns about the head's S–I axis by ~16.4° per image (0.1°,
    16.4°, 32.8°, 49.2°, 65.5°, 81.9°, 98.2°). The slice normals therefore differ by up to
    98° — a fan of planes, not a stack of parallel slices: a series reader must refuse them
    (non_parallel_slices). Their Images in Acquisition is 12, but the other 5 projections
    are not in pydicom's data; the sibling folders MR1 and MR2 are other series (localizers)
    of the same study, not needed. Note the series inventory skips MR700 as a derived
    projection before any geometry check; read it with the series reader directly (or with
    ``skip.derived.keep: true``) to exercise the geometry error.
    """
    folder = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892003"
    return folder / "MR700"
