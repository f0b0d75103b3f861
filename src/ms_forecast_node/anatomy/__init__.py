"""Template anatomy (ICBM152 2009 + atlases) and MAGNIMS-style lesion location classes."""

from ms_forecast_node.anatomy.locations import LocationClass, LocationMaps, classify_lesions
from ms_forecast_node.anatomy.template import TemplateAnatomy, load_template_anatomy

__all__ = [
    "LocationClass",
    "LocationMaps",
    "TemplateAnatomy",
    "classify_lesions",
    "load_template_anatomy",
]
