"""Institution-editable output templates: ``dicom_templates/outputs.yaml`` and ``codes.yaml``.

Both files are validated with pydantic when they are loaded (unknown keys are refused so a
typo cannot silently fall back to a default), then cross-checked: every therapy needs a code
and a colour, every code's scheme must be standard or declared, and every series description
that can be produced must fit DICOM's 64-character LO limit together with the disclaimer.
Problems raise :class:`ConfigurationError` naming the file and the entry.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ms_forecast_node.errors import ConfigurationError

DEFAULT_TEMPLATES_DIR = Path(__file__).resolve().parents[3] / "dicom_templates"
# Installed wheels carry a copy (kept identical by tests/test_packaged_templates.py).
PACKAGED_TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "data" / "dicom_templates"


def default_templates_dir() -> Path:
    """``$MSFN_TEMPLATES``, else the source checkout's ``dicom_templates/``, else the copy
    inside the installed package."""
    override = os.environ.get("MSFN_TEMPLATES")
    if override:
        return Path(override)
    if (DEFAULT_TEMPLATES_DIR / OUTPUTS_FILE).is_file():
        return DEFAULT_TEMPLATES_DIR
    return PACKAGED_TEMPLATES_DIR


OUTPUTS_FILE = "outputs.yaml"
CODES_FILE = "codes.yaml"

#: DICOM LO (Series Description, Manufacturer, ...) holds at most 64 characters.
LO_MAX = 64
#: Longest UID root accepted: leaves >= 24 decimal digits (about 80 bits) for the hash part.
UID_ROOT_MAX = 40
#: Coding scheme designators DICOM defines itself (PS3.16 section 8); others must be declared.
STANDARD_SCHEMES = frozenset(
    {"DCM", "SCT", "LN", "UCUM", "UMLS", "RADLEX", "NCIt", "RXNORM", "FMA", "MSH", "I10"}
)
_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
# DICOM SH/LO default repertoire: printable ASCII without backslash (the value separator).
_ASCII_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]*$")


class OutputKind(str, enum.Enum):
    """The kinds of output object :func:`ms_forecast_node.report.build.build_outputs` makes."""

    SEG = "seg"
    PROBABILITY_SEG = "probability_seg"
    SR = "sr"
    COMPARISON_SR = "comparison_sr"
    KEY_IMAGES = "key_images"
    PDF = "pdf"

    @property
    def per_therapy(self) -> bool:
        return self not in (OutputKind.COMPARISON_SR, OutputKind.PDF)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# codes.yaml
# --------------------------------------------------------------------------------------------
class CodeSpec(_Strict):
    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)

    def concept(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(self.value, self.scheme, self.meaning)


class CodingSchemeSpec(_Strict):
    designator: str = Field(min_length=1, max_length=16)
    name: str = Field(min_length=1, max_length=64)
    version: str | None = Field(default=None, max_length=16)
    uid: str | None = Field(default=None, max_length=64)
    responsible_organization: str | None = Field(default=None, max_length=64)

    def item(self) -> hd.coding_schemes.CodingSchemeIdentificationItem:
        return hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=self.designator,
            name=self.name,
            version=self.version,
            uid=self.uid,
            responsible_organization=self.responsible_organization,
        )


class TherapySpec(_Strict):
    label: str = Field(min_length=1, max_length=64)
    short_label: str = Field(min_length=1, max_length=16)
    code: CodeSpec

    @field_validator("short_label")
    @classmethod
    def _ascii_short_label(cls, value: str) -> str:
        if not _ASCII_RE.match(value):
            raise ValueError("short_label goes into series descriptions: printable ASCII only")
        return value


class ConceptsSpec(_Strict):
    segmented_property_category: CodeSpec
    segmented_property_type: CodeSpec
    forecast_net2_lesion: CodeSpec
    procedure_reported: CodeSpec
    therapy: CodeSpec
    number_of_lesions: CodeSpec
    volume: CodeSpec
    mean: CodeSpec
    percentile_5: CodeSpec
    percentile_95: CodeSpec
    probability_of_activity: CodeSpec
    forecast_horizon: CodeSpec
    mean_lesion_probability: CodeSpec
    rank: CodeSpec
    centroid_x: CodeSpec
    centroid_y: CodeSpec
    centroid_z: CodeSpec
    finding_site: CodeSpec
    qualitative_evaluations: CodeSpec
    comment: CodeSpec
    comparison_title: CodeSpec
    summary_document: CodeSpec


class UnitsSpec(_Strict):
    lesions: CodeSpec
    cubic_millimetre: CodeSpec
    millimetre: CodeSpec
    probability: CodeSpec
    weeks: CodeSpec
    rank: CodeSpec


class LocationsSpec(_Strict):
    periventricular: CodeSpec
    juxtacortical: CodeSpec
    infratentorial: CodeSpec
    deep_white_matter: CodeSpec


class CodesTemplate(_Strict):
    schema_version: int = Field(ge=1, le=1)
    coding_schemes: list[CodingSchemeSpec] = Field(default_factory=list)
    therapies: dict[str, TherapySpec] = Field(min_length=1)
    locations: LocationsSpec
    concepts: ConceptsSpec
    units: UnitsSpec

    @model_validator(mode="after")
    def _schemes_are_known(self) -> CodesTemplate:
        declared = {s.designator for s in self.coding_schemes}
        known = STANDARD_SCHEMES | declared
        for where, code in self._all_codes():
            if code.scheme not in known:
                raise ValueError(
                    f"{where}: coding scheme {code.scheme!r} is neither standard nor declared "
                    f"under coding_schemes (declared: {sorted(declared)})"
                )
        return self

    def _all_codes(self) -> list[tuple[str, CodeSpec]]:
        out = [(f"therapies.{k}.code", t.code) for k, t in self.therapies.items()]
        for group in ("locations", "concepts", "units"):
            spec = getattr(self, group)
            out += [(f"{group}.{name}", getattr(spec, name)) for name in type(spec).model_fields]
        return out

    def location(self, location: str) -> CodeSpec:
        spec = getattr(self.locations, str(location), None)
        if not isinstance(spec, CodeSpec):
            raise ConfigurationError(f"{CODES_FILE}: no code for location class {location!r}")
        return spec

    def used_schemes(self) -> list[CodingSchemeSpec]:
        """Declared (local) schemes, for the Coding Scheme Identification Sequence."""
        return list(self.coding_schemes)


# --------------------------------------------------------------------------------------------
# outputs.yaml
# --------------------------------------------------------------------------------------------
class SeriesSpec(_Strict):
    number: int = Field(ge=1, le=2**31 - 1 - 1000)
    description: str = Field(min_length=1, max_length=LO_MAX)

    def render(self, therapy_short_label: str | None) -> str:
        try:
            return self.description.format(therapy=therapy_short_label or "")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(
                f"{OUTPUTS_FILE}: series description {self.description!r}: only the "
                f"placeholder {{therapy}} is allowed ({exc})"
            ) from exc


class SeriesTable(_Strict):
    seg: SeriesSpec
    probability_seg: SeriesSpec
    sr: SeriesSpec
    comparison_sr: SeriesSpec
    key_images: SeriesSpec
    pdf: SeriesSpec

    def of(self, kind: OutputKind) -> SeriesSpec:
        spec: SeriesSpec = getattr(self, kind.value)
        return spec


class EquipmentSpec(_Strict):
    manufacturer: str = Field(min_length=1, max_length=LO_MAX)
    manufacturer_model_name: str = Field(min_length=1, max_length=LO_MAX)
    device_serial_number: str = Field(min_length=1, max_length=LO_MAX)
    institution_name: str = Field(default="", max_length=LO_MAX)
    institutional_department_name: str = Field(default="", max_length=LO_MAX)


class ColourSpec(_Strict):
    rgb: tuple[int, int, int] | None = None
    cielab: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ColourSpec:
        if (self.rgb is None) == (self.cielab is None):
            raise ValueError("give exactly one of rgb: [r, g, b] or cielab: [L, a, b]")
        if self.rgb is not None and not all(0 <= c <= 255 for c in self.rgb):
            raise ValueError(f"rgb components must be 0..255, got {self.rgb}")
        if self.cielab is not None:
            lab = self.cielab
            if not (0 <= lab[0] <= 100 and -128 <= lab[1] <= 127 and -128 <= lab[2] <= 127):
                raise ValueError(f"cielab must be L* 0..100, a*/b* -128..127, got {lab}")
            try:
                hd.color.CIELabColor(*lab).to_rgb()
            except ValueError as exc:
                raise ValueError(f"cielab {lab} has no sRGB equivalent: {exc}") from exc
        # Overlays are blended onto grey-scale anatomy: a grey colour would be invisible and
        # would make the overlay check (coloured pixel <=> mask) meaningless.
        r, g, b = self.as_rgb()
        if max(r, g, b) - min(r, g, b) < 40:
            raise ValueError(f"colour {self.as_rgb()} is too close to grey for an overlay")
        return self

    def as_rgb(self) -> tuple[int, int, int]:
        if self.rgb is not None:
            return (int(self.rgb[0]), int(self.rgb[1]), int(self.rgb[2]))
        assert self.cielab is not None
        return hd.color.CIELabColor(*self.cielab).to_rgb()

    def as_cielab(self) -> hd.color.CIELabColor:
        if self.cielab is not None:
            return hd.color.CIELabColor(*self.cielab)
        return hd.color.CIELabColor.from_rgb(*self.as_rgb())


class SegSpec(_Strict):
    segment_label: str = Field(min_length=1, max_length=LO_MAX)
    probability_segment_label: str = Field(min_length=1, max_length=LO_MAX)
    max_fractional_value: int = Field(ge=1, le=255)


class KeyImageSpec(_Strict):
    per_therapy: int = Field(ge=1, le=20)
    min_separation_mm: float = Field(ge=0.0)
    opacity: float = Field(gt=0.0, le=1.0)
    window_percentiles: tuple[float, float]
    zoom: int = Field(ge=1, le=4)

    @field_validator("window_percentiles")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] < value[1] <= 100.0:
            raise ValueError(f"window_percentiles must be 0 <= low < high <= 100, got {value}")
        return value


class ReportTextSpec(_Strict):
    title: str = Field(min_length=1, max_length=200)
    method: str = Field(min_length=1, max_length=2000)
    comparison_note: str = Field(min_length=1, max_length=1000)
    empty_forecast: str = Field(min_length=1, max_length=1000)


class OutputsTemplate(_Strict):
    schema_version: int = Field(ge=1, le=1)
    uid_root: str
    produce: list[OutputKind] = Field(min_length=1)
    equipment: EquipmentSpec
    disclaimer: str = Field(min_length=1, max_length=200)
    series: SeriesTable
    colours: dict[str, ColourSpec]
    seg: SegSpec
    key_images: KeyImageSpec
    report: ReportTextSpec

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        if len(value) > UID_ROOT_MAX or not _UID_ROOT_RE.match(value):
            raise ValueError(
                f"uid_root must be a dotted numeric UID prefix ending with '.', at most "
                f"{UID_ROOT_MAX} characters (got {value!r})"
            )
        return value

    @property
    def disclaimer_ascii(self) -> str:
        """The disclaimer as DICOM's default character repertoire allows it (LO, SH, ST)."""
        return ascii_text(self.disclaimer)


