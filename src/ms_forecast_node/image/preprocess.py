"""From a study's chosen series to the forecaster's model grid, keeping the way back.

Steps: rigid co-registration of every series to the reference (FLAIR); affine registration of
the reference to the template, with a quality check; resampling of every series onto the model
grid (with anti-alias smoothing, because the training images were rendered as averages over
model-grid voxels); the current lesion mask (incoming SEG or built-in segmenter); the prior visit
registered to the current reference when there is one.

:class:`TemplateMapping` keeps the transform with the reference series, so mapping a
model-grid forecast back onto the reference series' voxels is one call.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ms_forecast_node.anatomy.template import load_template_anatomy
from ms_forecast_node.image.geometry import Grid
from ms_forecast_node.image.lesion_mask import (
    LesionMaskSource,
    SegmenterSettings,
    read_lesion_seg,
    segment_lesions,
)
from ms_forecast_node.image.registration import (
    RegistrationQuality,
    as_affine,
    register_rigid,
    register_to_template,
    resample,
)
from ms_forecast_node.image.series import SeriesVolume
from ms_forecast_node.simulate.protocols import MRSequence

log = logging.getLogger(__name__)

#: A native lesion mask becomes a model-grid voxel where it covers this share of the voxel
#: (calibrated on simulated studies against the training labels; see lesion_mask.py).
LESION_COVERAGE = 0.3


@dataclass(frozen=True)
class TemplateMapping:
    """The reference series, the model grid, and the transform between them.

    ``template_to_reference`` maps model-grid (template) points to reference-series points.
    """

    reference: SeriesVolume
    model_grid: Grid
    template_to_reference: sitk.AffineTransform

    def to_reference(
        self, volume: np.ndarray, *, interpolator: int = sitk.sitkLinear
    ) -> np.ndarray:
        """A model-grid volume sampled on the reference series' voxels."""
        if volume.shape != self.model_grid.shape:
            raise ValueError(
                f"volume {volume.shape} is not on the model grid {self.model_grid.shape}"
            )
        image = self.model_grid.to_sitk(volume.astype(np.float32))
        return resample(
            image,
            self.reference.grid,
            self.template_to_reference.GetInverse(),
            interpolator=interpolator,
        )

    def to_model_grid(
        self, volume: np.ndarray, *, interpolator: int = sitk.sitkLinear
    ) -> np.ndarray:
        """A reference-grid volume sampled on the model grid."""
        if volume.shape != self.reference.grid.shape:
            raise ValueError(f"volume {volume.shape} is not on the reference grid")
        image = self.reference.grid.to_sitk(volume.astype(np.float32))
        return resample(
            image, self.model_grid, self.template_to_reference, interpolator=interpolator
        )

    def mask_to_reference(self, mask: np.ndarray) -> np.ndarray:
        """A binary model-grid mask on the reference voxels (linear, then ≥ 0.5)."""
        return self.to_reference(mask.astype(np.float32)) >= 0.5


@dataclass(frozen=True)
class VisitSeries:
    """The chosen series of one visit (FLAIR required) and an optional incoming lesion SEG."""

    flair: SeriesVolume
    others: Mapping[MRSequence, SeriesVolume] = field(default_factory=dict)
    lesion_seg: Path | None = None
    study_instance_uid: str = ""
    study_date: datetime.date | None = None


@dataclass(frozen=True)
class PriorInputs:
    study_instance_uid: str
    lesion_mask: np.ndarray  # bool, model grid
    flair: np.ndarray  # float32, model grid
    interval_weeks: float | None
    lesion_source: LesionMaskSource


@dataclass(frozen=True)
class PreprocessedStudy:
    mapping: TemplateMapping
    sequences: dict[MRSequence, np.ndarray | None]  # scanner units, model grid
    lesion_mask: np.ndarray  # bool, model grid
    lesion_mask_native: np.ndarray  # bool, reference grid
    lesion_source: LesionMaskSource
    prior: PriorInputs | None
    quality: RegistrationQuality
    rigid_parameters: dict[str, list[float]]
    timings_s: dict[str, float]

    def summary(self) -> dict[str, object]:
        return {
            "reference_series": self.mapping.reference.series_instance_uid,
            "sequences": [s.value for s, v in self.sequences.items() if v is not None],
            "lesion_source": self.lesion_source.value,
            "lesion_voxels_model_grid": int(self.lesion_mask.sum()),
            "prior_study": self.prior.study_instance_uid if self.prior else None,
            "prior_interval_weeks": self.prior.interval_weeks if self.prior else None,
            "registration": {
                "head_dice": round(self.quality.head_dice, 4),
                "brain_correlation": round(self.quality.brain_correlation, 4),
                "scales": [round(s, 4) for s in self.quality.scales],
            },
            "rigid_parameters": self.rigid_parameters,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }


def _antialiased(volume: SeriesVolume, spacing_mm: float) -> sitk.Image:
    """Smooth where the series is finer than the model grid, so resampling averages."""
    image = volume.to_sitk()
    sigma = [max((spacing_mm - s) / 2.0, 0.0) for s in image.GetSpacing()]
    if max(sigma) <= 0.0:
        return image
    return sitk.SmoothingRecursiveGaussian(image, [max(s, 0.05) for s in sigma])


