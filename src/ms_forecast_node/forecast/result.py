"""The typed forecast result that the reporting code consumes (no DICOM, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ms_forecast_node import RESEARCH_DISCLAIMER
from ms_forecast_node.anatomy.locations import LocationClass
from ms_forecast_node.image.geometry import Grid


def _interval_90(values: tuple[float, ...] | tuple[int, ...]) -> tuple[float, float]:
    lo, hi = np.percentile(values, [5, 95])
    return float(lo), float(hi)


@dataclass(frozen=True)
class ForecastLesion:
    """A connected component of a therapy's binary forecast mask."""

    label: int
    volume_mm3: float
    centroid_lps_mm: tuple[float, float, float]
    location: LocationClass
    mean_probability: float


@dataclass(frozen=True)
class TherapyForecast:
    therapy: str
    probability: np.ndarray  # (D, H, W) share of samples in which the voxel is NET2
    mask: np.ndarray  # bool, probability >= threshold without components below the minimum size
    uncertainty: np.ndarray  # per-voxel std of the sample masks, sqrt(p (1 - p))
    sample_counts: tuple[int, ...]  # NET2 lesions (components >= min size) per sample
    sample_volumes_mm3: tuple[float, ...]
    sample_counts_by_location: dict[LocationClass, tuple[int, ...]]
    lesions: tuple[ForecastLesion, ...]
    # The network's voxel probabilities at the first (pure-noise) step: its marginal estimate
    # of E[mask], smooth where the S samples are all empty. None for results built elsewhere.
    marginal_probability: np.ndarray | None = None

    @property
    def expected_count(self) -> float:
        return float(np.mean(self.sample_counts))

    @property
    def count_median(self) -> float:
        return float(np.median(self.sample_counts))

    @property
    def count_interval_90(self) -> tuple[float, float]:
        return _interval_90(self.sample_counts)

    @property
    def probability_of_activity(self) -> float:
        """Share of samples with at least one NET2 lesion above the minimum size."""
        return float(np.mean(np.asarray(self.sample_counts) > 0))

    @property
    def volume_mm3_mean(self) -> float:
        return float(np.mean(self.sample_volumes_mm3))

    @property
    def volume_interval_90(self) -> tuple[float, float]:
        return _interval_90(self.sample_volumes_mm3)

    @property
    def expected_volume_voxels_marginal(self) -> float:
        """Expected NET2 volume in model-grid voxels from the marginal (nan when absent)."""
        if self.marginal_probability is None:
            return float("nan")
        return float(self.marginal_probability.sum(dtype=np.float64))

    def expected_counts_by_location(self) -> dict[LocationClass, float]:
        return {k: float(np.mean(v)) for k, v in self.sample_counts_by_location.items()}


@dataclass(frozen=True)
class ForecastResult:
    """Forecasts of one study under every requested therapy, on the model grid."""

    model_name: str
    model_version: str
    model_sha256: str | None
    grid: Grid
    horizon_weeks: float
    sampler: dict[str, object]
    therapies: dict[str, TherapyForecast]
    timings_s: dict[str, float] = field(default_factory=dict)
    disclaimer: str = RESEARCH_DISCLAIMER

    def ranked(self) -> list[TherapyForecast]:
        """Therapies from the fewest to the most expected NET2 lesions; ties in the sample mean
        (e.g. every sample empty) are broken by the marginal expected NET2 volume."""
        return sorted(self.therapies.values(), key=_ranking_key)


def _ranking_key(f: TherapyForecast) -> tuple[float, float, str]:
    volume = f.expected_volume_voxels_marginal
    return (f.expected_count, volume if np.isfinite(volume) else 0.0, f.therapy)
