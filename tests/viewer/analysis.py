"""What the OHIF check compares: the SEG file's own geometry against the viewer's pixels.

The expected overlay is read from the SEG *file* (frame positions, orientation, pixel spacing,
recommended display colour), not from our builders' inputs, so the check holds the viewer to
what the DICOM object says. The seen overlay is the difference between two screenshots of the
same view — segmentation shown, segmentation hidden — inside the viewport's canvas; each of
those pixels is mapped to patient space with canvas->world samples taken from cornerstone.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from scipy.spatial import cKDTree

#: A pixel belongs to the overlay when shown and hidden differ by more than this (sum of
#: absolute RGB differences): well above PNG/SwiftShader noise, well below a 0.5-alpha fill.
DIFF_THRESHOLD = 24
#: Page pixels at the canvas's right edge left out of the comparison (OHIF's stack scrollbar).
SCROLLBAR_MARGIN = 28


@dataclass(frozen=True)
class SegFile:
    """One single-segment SEG as the file states it."""

    path: Path
    series_instance_uid: str
    study_instance_uid: str
    source_series_instance_uid: str  # the series the SEG was drawn on (Referenced Series)
    labels: tuple[str, ...]
    rgb: tuple[int, int, int]  # recommended display colour of segment 1
    frame_positions: np.ndarray  # (F, 3) ImagePositionPatient per frame, LPS mm
    row_direction: np.ndarray  # unit vector along a row (increasing column index)
    column_direction: np.ndarray  # unit vector along a column (increasing row index)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    normal: np.ndarray
    slice_spacing: float
    frames: np.ndarray  # (F, rows, cols) bool

    @property
    def empty(self) -> bool:
        return not bool(self.frames.any())

    def busiest_frame(self) -> int:
        return int(self.frames.reshape(len(self.frames), -1).sum(axis=1).argmax())

    def focus_frame(self) -> int:
        """The frame to look at: the most foreground, or for an empty SEG the middle one along
        the slice normal (brain rather than the edge of the head, where OHIF would stay)."""
        if not self.empty:
            return self.busiest_frame()
        order = np.argsort(self.frame_positions @ self.normal)
        return int(order[len(order) // 2])

    def frame_centre(self, frame: int) -> tuple[float, float, float]:
        """World position (LPS mm) of the centre of a frame."""
        rows, cols = self.frames.shape[1:]
        dr, dc = self.pixel_spacing
        centre = (
            self.frame_positions[frame]
            + (cols - 1) / 2 * dc * self.row_direction
            + (rows - 1) / 2 * dr * self.column_direction
        )
        return (float(centre[0]), float(centre[1]), float(centre[2]))

    def frame_points(self, frame: int) -> np.ndarray:
        """(N, 3) world positions (LPS mm) of the foreground pixel centres of one frame."""
        rows, cols = np.nonzero(self.frames[frame])
        dr, dc = self.pixel_spacing
        return np.asarray(
            self.frame_positions[frame][None, :]
            + cols[:, None] * dc * self.row_direction[None, :]
            + rows[:, None] * dr * self.column_direction[None, :]
        )

    def frame_centroid(self, frame: int) -> tuple[float, float, float]:
        centre = self.frame_points(frame).mean(axis=0)
        return (float(centre[0]), float(centre[1]), float(centre[2]))

    def frames_on_plane(self, point: np.ndarray, normal: np.ndarray) -> list[int]:
        """Frames whose plane lies within half a slice of the plane through ``point``."""
        offsets = np.abs((self.frame_positions - point[None, :]) @ normal)
        return [int(f) for f in np.nonzero(offsets < 0.5 * self.slice_spacing)[0]]


def read_seg(path: Path) -> SegFile:
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(
        shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float
    )
    measures = shared.PixelMeasuresSequence[0]
    spacing = (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1]))
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    positions = np.asarray(
        [
            item.PlanePositionSequence[0].ImagePositionPatient
            for item in ds.PerFrameFunctionalGroupsSequence
        ],
        dtype=float,
    )
    # With a single segment, highdicom puts Segment Identification in the shared groups.
    segment_numbers = {
        int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for group in [shared, *ds.PerFrameFunctionalGroupsSequence]
        if "SegmentIdentificationSequence" in group
    }
    if segment_numbers != {1} or len(ds.SegmentSequence) != 1:
        raise ValueError(f"{path}: the check expects one segment, got {segment_numbers}")
    pixels = ds.pixel_array.reshape(len(positions), int(ds.Rows), int(ds.Columns))
    segment = ds.SegmentSequence[0]
    lab = hd.color.CIELabColor.from_dicom_value(
        tuple(int(v) for v in segment.RecommendedDisplayCIELabValue)
    )
    along = np.sort(positions @ normal)
    steps = np.diff(along)
    slice_spacing = float(np.median(steps)) if len(steps) else float(measures.SliceThickness)
    return SegFile(
        path=Path(path),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        source_series_instance_uid=str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID),
        labels=tuple(str(s.SegmentLabel) for s in ds.SegmentSequence),
        rgb=tuple(int(c) for c in lab.to_rgb()),  # type: ignore[arg-type]
        frame_positions=positions,
        row_direction=row_direction,
        column_direction=column_direction,
        pixel_spacing=spacing,
        normal=normal,
        slice_spacing=slice_spacing,
        frames=pixels > 0,
    )


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue (0..360) of (N, 3) RGB values. Blending a colour with grey anatomy adds the same
    amount to every channel, which leaves the hue unchanged: the overlay keeps the hue of the
    segment colour whatever the grey below it."""
    rgb = np.asarray(rgb, dtype=float)
    mx, mn = rgb.max(axis=1), rgb.min(axis=1)
    chroma = np.where(mx - mn == 0, 1.0, mx - mn)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    h = np.where(
        mx == r,
        ((g - b) / chroma) % 6,
        np.where(mx == g, (b - r) / chroma + 2, (r - g) / chroma + 4),
    )
    return np.asarray(h * 60.0)


