"""From a study's DICOM files to the series the forecaster uses.

* :mod:`.rules` — the site-editable classification and selection rules
  (``dicom_templates/series_rules.yaml``), validated on load.
* :mod:`.inventory` — every series of a study, classified and screened from its headers, and
  the choice of one series per class with the reasons.
"""

from ms_forecast_node.assemble.inventory import (
    Choice,
    IgnoredFile,
    Selection,
    SeriesInfo,
    StudyInventory,
    inventory,
    select_series,
)
from ms_forecast_node.assemble.rules import (
    ENV_RULES_PATH,
    SeriesAttributes,
    SeriesClass,
    SeriesRules,
    SkipCategory,
    default_rules_path,
    load_series_rules,
)

__all__ = [
    "ENV_RULES_PATH",
    "Choice",
    "IgnoredFile",
    "Selection",
    "SeriesAttributes",
    "SeriesClass",
    "SeriesInfo",
    "SeriesRules",
    "SkipCategory",
    "StudyInventory",
    "default_rules_path",
    "inventory",
    "load_series_rules",
    "select_series",
]
