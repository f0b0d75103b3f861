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
