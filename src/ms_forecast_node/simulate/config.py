"""Simulation settings (all in one frozen dataclass, serialised into every cohort)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ms_forecast_node.errors import SimulationError
from ms_forecast_node.simulate.activity import ActivityParameters


@dataclass(frozen=True)
class SimulationConfig:
    grid_spacing_mm: float = 2.0  # the model grid the cohort layout is written at
    horizon_weeks: float = 48.0
    activity: ActivityParameters = field(default_factory=ActivityParameters)
    # Anatomy variation
    nonlinear_mm: float = 2.5  # s.d. of control-point displacements
    head_rotation_max_deg: float = 10.0
    head_scale_max: float = 0.08
    head_translation_sd_mm: float = 8.0
    visit_rotation_max_deg: float = 5.0  # re-positioning between visits
    visit_translation_sd_mm: float = 4.0
    # Baseline lesion load: total T2 volume, log-normal, clipped (mL)
    lesion_load_median_ml: float = 4.0
    lesion_load_log_sd: float = 0.9
    lesion_load_range_ml: tuple[float, float] = (0.6, 40.0)
    topography: tuple[tuple[str, float], ...] = (
        ("periventricular", 0.40),
        ("juxtacortical", 0.20),
        ("infratentorial", 0.10),
        ("deep_white_matter", 0.30),
    )
    # Evolution
    enlarge_volume_factor: tuple[float, float] = (1.6, 3.0)
    enlarging_threshold: float = 0.5  # an enlarging lesion grows by >= 50 % of its volume
    shrink_probability: float = 0.15
    new_lesion_volume_median_mm3: float = 45.0
    same_scanner_probability: float = 0.7
    prodrome_probability: float = 0.6  # share of future new-lesion sites visible at baseline
    prodrome_strength: float = 0.8  # partial-volume weight of the pre-lesional change
    # A prior visit this many weeks before baseline (0: none). The interval before baseline is
    # untreated (a trial's run-in), so the lesions that appeared in it are a Poisson count of the
    # patient's full placebo rate: the temporal context shows the hidden activity too.
    prior_visit_weeks: float = 48.0

    def __post_init__(self) -> None:
        if not 24.0 <= self.horizon_weeks <= 96.0:
            raise SimulationError(f"horizon must be 24–96 weeks, got {self.horizon_weeks}")
        if self.grid_spacing_mm not in (1.0, 2.0, 3.0, 4.0):
            raise SimulationError(
                f"grid spacing must be 1, 2, 3 or 4 mm, got {self.grid_spacing_mm}"
            )
        if self.prior_visit_weeks and not 12.0 <= self.prior_visit_weeks <= 96.0:
            raise SimulationError(
                f"prior visit must be 12–96 weeks before baseline (or 0), got "
                f"{self.prior_visit_weeks}"
            )
        if self.enlarge_volume_factor[0] < 1.0 + self.enlarging_threshold:
            raise SimulationError("enlargement factors must exceed the enlarging threshold")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
