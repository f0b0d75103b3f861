"""One exception hierarchy for the whole node.

Every error the node can report derives from :class:`MSForecastError` and carries a short,
stable ``reason`` code that ends up in logs, job state and the IT guide's troubleshooting table.
"""

from __future__ import annotations


class MSForecastError(Exception):
    """Base class of every error raised on purpose by ms-forecast-node."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"[{self.reason}] {super().__str__()}"


class ConfigurationError(MSForecastError):
    """A configuration or template file is missing, malformed or inconsistent."""

    reason = "configuration_invalid"


class AnatomyDataError(MSForecastError):
    """The template anatomy (ICBM152 maps, atlases) cannot be found or read."""

    reason = "anatomy_data_missing"


class SimulationError(MSForecastError):
    """The simulator was asked for something it cannot produce."""

    reason = "simulation_failed"


class CohortFormatError(MSForecastError):
    """A folder does not follow the documented cohort layout."""

    reason = "cohort_format_invalid"


# --- study and series input (imaging pipeline) -----------------------------------------------
class StudyInputError(MSForecastError):
    """A study or one of its series cannot be used as forecaster input."""

    reason = "study_invalid"


class SeriesSelectionError(StudyInputError):
    """The study lacks a series the configuration requires (e.g. no FLAIR, only localizers)."""

    reason = "required_series_missing"


class SeriesRulesError(ConfigurationError):
    """The series classification rules file is malformed."""

    reason = "series_rules_invalid"


class SeriesGeometryError(StudyInputError):
    """A series' slices do not form one regular volume (reasons: missing_slice,
    non_parallel_slices, inconsistent_spacing, gantry_tilt, too_few_slices, mixed_series,
    duplicate_slices)."""

    reason = "series_geometry_invalid"


class PixelDataError(StudyInputError):
    """Pixel data cannot be decoded (unsupported transfer syntax, corrupt stream)."""

    reason = "pixel_data_unreadable"


class RegistrationError(StudyInputError):
    """Registration did not converge or failed its quality check."""

    reason = "registration_failed"


class LesionMaskError(StudyInputError):
    """A supplied lesion SEG cannot be used (wrong frame of reference, no lesion segment)."""

    reason = "lesion_mask_invalid"


class OutputError(MSForecastError):
    """An output object (SEG, SR, key image, PDF) cannot be built."""

    reason = "output_build_failed"


class ReportComparisonError(MSForecastError):
    """Two evaluation reports cannot be compared patient by patient (no per-patient records,
    different therapies, or different truth for the same patient)."""

    reason = "report_comparison_invalid"
