"""Key images: each therapy's forecast blended onto reference slices, with a legend.

For PACS viewers that cannot show DICOM SEG. Slices are the reference series' own slices in
their stored orientation, chosen where the forecast has the most lesion voxels (at least
``min_separation_mm`` apart so three key images do not show the same lesion three times); an
empty forecast shows the middle slice with the "no forecast lesion" text. The overlay is a
plain alpha blend of the therapy colour on mask voxels only, no outline: a coloured pixel in
the image part means a forecast voxel and nothing else (the tests check exactly that).
Rendering uses matplotlib's Agg canvas without pyplot (no global state, no display).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from pydicom.dataset import Dataset

from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.report.inputs import Provenance, ReportInput, TherapyView
from ms_forecast_node.report.templates import OutputKind, Templates
from ms_forecast_node.report.uids import contributing_equipment, object_identity, stamp_equipment

#: Height of the legend band under the image, in pixels.
LEGEND_PX = 132
_DPI = 100
#: LPS axis letters (DICOM Patient Orientation): +x left, +y posterior, +z head.
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


class BurnedInAnnotation(str, enum.Enum):
    """Burned In Annotation (0028,0301): does the pixel data identify the patient?"""

    YES = "YES"
    NO = "NO"


class ImageLaterality(str, enum.Enum):
    """Image Laterality (0020,0062) defined terms."""

    RIGHT = "R"
    LEFT = "L"
    UNPAIRED = "U"
    BOTH = "B"


@dataclass(frozen=True)
class KeyImage:
    therapy: str
    slice_index: int  # k on the reference grid
    overlay: np.ndarray  # uint8 (rows, cols, 3): the reference slice with the forecast blended
    rendered: np.ndarray  # uint8 (H, W, 3): zoomed overlay with the legend band


def display_window(pixels: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Grey-scale window from percentiles of the non-background voxels (every 2nd voxel per
    axis is plenty for a percentile and eight times cheaper)."""
    sample = pixels[::2, ::2, ::2]
    foreground = sample[sample > 0]
    if foreground.size == 0:
        foreground = sample.ravel()
    lo, hi = np.percentile(foreground, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def overlay_rgb(
    slice_2d: np.ndarray,
    mask_2d: np.ndarray,
    rgb: tuple[int, int, int],
    opacity: float,
    window: tuple[float, float],
) -> np.ndarray:
    """Grey-scale slice with ``rgb`` blended at ``opacity`` on mask pixels only."""
    lo, hi = window
    grey = np.clip((slice_2d.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    out = np.repeat(grey[..., None], 3, axis=2)
    colour = np.asarray(rgb, dtype=np.float32)
    mask = mask_2d.astype(bool)
    out[mask] = (1.0 - opacity) * out[mask] + opacity * colour
    return np.round(out).astype(np.uint8)


def choose_slices(mask: np.ndarray, n: int, min_separation: int) -> list[int]:
    """Up to ``n`` slice indices with the most mask voxels, ``min_separation`` slices apart;
    the middle slice when the mask is empty."""
    counts = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if not counts.any():
        return [mask.shape[0] // 2]
    chosen: list[int] = []
    for k in np.argsort(-counts, kind="stable"):
        if counts[k] == 0 or len(chosen) == n:
            break
        if all(abs(int(k) - c) >= min_separation for c in chosen):
            chosen.append(int(k))
    return sorted(chosen)


def patient_orientation(grid: Grid) -> tuple[str, str]:
    """Patient Orientation (0020,0020) letters of the row and column directions of a slice."""

    def letters(vector: np.ndarray) -> str:
        order = np.argsort(-np.abs(vector))
        return "".join(
            _AXIS_LETTERS[a][0 if vector[a] > 0 else 1] for a in order if abs(vector[a]) > 0.25
        )

    direction = grid.direction
    return letters(direction[:, 0]), letters(direction[:, 1])


def legend_lines(
    view: TherapyView, templates: Templates, k: int, n_slices: int, horizon: float
) -> list[str]:
    f = view.forecast
    lo, hi = f.count_interval_90
    lines = [
        f"{templates.therapy(view.key).label} — forecast at {horizon:g} weeks",
        f"Expected NET2 lesions {f.expected_count:.1f} (90% interval {lo:.1f}–{hi:.1f}); "
        f"P(activity) {100 * f.probability_of_activity:.0f}%",
        f"Forecast NET2 volume {f.volume_mm3_mean:.0f} mm³; slice {k + 1} of {n_slices}",
    ]
    if view.is_empty:
        lines.append(templates.outputs.report.empty_forecast)
    lines.append(templates.outputs.disclaimer)
    return lines


def render(
    overlay: np.ndarray, zoom: int, lines: list[str], rgb: tuple[int, int, int]
) -> np.ndarray:
    """The zoomed overlay above a legend band (colour swatch + text), as uint8 RGB."""
    image = np.repeat(np.repeat(overlay, zoom, axis=0), zoom, axis=1)
    height, width = image.shape[0] + LEGEND_PX, max(image.shape[1], 480)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    fig.figimage(image, xo=0, yo=LEGEND_PX, origin="upper")
    fig.patches.append(
        Rectangle(
            (8 / width, (LEGEND_PX - 24) / height),
            16 / width,
            16 / height,
            transform=fig.transFigure,
            facecolor=np.asarray(rgb) / 255.0,
            edgecolor="white",
        )
    )
    for i, line in enumerate(lines):
        x = 32 if i == 0 else 8
        y = LEGEND_PX - 10 - 22 * i
        fig.text(x / width, y / height, line, color="white", fontsize=8.5, va="top", ha="left")
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def key_images(
    report_input: ReportInput,
    view: TherapyView,
    templates: Templates,
    window: tuple[float, float],
) -> list[KeyImage]:
    reference = report_input.reference
    spec = templates.outputs.key_images
    slice_mm = reference.grid.spacing[2]
    separation = max(1, int(np.ceil(spec.min_separation_mm / slice_mm)))
    rgb = templates.colour(view.key).as_rgb()
    out = []
    for k in choose_slices(view.native.mask, spec.per_therapy, separation):
        overlay = overlay_rgb(reference.pixels[k], view.native.mask[k], rgb, spec.opacity, window)
        lines = legend_lines(
            view, templates, k, reference.grid.shape[0], report_input.result.horizon_weeks
        )
        out.append(KeyImage(view.key, k, overlay, render(overlay, spec.zoom, lines, rgb)))
    return out


def build_key_image_datasets(
    report_input: ReportInput,
    view: TherapyView,
    images: list[KeyImage],
    templates: Templates,
    provenance: Provenance,
) -> list[hd.sc.SCImage]:
    """One Secondary Capture instance per key image, all in the therapy's key-image series."""
    reference = report_input.reference
    study_uid = str(reference.headers[0].StudyInstanceUID)
    orientation = patient_orientation(reference.grid)
    out = []
    for index, image in enumerate(images):
        identity = object_identity(
            templates, study_uid, report_input.study_version, OutputKind.KEY_IMAGES, view.key, index
        )
        source = reference.slice_sources[image.slice_index]
        header = reference.headers[source.instance]
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header,
            pixel_array=image.rendered,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=identity.series_instance_uid,
            series_number=identity.series_number,
            sop_instance_uid=identity.sop_instance_uid,
            instance_number=identity.instance_number,
            manufacturer=templates.outputs.equipment.manufacturer,
            patient_orientation=orientation,
            series_description=identity.series_description,
            contributing_equipment=[contributing_equipment(templates, provenance)],
        )
        stamp_equipment(sc, templates, provenance)
        # Rendered by software from the series, not digitised from film or video.
        sc.ConversionType = hd.sc.ConversionTypeValues.WSD.value
        # The legend names no patient, so the capture does not identify the patient.
        sc.BurnedInAnnotation = BurnedInAnnotation.NO.value
        # The brain as a whole is an unpaired structure; without it dciodvfy requires the
        # series-level Laterality (type 2C) of a paired body part.
        sc.ImageLaterality = ImageLaterality.UNPAIRED.value
        sc.ImageComments = f"{templates.outputs.disclaimer_ascii}; {provenance.describe()}"
        sc.DerivationDescription = (
            f"Forecast NET2 mask of {view.key} blended on reference slice {image.slice_index + 1}"
        )[:1024]
        item = Dataset()
        item.ReferencedSOPClassUID = header.SOPClassUID
        item.ReferencedSOPInstanceUID = header.SOPInstanceUID
        if source.frame > 0:
            item.ReferencedFrameNumber = source.frame
        sc.SourceImageSequence = [item]
        out.append(sc)
    return out