def hue_of(rgb: tuple[int, int, int]) -> float:
    return float(colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360.0)


def hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    d = np.abs(np.asarray(a) - b) % 360.0
    return np.minimum(d, 360.0 - d)


@dataclass(frozen=True)
class OverlayPixels:
    """Pixels (page coordinates) where the shown and hidden screenshots differ in the canvas."""

    xy: np.ndarray  # (N, 2) page x, y
    rgb_shown: np.ndarray  # (N, 3)
    canvas_box: tuple[int, int, int, int]  # left, top, right, bottom (page px)

    @property
    def count(self) -> int:
        return len(self.xy)


def overlay_pixels(shown: Path, hidden: Path, geometry: dict[str, Any]) -> OverlayPixels:
    a = np.asarray(Image.open(shown).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(hidden).convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        raise ValueError(f"screenshots differ in size: {a.shape} vs {b.shape}")
    rect = geometry["canvasRect"]
    # Whole pixels strictly inside the canvas: the viewport border and the side panels (whose
    # eye icons change with the visibility) stay out, and so does the stack scrollbar along
    # the canvas's right edge, which fills in as OHIF keeps prefetching slices.
    left, top = int(np.ceil(rect["left"])) + 2, int(np.ceil(rect["top"])) + 2
    right = int(rect["left"] + rect["width"]) - SCROLLBAR_MARGIN
    bottom = int(rect["top"] + rect["height"]) - 2
    diff = np.abs(a - b).sum(axis=2)
    window = np.zeros(diff.shape, dtype=bool)
    window[top:bottom, left:right] = True
    ys, xs = np.nonzero((diff > DIFF_THRESHOLD) & window)
    return OverlayPixels(
        xy=np.stack([xs, ys], axis=1),
        rgb_shown=a[ys, xs].astype(float),
        canvas_box=(left, top, right, bottom),
    )


def page_to_world(xy: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """Page pixels (their centres) -> LPS mm, from cornerstone's canvasToWorld samples."""
    rect = geometry["canvasRect"]
    samples = geometry["canvasToWorld"]
    origin = np.asarray(samples["origin"], dtype=float)
    per_x = (np.asarray(samples["x100"], dtype=float) - origin) / 100.0
    per_y = (np.asarray(samples["y100"], dtype=float) - origin) / 100.0
    cx = xy[:, 0] + 0.5 - rect["left"]
    cy = xy[:, 1] + 0.5 - rect["top"]
    return np.asarray(origin[None, :] + cx[:, None] * per_x[None, :] + cy[:, None] * per_y[None, :])


def screen_directions(geometry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (LPS) of screen right and screen down in the displayed view."""
    samples = geometry["canvasToWorld"]
    origin = np.asarray(samples["origin"], dtype=float)
    across = np.asarray(samples["x100"], dtype=float) - origin
    down = np.asarray(samples["y100"], dtype=float) - origin
    return across / np.linalg.norm(across), down / np.linalg.norm(down)


def world_to_page(points: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`page_to_world` for points on the displayed plane."""
    rect = geometry["canvasRect"]
    samples = geometry["canvasToWorld"]
    origin = np.asarray(samples["origin"], dtype=float)
    per_x = (np.asarray(samples["x100"], dtype=float) - origin) / 100.0
    per_y = (np.asarray(samples["y100"], dtype=float) - origin) / 100.0
    rel = np.asarray(points, dtype=float) - origin[None, :]
    cx = rel @ per_x / (per_x @ per_x)
    cy = rel @ per_y / (per_y @ per_y)
    return np.stack([cx + rect["left"], cy + rect["top"]], axis=1)


@dataclass(frozen=True)
class PlacementCheck:
    """How well the seen overlay matches the SEG's foreground on the displayed plane."""

    frames: list[int]  # SEG frames on the displayed plane
    expected_pixels: int  # SEG foreground pixels on the plane
    overlay_pixels: int
    on_mask: float  # fraction of overlay pixels within tolerance of a foreground pixel
    covered: float  # fraction of foreground pixels (inside the canvas) under the overlay
    hue_ok: float  # fraction of overlay pixels within tolerance of the segment's hue
    median_hue: float | None


def check_placement(
    seg: SegFile,
    overlay: OverlayPixels,
    geometry: dict[str, Any],
    *,
    tolerance_mm: float,
    hue_tolerance: float = 20.0,
) -> PlacementCheck:
    focal = np.asarray(geometry["focalPoint"], dtype=float)
    normal = np.asarray(geometry["viewPlaneNormal"], dtype=float)
    frames = seg.frames_on_plane(focal, normal)
    expected = np.concatenate([seg.frame_points(f) for f in frames]) if frames else np.zeros((0, 3))
    on_mask = covered = 0.0
    if len(expected) and overlay.count:
        world = page_to_world(overlay.xy, geometry)
        # Distance within the plane: both sets lie on it up to rounding.
        distance, _ = cKDTree(expected).query(world)
        on_mask = float((distance <= tolerance_mm).mean())
        page = world_to_page(expected, geometry)
        left, top, right, bottom = overlay.canvas_box
        x, y = page[:, 0], page[:, 1]
        inside = (x >= left) & (x < right) & (y >= top) & (y < bottom)
        if inside.any():
            # A foreground pixel is covered when an overlay pixel lies within ~1 screen pixel
            # of where it projects.
            near, _ = cKDTree(overlay.xy.astype(float)).query(page[inside])
            covered = float((near <= 1.5).mean())
    hues = hue_degrees(overlay.rgb_shown) if overlay.count else np.zeros(0)
    target = hue_of(seg.rgb)
    return PlacementCheck(
        frames=frames,
        expected_pixels=len(expected),
        overlay_pixels=overlay.count,
        on_mask=on_mask,
        covered=covered,
        hue_ok=float((hue_distance(hues, target) <= hue_tolerance).mean()) if len(hues) else 0.0,
        median_hue=float(np.median(hues)) if len(hues) else None,
    )