def ascii_text(text: str) -> str:
    """Dashes and quotes folded to ASCII; other non-ASCII characters dropped."""
    for src, dst in (("—", "-"), ("–", "-"), ("‘", "'"), ("’", "'"), ("“", '"'), ("”", '"')):
        text = text.replace(src, dst)
    return text.encode("ascii", "ignore").decode("ascii")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Templates:
    """Both validated templates; the only configuration the report builders read."""

    outputs: OutputsTemplate
    codes: CodesTemplate

    def therapy(self, key: str) -> TherapySpec:
        try:
            return self.codes.therapies[key]
        except KeyError:
            known = sorted(self.codes.therapies)
            raise ConfigurationError(
                f"{CODES_FILE}: therapy {key!r} has no entry (known: {known})"
            ) from None

    def therapy_index(self, key: str) -> int:
        self.therapy(key)
        return list(self.codes.therapies).index(key)

    def colour(self, key: str) -> ColourSpec:
        try:
            return self.outputs.colours[key]
        except KeyError:
            raise ConfigurationError(f"{OUTPUTS_FILE}: therapy {key!r} has no colour") from None

    def series_description(self, kind: OutputKind, therapy: str | None) -> str:
        label = self.therapy(therapy).short_label if therapy is not None else None
        text = (
            f"{self.outputs.series.of(kind).render(label).strip()} {self.outputs.disclaimer_ascii}"
        )
        return text.strip()

    def series_number(self, kind: OutputKind, therapy: str | None) -> int:
        offset = self.therapy_index(therapy) if therapy is not None else 0
        return self.outputs.series.of(kind).number + offset


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigurationError(f"template file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: expected a mapping at the top level")
    return data


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return f"{path}: invalid template\n" + "\n".join(lines)