def _priors_on(
    grid: Grid, transform_to_template: sitk.Transform, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Template WM and brain probability on a native grid (``transform`` maps native → template)."""
    anatomy = load_template_anatomy(spacing_mm)
    wm = resample(anatomy.grid.to_sitk(anatomy.wm.astype(np.float32)), grid, transform_to_template)
    brain = resample(
        anatomy.grid.to_sitk(anatomy.brain.astype(np.float32)), grid, transform_to_template
    )
    return wm, brain


def _lesion_mask(
    visit: VisitSeries, template_to_native: sitk.Transform, settings: SegmenterSettings
) -> tuple[np.ndarray, LesionMaskSource]:
    if visit.lesion_seg is not None:
        return read_lesion_seg(visit.lesion_seg, visit.flair), LesionMaskSource.INCOMING_SEG
    wm, brain = _priors_on(visit.flair.grid, template_to_native.GetInverse(), 2.0)
    mask = segment_lesions(visit.flair.pixels, visit.flair.grid, wm, brain, settings)
    return mask, LesionMaskSource.BUILTIN_SEGMENTER


def _interval_weeks(current: VisitSeries, prior: VisitSeries) -> float | None:
    if current.study_date is None or prior.study_date is None:
        return None
    return (current.study_date - prior.study_date).days / 7.0


def preprocess(
    current: VisitSeries,
    model_grid: Grid,
    *,
    prior: VisitSeries | None = None,
    segmenter: SegmenterSettings | None = None,
) -> PreprocessedStudy:
    """Everything the forecaster needs, on ``model_grid``, plus the way back."""
    settings = segmenter or SegmenterSettings()
    spacing = float(min(model_grid.spacing))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    to_native, quality = register_to_template(current.flair.to_sitk(), MRSequence.FLAIR)
    timings["register_template_s"] = time.perf_counter() - t0
    mapping = TemplateMapping(current.flair, model_grid, to_native)

    t0 = time.perf_counter()
    sequences: dict[MRSequence, np.ndarray | None] = {s: None for s in MRSequence}
    sequences[MRSequence.FLAIR] = resample(
        _antialiased(current.flair, spacing), model_grid, to_native
    )
    rigid_parameters: dict[str, list[float]] = {}
    for sequence, series in current.others.items():
        if sequence == MRSequence.FLAIR:
            continue
        rigid = register_rigid(current.flair.to_sitk(), series.to_sitk())
        rigid_parameters[sequence.value] = [round(p, 4) for p in rigid.GetParameters()]
        chain = sitk.CompositeTransform([rigid, to_native])  # template → FLAIR → series
        sequences[sequence] = resample(_antialiased(series, spacing), model_grid, chain)
    timings["coregister_resample_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    native_mask, source = _lesion_mask(current, to_native, settings)
    model_mask = mapping.to_model_grid(native_mask.astype(np.float32)) >= LESION_COVERAGE
    timings["lesion_mask_s"] = time.perf_counter() - t0

    prior_inputs = None
    if prior is not None:
        t0 = time.perf_counter()
        prior_inputs = _prior_inputs(current, prior, mapping, settings)
        timings["prior_s"] = time.perf_counter() - t0
    return PreprocessedStudy(
        mapping=mapping,
        sequences=sequences,
        lesion_mask=model_mask,
        lesion_mask_native=native_mask,
        lesion_source=source,
        prior=prior_inputs,
        quality=quality,
        rigid_parameters=rigid_parameters,
        timings_s=timings,
    )


def _prior_inputs(
    current: VisitSeries, prior: VisitSeries, mapping: TemplateMapping, settings: SegmenterSettings
) -> PriorInputs:
    """Register the prior FLAIR to the current one (another session: search from the centres
    of mass) and bring its FLAIR and lesion mask onto the model grid."""
    rigid = register_rigid(current.flair.to_sitk(), prior.flair.to_sitk(), from_moments=True)
    # template → current FLAIR → prior FLAIR, as one affine (used for images and priors alike)
    to_prior = as_affine(sitk.CompositeTransform([rigid, mapping.template_to_reference]))
    spacing = float(min(mapping.model_grid.spacing))
    flair = resample(_antialiased(prior.flair, spacing), mapping.model_grid, to_prior)
    if prior.lesion_seg is not None:
        native = read_lesion_seg(prior.lesion_seg, prior.flair)
        source = LesionMaskSource.INCOMING_SEG
    else:
        wm, brain = _priors_on(prior.flair.grid, to_prior.GetInverse(), 2.0)
        native = segment_lesions(prior.flair.pixels, prior.flair.grid, wm, brain, settings)
        source = LesionMaskSource.BUILTIN_SEGMENTER
    image = prior.flair.grid.to_sitk(native.astype(np.float32))
    mask = resample(image, mapping.model_grid, to_prior) >= LESION_COVERAGE
    return PriorInputs(
        study_instance_uid=prior.study_instance_uid,
        lesion_mask=mask,
        flair=flair,
        interval_weeks=_interval_weeks(current, prior),
        lesion_source=source,
    )
