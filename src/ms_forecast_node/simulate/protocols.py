"""MR acquisition protocols the simulator writes as DICOM series.

The protocols (series descriptions, orientations, voxel sizes, timing) are configuration:
the defaults live in ``dicom_templates/simulator_protocols.yaml`` and a site may pass its own
file to mimic its scanners' naming.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import yaml

from ms_forecast_node.errors import ConfigurationError


class MRSequence(str, enum.Enum):
    """The contrasts the simulator synthesises (and the forecaster consumes)."""

    FLAIR = "FLAIR"
    T1 = "T1"
    T2 = "T2"
    PD = "PD"


class SliceOrientation(str, enum.Enum):
    AXIAL = "AXIAL"
    SAGITTAL = "SAGITTAL"
    CORONAL = "CORONAL"
    OBLIQUE = "OBLIQUE"  # axial tilted about the left-right axis (AC-PC style)


class AcquisitionType(str, enum.Enum):
    """DICOM MRAcquisitionType (0018,0023) enumerated values."""

    TWO_D = "2D"
    THREE_D = "3D"


@dataclass(frozen=True)
class AcquisitionProtocol:
    """One series of a simulated visit: contrast, geometry and the DICOM acquisition fields."""

    name: str
    sequence: MRSequence
    series_description: str
    orientation: SliceOrientation
    acquisition_type: AcquisitionType
    pixel_spacing_mm: float  # in-plane, isotropic
    slice_thickness_mm: float
    slice_gap_mm: float
    field_of_view_mm: tuple[float, float, float]  # (in-plane rows, in-plane cols, slab)
    repetition_time_ms: float
    echo_time_ms: float
    inversion_time_ms: float | None
    flip_angle_deg: float
    echo_train_length: int
    scanning_sequence: tuple[str, ...]  # (0018,0020) e.g. ("SE", "IR")
    sequence_variant: tuple[str, ...]  # (0018,0021) e.g. ("SK", "SP", "MP")
    scan_options: tuple[str, ...]  # (0018,0022)
    sequence_name: str  # (0018,0024)
    multiframe: bool = False  # write as a multi-frame enhanced object instead of one file/slice
    oblique_tilt_deg: float = 0.0

    @property
    def slice_spacing_mm(self) -> float:
        return self.slice_thickness_mm + self.slice_gap_mm


_REQUIRED = {
    "name",
    "sequence",
    "series_description",
    "orientation",
    "acquisition_type",
    "pixel_spacing_mm",
    "slice_thickness_mm",
    "field_of_view_mm",
    "repetition_time_ms",
    "echo_time_ms",
    "flip_angle_deg",
    "echo_train_length",
    "scanning_sequence",
    "sequence_variant",
    "sequence_name",
}

DEFAULT_PROTOCOLS_FILE = (
    Path(__file__).resolve().parents[3] / "dicom_templates" / "simulator_protocols.yaml"
)


def _packaged_protocols_file() -> Path:
    # Installed wheels carry a copy under ms_forecast_node/data; a source checkout uses the
    # institution-editable file in dicom_templates/.
    if DEFAULT_PROTOCOLS_FILE.is_file():
        return DEFAULT_PROTOCOLS_FILE
    packaged = Path(__file__).resolve().parents[1] / "data" / "dicom_templates"
    return packaged / "simulator_protocols.yaml"


def _parse_protocol(entry: dict[str, object], where: str) -> AcquisitionProtocol:
    missing = sorted(_REQUIRED - set(entry))
    if missing:
        raise ConfigurationError(f"{where}: missing keys {missing}")
    try:
        fov = tuple(float(v) for v in entry["field_of_view_mm"])  # type: ignore[attr-defined]
        if len(fov) != 3:
            raise ValueError("field_of_view_mm needs three numbers")
        ti = entry.get("inversion_time_ms")
        return AcquisitionProtocol(
            name=str(entry["name"]),
            sequence=MRSequence(str(entry["sequence"]).upper()),
            series_description=str(entry["series_description"]),
            orientation=SliceOrientation(str(entry["orientation"]).upper()),
            acquisition_type=AcquisitionType(str(entry["acquisition_type"]).upper()),
            pixel_spacing_mm=float(entry["pixel_spacing_mm"]),  # type: ignore[arg-type]
            slice_thickness_mm=float(entry["slice_thickness_mm"]),  # type: ignore[arg-type]
            slice_gap_mm=float(entry.get("slice_gap_mm", 0.0)),  # type: ignore[arg-type]
            field_of_view_mm=(fov[0], fov[1], fov[2]),
            repetition_time_ms=float(entry["repetition_time_ms"]),  # type: ignore[arg-type]
            echo_time_ms=float(entry["echo_time_ms"]),  # type: ignore[arg-type]
            inversion_time_ms=None if ti is None else float(ti),  # type: ignore[arg-type]
            flip_angle_deg=float(entry["flip_angle_deg"]),  # type: ignore[arg-type]
            echo_train_length=int(entry["echo_train_length"]),  # type: ignore[call-overload]
            scanning_sequence=tuple(str(v) for v in entry["scanning_sequence"]),  # type: ignore[attr-defined]
            sequence_variant=tuple(str(v) for v in entry["sequence_variant"]),  # type: ignore[attr-defined]
            scan_options=tuple(str(v) for v in entry.get("scan_options", [])),  # type: ignore[attr-defined]
            sequence_name=str(entry["sequence_name"]),
            multiframe=bool(entry.get("multiframe", False)),
            oblique_tilt_deg=float(entry.get("oblique_tilt_deg", 0.0)),  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc


def load_protocols(path: Path | None = None) -> list[AcquisitionProtocol]:
    """Load and validate a protocol file; raises :class:`ConfigurationError` with the reason."""
    path = path or _packaged_protocols_file()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read protocol file {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("protocols"), list):
        raise ConfigurationError(f"{path}: expected a mapping with a 'protocols' list")
    protocols = [
        _parse_protocol(entry, f"{path} protocols[{n}]") for n, entry in enumerate(raw["protocols"])
    ]
    names = [p.name for p in protocols]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{path}: protocol names must be unique, got {names}")
    if not protocols:
        raise ConfigurationError(f"{path}: no protocols defined")
    return protocols