def _cross_check(templates: Templates, outputs_path: Path) -> None:
    therapies = list(templates.codes.therapies)
    missing = [t for t in therapies if t not in templates.outputs.colours]
    if missing:
        raise ConfigurationError(f"{outputs_path}: colours: no colour for therapies {missing}")
    for kind in OutputKind:
        for therapy in therapies if kind.per_therapy else [None]:
            text = templates.series_description(kind, therapy)
            if len(text) > LO_MAX or not _ASCII_RE.match(text):
                raise ConfigurationError(
                    f"{outputs_path}: series.{kind.value}: description {text!r} for therapy "
                    f"{therapy!r} is longer than {LO_MAX} characters or not printable ASCII "
                    "(the disclaimer is appended to every description)"
                )


def load_templates(directory: Path | None = None) -> Templates:
    """Load and validate ``outputs.yaml`` and ``codes.yaml`` from ``directory``
    (default: the repository's ``dicom_templates/``)."""
    folder = Path(directory) if directory is not None else default_templates_dir()
    outputs_path, codes_path = folder / OUTPUTS_FILE, folder / CODES_FILE
    try:
        codes = CodesTemplate.model_validate(_read_yaml(codes_path))
    except ValidationError as exc:
        raise ConfigurationError(_format_errors(codes_path, exc)) from exc
    try:
        outputs = OutputsTemplate.model_validate(_read_yaml(outputs_path))
    except ValidationError as exc:
        raise ConfigurationError(_format_errors(outputs_path, exc)) from exc
    templates = Templates(outputs=outputs, codes=codes)
    _cross_check(templates, outputs_path)
    return templates
