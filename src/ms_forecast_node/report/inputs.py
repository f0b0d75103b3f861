"""What the report builders consume: the forecast, the reference series, and native-space masks.

The forecaster works on its model grid; the objects a viewer opens must lie on the voxels of
the reference series the radiologist reads. :class:`NativeTherapyForecast` carries each
therapy's forecast already mapped back onto ``reference.grid`` (by the imaging pipeline),
while :class:`ForecastResult` keeps the model-grid numbers (counts, intervals, probability of
activity) that the reports quote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ms_forecast_node import __version__
from ms_forecast_node.errors import OutputError
from ms_forecast_node.forecast.result import ForecastLesion, ForecastResult, TherapyForecast
from ms_forecast_node.image.series import SeriesVolume


@dataclass(frozen=True)
class NativeTherapyForecast:
    therapy: str  # key of ForecastResult.therapies
    mask: np.ndarray  # bool, shape == reference.grid.shape (K, rows, cols)
    probability: np.ndarray  # float32 in [0, 1], same shape
    lesions: tuple[ForecastLesion, ...]  # components of `mask` in native space (labels 1..n)
    labels: np.ndarray  # int32 connected-component labels of mask, same shape


@dataclass(frozen=True)
class ReportInput:
    result: ForecastResult  # model-grid numbers: counts, intervals, probability, volumes
    reference: SeriesVolume  # the reference series (FLAIR): grid, pixels, headers, sources
    native: dict[str, NativeTherapyForecast]  # same keys as result.therapies
    study_version: int  # 1, 2, ... (a later series makes a new version)
    lesion_mask_source: str  # e.g. "incoming_seg" or "builtin_segmenter"
    prior_study_instance_uid: str | None = None


@dataclass(frozen=True)
class TherapyView:
    """One therapy's model-grid numbers and native-space masks, side by side."""

    key: str
    forecast: TherapyForecast
    native: NativeTherapyForecast

    @property
    def is_empty(self) -> bool:
        return not bool(self.native.mask.any())


def check_input(report_input: ReportInput) -> None:
    """Refuse inputs whose parts do not fit together, before any object is built."""
    result, reference = report_input.result, report_input.reference
    if set(report_input.native) != set(result.therapies):
        raise OutputError(
            f"native forecasts {sorted(report_input.native)} do not match the forecast's "
            f"therapies {sorted(result.therapies)}",
            reason="output_input_mismatch",
        )
    if report_input.study_version < 1:
        raise OutputError("study_version starts at 1", reason="output_input_mismatch")
    shape = reference.grid.shape
    for key, native in report_input.native.items():
        if native.therapy != key:
            raise OutputError(f"native forecast under key {key!r} says therapy {native.therapy!r}")
        for name in ("mask", "probability", "labels"):
            array = getattr(native, name)
            if array.shape != shape:
                raise OutputError(
                    f"{key}: {name} has shape {array.shape}, the reference grid {shape}",
                    reason="output_input_mismatch",
                )
        if native.mask.dtype != np.bool_:
            raise OutputError(f"{key}: mask must be boolean, got {native.mask.dtype}")
        if native.mask.any() and not np.array_equal(native.labels > 0, native.mask):
            raise OutputError(f"{key}: labels do not cover exactly the mask's voxels")
        label_ids = {lesion.label for lesion in native.lesions}
        present = set(np.unique(native.labels[native.labels > 0]).tolist())
        if label_ids != present:
            raise OutputError(
                f"{key}: lesion labels {sorted(label_ids)} != labels in the label map "
                f"{sorted(present)}",
                reason="output_input_mismatch",
            )


def therapy_views(report_input: ReportInput) -> list[TherapyView]:
    """Therapies ranked as :meth:`ForecastResult.ranked` ranks them (fewest expected first)."""
    return [
        TherapyView(f.therapy, f, report_input.native[f.therapy])
        for f in report_input.result.ranked()
    ]


@dataclass(frozen=True)
class Provenance:
    """Where an output came from, written into every object (see docs/outputs.md)."""

    software_version: str
    model_name: str
    model_version: str
    model_sha256: str
    study_version: int
    lesion_mask_source: str

    @classmethod
    def of(cls, report_input: ReportInput) -> Provenance:
        result = report_input.result
        return cls(
            software_version=__version__,
            model_name=result.model_name,
            model_version=result.model_version,
            model_sha256=result.model_sha256 or "unknown",
            study_version=report_input.study_version,
            lesion_mask_source=report_input.lesion_mask_source,
        )

    @property
    def software_versions(self) -> list[str]:
        """Software Versions (0018,1020), LO values of at most 64 characters each."""
        return [f"ms-forecast-node {self.software_version}"[:64], self.model_label[:64]]

    @property
    def model_label(self) -> str:
        return f"{self.model_name} {self.model_version}"

    def describe(self) -> str:
        """One line for ContributionDescription / text items (ST/LT allow 1024+ characters)."""
        return (
            f"ms-forecast-node {self.software_version}; model {self.model_name} "
            f"version {self.model_version} sha256 {self.model_sha256}; study version "
            f"{self.study_version}; lesion mask from {self.lesion_mask_source}"
        )
