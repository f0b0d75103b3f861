"""Clinical outputs of a forecast: DICOM SEG and SR per therapy, a comparison SR, key images
and an Encapsulated PDF, all built from one :class:`ReportInput` and the institution-editable
templates in ``dicom_templates/`` (see docs/outputs.md)."""

from ms_forecast_node.report.build import OutputObject, build_outputs, write_outputs
from ms_forecast_node.report.inputs import NativeTherapyForecast, ReportInput
from ms_forecast_node.report.templates import OutputKind, Templates, load_templates

__all__ = [
    "NativeTherapyForecast",
    "OutputKind",
    "OutputObject",
    "ReportInput",
    "Templates",
    "build_outputs",
    "load_templates",
    "write_outputs",
]
