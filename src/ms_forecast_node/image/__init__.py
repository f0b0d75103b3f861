"""Images that carry their geometry, and the transforms between grids."""

from ms_forecast_node.image.geometry import Grid, lps_to_ras, ras_to_lps

__all__ = ["Grid", "lps_to_ras", "ras_to_lps"]
