"""The current T2 lesion mask: from an incoming DICOM SEG, or from the built-in segmenter.

The built-in segmenter is a classical, explainable method on the native FLAIR:

1. N4 bias-field correction, then division by the white-matter level (the template's
   white-matter prior mapped into the native space says where white matter is);
2. hysteresis thresholding inside the brain: voxels above ``seed`` start a lesion, connected
   voxels above ``grow`` join it (a lesion voxel that is half lesion, half white matter sits at
   about 1.45 × white matter on FLAIR, so ``grow`` reproduces the "partial volume ≥ 0.5" rule of
   the training labels);
3. drop components below ``min_volume_mm3`` and those outside the white-matter envelope
   (cortex is FLAIR-bright too).

Its accuracy on held-out simulated studies is measured by ``benchmarks/lesion_segmenter.py`` and
stated in ``docs/imaging-pipeline.md``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ms_forecast_node.errors import LesionMaskError
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.image.series import SeriesVolume


class LesionMaskSource(str, enum.Enum):
    """Where the current lesion mask of a study came from (reported in every output)."""

    INCOMING_SEG = "incoming_seg"
    BUILTIN_SEGMENTER = "builtin_segmenter"


@dataclass(frozen=True)
class SegmenterSettings:
    seed: float = 1.45
    grow: float = 1.3
    min_volume_mm3: float = 8.0
    wm_envelope: float = 0.2  # template WM probability a lesion must touch
    wm_voxel: float = 0.5  # template WM probability below which a voxel cannot grow a lesion


def bias_corrected(flair: np.ndarray, grid: Grid, brain: np.ndarray, shrink: int = 4) -> np.ndarray:
    """N4 bias-field correction (SimpleITK), fitted on a shrunken image inside the brain and
    applied at full resolution: a smooth field is all N4 estimates, so fitting at 4 mm loses
    nothing and keeps the step near a second."""
    image = grid.to_sitk(np.maximum(flair, 0).astype(np.float32) + 1.0)
    mask = grid.to_sitk(brain.astype(np.uint8))
    factors = [max(1, min(shrink, n // 32)) for n in image.GetSize()]
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([40, 30, 20])
    corrector.Execute(sitk.Shrink(image, factors), sitk.Shrink(mask, factors))
    log_bias = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image))
    return (flair / np.exp(log_bias)).astype(np.float32)


def normalise_flair(
    flair: np.ndarray, grid: Grid, wm_prior: np.ndarray, brain: np.ndarray
) -> np.ndarray:
    """Bias-corrected FLAIR divided by its white-matter level (white matter ≈ 1)."""
    core = (wm_prior > 0.9) & brain
    if core.sum() < 100:
        raise LesionMaskError(
            "too little white matter in the FLAIR field of view to normalise it",
            reason="lesion_segmentation_failed",
        )
    corrected = bias_corrected(flair, grid, brain)
    # The mode-seeking median of the core: lesions and prodromes sit in its upper tail.
    level = float(np.median(corrected[core]))
    return (corrected / max(level, 1e-6)).astype(np.float32)


def segment_lesions(
    flair: np.ndarray,
    grid: Grid,
    wm_prior: np.ndarray,
    brain_prior: np.ndarray,
    settings: SegmenterSettings | None = None,
) -> np.ndarray:
    """Binary T2 lesion mask of a native FLAIR volume; priors are on the same grid."""
    s = settings or SegmenterSettings()
    brain = brain_prior > 0.5
    norm = normalise_flair(flair, grid, wm_prior, brain)
    # Cortex is FLAIR-bright too: a voxel joins a lesion only where white matter is plausible.
    candidate = (norm > s.grow) & brain & ((wm_prior >= s.wm_voxel) | (norm > s.seed))
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(flair.shape, bool)
    ids = np.arange(1, n + 1)
    # Per-component statistics over the candidate voxels only: a full-volume labelled
    # reduction sorts every voxel and costs seconds at 1 mm.
    inside = labels > 0
    lab = labels[inside]
    peak = ndimage.maximum(norm[inside], lab, ids)
    volume = np.bincount(lab, minlength=n + 1)[1:] * grid.voxel_volume_mm3
    wm_max = ndimage.maximum(wm_prior[inside], lab, ids)
    keep = (peak > s.seed) & (volume >= s.min_volume_mm3) & (wm_max >= s.wm_envelope)
    lut = np.zeros(n + 1, bool)
    lut[1:] = keep
    return lut[labels]


def read_lesion_seg(path: Path, reference: SeriesVolume) -> np.ndarray:
    """Lesion mask from a DICOM SEG on the reference series' grid (all segments merged).

    The SEG must share the reference's frame of reference; its frames are placed by their
    plane positions, so it may reference another series of the same session.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise LesionMaskError(f"{path.name}: not a readable DICOM SEG: {exc}") from exc
    if str(seg.FrameOfReferenceUID) != reference.frame_of_reference_uid:
        raise LesionMaskError(
            f"{path.name}: SEG frame of reference {seg.FrameOfReferenceUID} differs from the "
            f"reference series' {reference.frame_of_reference_uid}",
            reason="lesion_mask_frame_of_reference",
        )
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    if not numbers:
        raise LesionMaskError(f"{path.name}: SEG has no segments", reason="lesion_mask_empty")
    volume = seg.get_volume(
        combine_segments=True, skip_overlap_checks=True, allow_missing_positions=True
    )
    # Map the SEG's voxels into the reference grid by world position (nearest neighbour).
    # highdicom's affine maps (axis 0, axis 1, axis 2) array indices; a Grid maps (i, j, k)
    # with i the last axis, so the first three columns swap order.
    affine = np.asarray(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    seg_grid = Grid(tuple(volume.spatial_shape), affine)  # type: ignore[arg-type]
    source = seg_grid.to_sitk((np.asarray(volume.array) > 0).astype(np.uint8))
    target = reference.grid.to_sitk(np.zeros(reference.grid.shape, np.uint8))
    out = sitk.Resample(
        source, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    return sitk.GetArrayFromImage(out) > 0
