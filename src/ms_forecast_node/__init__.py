"""ms-forecast-node: forecasts new and enlarging T2 MS lesions under candidate therapies.

Research use only. Not for diagnostic use.
"""

__version__ = "0.1.0"

RESEARCH_DISCLAIMER = "RESEARCH FORECAST - NOT FOR DIAGNOSTIC USE"

__all__ = ["RESEARCH_DISCLAIMER", "__version__"]
