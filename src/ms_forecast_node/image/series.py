"""One DICOM series as a volume that keeps its geometry and its way back to the source frames.

Classic MR (one slice per file) and Enhanced MR (one multi-frame file) are read with pydicom,
which decodes compressed transfer syntaxes through its pylibjpeg / pyjpegls plugins. The
geometry is assembled here rather than by SimpleITK's series reader or dicom2nifti because the
outputs need, for every slice of the volume, the instance and frame it came from: the DICOM SEG
references its source frames one by one. Validation raises a typed :class:`SeriesGeometryError`
(with its own ``reason``) instead of skipping: missing slices, inconsistent spacing, non-parallel
slices, gantry tilt (sheared stacks are rejected, not resampled), too few slices, mixed series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from ms_forecast_node.errors import PixelDataError, SeriesGeometryError
from ms_forecast_node.image.geometry import Grid

#: Below this many slices a series cannot be registered as a volume.
MIN_SLICES = 8
#: Direction cosines may differ by this much (about 0.6°) and still count as parallel.
ORIENTATION_TOLERANCE = 0.01
#: Relative deviation of a slice step from the median step tolerated as rounding.
SPACING_TOLERANCE = 0.1


@dataclass(frozen=True)
class SliceSource:
    """Where slice ``k`` of a volume came from: ``headers[instance]``, 1-based ``frame``
    (0 for a single-frame instance)."""

    instance: int
    frame: int


@dataclass(frozen=True)
class SeriesVolume:
    """A series as a volume on its own grid, sorted along the slice normal.

    ``pixels[k]`` is the slice at grid index ``k``; ``slice_sources[k]`` says which instance
    (and frame) it is, so a mask on ``grid`` maps back to source frames exactly.
    ``headers`` are the source datasets without their pixel data, in file order.
    """

    series_instance_uid: str
    grid: Grid
    pixels: np.ndarray  # float32, (K, rows, cols), rescaled (slope/intercept applied)
    headers: tuple[Dataset, ...]
    slice_sources: tuple[SliceSource, ...]
    files: tuple[Path, ...] = ()

    @property
    def is_multiframe(self) -> bool:
        return any(s.frame > 0 for s in self.slice_sources)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.headers[0].FrameOfReferenceUID)

    def to_sitk(self) -> sitk.Image:
        return self.grid.to_sitk(self.pixels)

    def source_order(self, volume: np.ndarray) -> np.ndarray:
        """Re-order a volume on ``grid`` into source order: (instance, frame) ascending.

        For a multi-frame source this is the frame order of that instance, which is the
        order highdicom expects segmentation frames in.
        """
        if volume.shape != self.grid.shape:
            raise ValueError(f"volume {volume.shape} is not on the series grid {self.grid.shape}")
        order = sorted(range(len(self.slice_sources)), key=lambda k: self._source_key(k))
        return volume[np.asarray(order)]

    def source_datasets(self) -> list[Dataset]:
        """Source instances in the order of :meth:`source_order`'s frames (single-frame) or
        the one multi-frame instance."""
        if self.is_multiframe:
            return [self.headers[self.slice_sources[0].instance]]
        order = sorted(range(len(self.slice_sources)), key=lambda k: self._source_key(k))
        return [self.headers[self.slice_sources[k].instance] for k in order]

    def _source_key(self, k: int) -> tuple[int, int]:
        s = self.slice_sources[k]
        return (s.instance, s.frame)


# --- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slice:
    instance: int
    frame: int
    position: np.ndarray  # ImagePositionPatient, LPS mm
    row_cosine: np.ndarray  # direction of increasing column index
    col_cosine: np.ndarray  # direction of increasing row index
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    slope: float
    intercept: float


def _floats(value: object, n: int, what: str, where: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise SeriesGeometryError(
            f"{where}: unreadable {what} {value!r}", reason="geometry_missing"
        ) from exc
    if out.shape != (n,):
        raise SeriesGeometryError(
            f"{where}: {what} has {out.size} values, expected {n}", reason="geometry_missing"
        )
    return out


def _item(ds: Dataset, sequence: str) -> Dataset | None:
    seq = ds.get(sequence)
    return seq[0] if seq else None


def _functional(
    frame_groups: Dataset | None, shared: Dataset | None, sequence: str
) -> Dataset | None:
    """Per-frame functional group item, falling back to the shared one (PS3.3 C.7.6.16)."""
    for groups in (frame_groups, shared):
        if groups is not None and sequence in groups:
            item = _item(groups, sequence)
            if item is not None:
                return item
    return None


def _slices_of(ds: Dataset, instance: int, where: str) -> list[_Slice]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = _item(ds, "SharedFunctionalGroupsSequence")
        out = []
        for f, frame_groups in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
            pos = _functional(frame_groups, shared, "PlanePositionSequence")
            ori = _functional(frame_groups, shared, "PlaneOrientationSequence")
            meas = _functional(frame_groups, shared, "PixelMeasuresSequence")
            if pos is None or ori is None or meas is None:
                raise SeriesGeometryError(
                    f"{where} frame {f}: plane position, orientation or pixel measures missing",
                    reason="geometry_missing",
                )
            pvt = _functional(frame_groups, shared, "PixelValueTransformationSequence")
            iop = _floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", where)
            ps = _floats(meas.PixelSpacing, 2, "PixelSpacing", where)
            out.append(
                _Slice(
                    instance,
                    f,
                    _floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", where),
                    iop[:3],
                    iop[3:],
                    (float(ps[0]), float(ps[1])),
                    float(pvt.get("RescaleSlope", 1.0)) if pvt is not None else 1.0,
                    float(pvt.get("RescaleIntercept", 0.0)) if pvt is not None else 0.0,
                )
            )
        return out
    if n_frames > 1:
        raise SeriesGeometryError(
            f"{where}: multi-frame instance without per-frame functional groups "
            "(legacy multi-frame is not supported)",
            reason="unsupported_multiframe",
        )
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds:
            raise SeriesGeometryError(f"{where}: {keyword} missing", reason="geometry_missing")
    iop = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", where)
    ps = _floats(ds.PixelSpacing, 2, "PixelSpacing", where)
    return [
        _Slice(
            instance,
            0,
            _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", where),
            iop[:3],
            iop[3:],
            (float(ps[0]), float(ps[1])),
            float(ds.get("RescaleSlope", 1.0) or 1.0),
            float(ds.get("RescaleIntercept", 0.0) or 0.0),
        )
    ]


def _check_consistent(datasets: Sequence[Dataset], files: Sequence[Path]) -> None:
    def distinct(keyword: str) -> set[str]:
        return {str(ds.get(keyword, "")) for ds in datasets}

    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        values = distinct(keyword)
        if len(values) > 1:
            raise SeriesGeometryError(
                f"series in {files[0].parent} mixes {len(values)} values of {keyword}: "
                f"{sorted(values)[:3]}",
                reason="mixed_series",
            )


def _geometry(slices: list[_Slice], where: str, min_slices: int) -> tuple[list[_Slice], Grid]:
    """Sort slices along their normal and validate that they form one regular grid."""
    if len(slices) < min_slices:
        raise SeriesGeometryError(
            f"{where}: {len(slices)} slices, at least {min_slices} needed for a volume",
            reason="too_few_slices",
        )
    row, col = slices[0].row_cosine, slices[0].col_cosine
    for s in slices[1:]:
        if (
            np.abs(s.row_cosine - row).max() > ORIENTATION_TOLERANCE
            or np.abs(s.col_cosine - col).max() > ORIENTATION_TOLERANCE
        ):
            raise SeriesGeometryError(
                f"{where}: slices are not parallel (orientation {np.round(row, 3).tolist()}/"
                f"{np.round(col, 3).tolist()} vs {np.round(s.row_cosine, 3).tolist()}/"
                f"{np.round(s.col_cosine, 3).tolist()})",
                reason="non_parallel_slices",
            )
    spacings = {s.spacing for s in slices}
    if len({(round(a, 4), round(b, 4)) for a, b in spacings}) > 1:
        raise SeriesGeometryError(
            f"{where}: pixel spacing differs between slices", reason="mixed_series"
        )
    normal = np.cross(row, col)
    slices = sorted(slices, key=lambda s: float(s.position @ normal))
    along = np.asarray([s.position @ normal for s in slices])
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        raise SeriesGeometryError(
            f"{where}: {int(np.sum(steps < 1e-3)) + 1} slices share a position "
            "(several echoes, phases or stacks in one series)",
            reason="duplicate_slices",
        )
    step = float(np.median(steps))
    deviation = np.abs(steps - step) / step
    if deviation.max() > SPACING_TOLERANCE:
        worst = int(np.argmax(deviation))
        ratio = steps[worst] / step
        if abs(ratio - round(ratio)) < SPACING_TOLERANCE and round(ratio) >= 2:
            raise SeriesGeometryError(
                f"{where}: {round(ratio) - 1} slice(s) missing between positions "
                f"{along[worst]:.2f} and {along[worst + 1]:.2f} mm (step {step:.2f} mm)",
                reason="missing_slice",
            )
        raise SeriesGeometryError(
            f"{where}: slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm",
            reason="inconsistent_spacing",
        )
    # Each slice must sit on the normal through the first one: an in-plane drift means a
    # sheared stack (gantry tilt on CT, or a tilted stack on MR). We reject rather than
    # resample, because resampling would put the forecast back on voxels that are not the
    # radiologist's.
    first = slices[0].position
    for s, d in zip(slices[1:], along[1:] - along[0], strict=True):
        drift = s.position - (first + d * normal)
        if np.linalg.norm(drift) > 0.05 * max(step, 1.0) + 0.01 * abs(d):
            raise SeriesGeometryError(
                f"{where}: slice positions drift in-plane by {np.linalg.norm(drift):.2f} mm "
                "(gantry tilt or sheared stack); rejected rather than resampled",
                reason="gantry_tilt",
            )
    row_spacing, col_spacing = slices[0].spacing
    affine = np.eye(4)
    affine[:3, 0] = row * col_spacing  # i: along a row, column index increases
    affine[:3, 1] = col * row_spacing  # j: down a column, row index increases
    if len(slices) > 1:
        affine[:3, 2] = (slices[-1].position - first) / (len(slices) - 1)
    else:
        affine[:3, 2] = normal * max(step, 1.0)
    affine[:3, 3] = first
    return slices, Grid((len(slices), 0, 0), affine)


def _frame_pixels(ds: Dataset, where: str) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for undecodable data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise PixelDataError(
            f"{where}: pixel data cannot be decoded (transfer syntax {name}): {exc}"
        ) from exc
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise PixelDataError(
            f"{where}: colour images are not MR magnitude data", reason="pixel_data_unsupported"
        )
    return np.asarray(pixels)


def read_series(paths: Sequence[Path], *, min_slices: int = MIN_SLICES) -> SeriesVolume:
    """Read one series (classic or Enhanced MR, any transfer syntax pydicom can decode).

    Raises :class:`SeriesGeometryError` or :class:`PixelDataError` with a specific reason.
    """
    files = tuple(sorted(Path(p) for p in paths))
    if not files:
        raise SeriesGeometryError("no files given for the series", reason="too_few_slices")
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except Exception as exc:
            raise PixelDataError(
                f"{f}: not a readable DICOM file: {exc}", reason="file_unreadable"
            ) from exc
    _check_consistent(datasets, files)
    where = f"series {datasets[0].get('SeriesNumber', '?')} ({files[0].parent.name})"
    slices = [s for i, ds in enumerate(datasets) for s in _slices_of(ds, i, where)]
    slices, grid = _geometry(slices, where, min_slices)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    grid = Grid((len(slices), rows, cols), grid.affine)
    decoded = [_frame_pixels(ds, where) for ds in datasets]
    volume = np.empty(grid.shape, dtype=np.float32)
    for k, s in enumerate(slices):
        frame = (
            decoded[s.instance]
            if s.frame == 0
            else decoded[s.instance].reshape(-1, rows, cols)[s.frame - 1]
        )
        volume[k] = frame.astype(np.float32) * s.slope + s.intercept
    headers = []
    for ds in datasets:
        header = ds.copy()
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in header:
                del header[keyword]
        headers.append(header)
    return SeriesVolume(
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
        grid=grid,
        pixels=volume,
        headers=tuple(headers),
        slice_sources=tuple(SliceSource(s.instance, s.frame) for s in slices),
        files=files,
    )
