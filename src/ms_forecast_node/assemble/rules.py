"""The institution-editable series rules (``dicom_templates/series_rules.yaml``).

The YAML is validated with pydantic on load; any problem raises :class:`SeriesRulesError`
naming the file and the offending field (``rules[3].class``), because a rule that silently does
nothing would send the wrong series to the forecaster. This module also holds the attribute
record the rules look at (:class:`SeriesAttributes`) and the matching itself, so that what a
rule means is defined in one place.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from ms_forecast_node.errors import SeriesRulesError

__all__ = [
    "ENV_RULES_PATH",
    "ClassRule",
    "PreferenceKey",
    "SeriesAttributes",
    "SeriesClass",
    "SeriesRules",
    "SkipCategory",
    "classify",
    "default_rules_path",
    "derived_reason",
    "load_series_rules",
    "localizer_reason",
    "skip_reason",
]

#: Environment variable naming a site's own rules file; it wins over every default.
ENV_RULES_PATH = "MSFN_SERIES_RULES"
RULES_FILE_NAME = "series_rules.yaml"
#: The editable copy in a source checkout / installation folder.
REPO_RULES_PATH = Path(__file__).resolve().parents[3] / "dicom_templates" / RULES_FILE_NAME
#: The copy shipped inside the wheel, for installs without the repository folders.
PACKAGED_RULES_PATH = (
    Path(__file__).resolve().parents[1] / "data" / "dicom_templates" / RULES_FILE_NAME
)

#: Slice thickness and pixel area are compared at these resolutions so that scanner rounding
#: (1.0 vs 1.0000001 mm) does not decide between two series.
THICKNESS_RESOLUTION_MM = 0.1
PIXEL_AREA_RESOLUTION_MM2 = 0.01


class SeriesClass(str, enum.Enum):
    """What a series is, as far as the forecaster is concerned."""

    FLAIR = "FLAIR"
    T1 = "T1"
    T1C = "T1C"  # T1 after a contrast agent
    T2 = "T2"
    PD = "PD"
    OTHER = "OTHER"


class SkipCategory(str, enum.Enum):
    """Why a series is listed but not used."""

    MODALITY = "modality"
    LOCALIZER = "localizer"
    DERIVED = "derived"
    TOO_FEW_SLICES = "too_few_slices"


class PreferenceKey(str, enum.Enum):
    """Criteria that rank several candidate series of one class (see the YAML)."""

    ORIGINAL_OVER_DERIVED = "original_over_derived"
    PREFER_3D = "prefer_3d"
    THINNER_SLICES = "thinner_slices"
    FINER_IN_PLANE = "finer_in_plane"
    MORE_SLICES = "more_slices"
    LATER_SERIES = "later_series"
    EARLIER_SERIES = "earlier_series"


class AcquisitionDimension(str, enum.Enum):
    """DICOM MRAcquisitionType (0018,0023) values."""

    TWO_D = "2D"
    THREE_D = "3D"


# --------------------------------------------------------------------------------------------
# The attributes the rules look at
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesAttributes:
    """Classification-relevant attributes of a series, read from its first instance.

    Enhanced MR values come from the functional groups (shared first, else the first frame);
    ``image_types`` holds every distinct ImageType of the series' instances.
    """

    description: str = ""
    protocol_name: str = ""
    sequence_name: str = ""  # SequenceName (classic) or PulseSequenceName (enhanced)
    image_type: tuple[str, ...] = ()
    image_types: tuple[tuple[str, ...], ...] = ()
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    mr_acquisition_type: str | None = None
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    inversion_time_ms: float | None = None
    inversion_recovery: bool = False
    acquisition_contrast: str | None = None
    contrast_agent: str | None = None  # ContrastBolusAgent (or the enhanced agent's meaning)
    contrast_administered: bool | None = None  # Enhanced Contrast/Bolus usage, when present
    slice_thickness_mm: float | None = None
    pixel_spacing_mm: tuple[float, float] | None = None

    @property
    def all_image_type_values(self) -> set[str]:
        values = {v.upper() for v in self.image_type}
        for image_type in self.image_types:
            values.update(v.upper() for v in image_type)
        return values

    @property
    def is_derived_image(self) -> bool:
        types = self.image_types or (self.image_type,)
        return any(t and t[0].upper() == "DERIVED" for t in types)

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "protocol_name": self.protocol_name,
            "sequence_name": self.sequence_name,
            "image_type": list(self.image_type),
            "scanning_sequence": list(self.scanning_sequence),
            "sequence_variant": list(self.sequence_variant),
            "mr_acquisition_type": self.mr_acquisition_type,
            "echo_time_ms": self.echo_time_ms,
            "repetition_time_ms": self.repetition_time_ms,
            "inversion_time_ms": self.inversion_time_ms,
            "inversion_recovery": self.inversion_recovery,
            "acquisition_contrast": self.acquisition_contrast,
            "contrast_agent": self.contrast_agent,
            "contrast_administered": self.contrast_administered,
            "slice_thickness_mm": self.slice_thickness_mm,
            "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
        }


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------
def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
    return pattern


def _upper_words(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v.strip().upper() for v in values)


Regex = Annotated[str, AfterValidator(_check_regex)]
Words = Annotated[tuple[str, ...], AfterValidator(_upper_words)]


class _Model(BaseModel):
    # Unknown keys are errors: a misspelt condition must not turn a rule into "match all".
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Range(_Model):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"in [{self.min:g}, {self.max:g}]"
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"


class SelectionRules(_Model):
    required: tuple[SeriesClass, ...] = (SeriesClass.FLAIR,)
    wanted: tuple[SeriesClass, ...] = (
        SeriesClass.T1,
        SeriesClass.T1C,
        SeriesClass.T2,
        SeriesClass.PD,
    )
    reference: SeriesClass = SeriesClass.FLAIR
    preference: tuple[PreferenceKey, ...] = (
        PreferenceKey.ORIGINAL_OVER_DERIVED,
        PreferenceKey.PREFER_3D,
        PreferenceKey.THINNER_SLICES,
        PreferenceKey.MORE_SLICES,
        PreferenceKey.LATER_SERIES,
    )
    preference_by_class: dict[SeriesClass, tuple[PreferenceKey, ...]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> SelectionRules:
        if not self.required:
            raise ValueError("at least one class must be required")
        if SeriesClass.OTHER in self.required or SeriesClass.OTHER in self.wanted:
            raise ValueError("OTHER cannot be required or wanted")
        if self.reference not in self.required:
            raise ValueError(
                f"reference {self.reference.value} must be one of the required classes "
                f"{[c.value for c in self.required]}"
            )
        return self

    @property
    def used_classes(self) -> tuple[SeriesClass, ...]:
        """Required then wanted classes, each once, in file order."""
        return tuple(dict.fromkeys((*self.required, *self.wanted)))

    def preference_for(self, series_class: SeriesClass) -> tuple[PreferenceKey, ...]:
        return self.preference_by_class.get(series_class, self.preference)


class LocalizerRules(_Model):
    keep: bool = False
    image_type_values: Words = ("LOCALIZER",)
    description_patterns: tuple[Regex, ...] = ()


class DerivedRules(_Model):
    keep: bool = False
    image_type_value1: Words = ("DERIVED",)
    image_type_value2: Words = ("SECONDARY",)
    image_type_values: Words = ()
    description_patterns: tuple[Regex, ...] = ()


class SkipRules(_Model):
    modalities: Words = ("MR",)
    localizer: LocalizerRules = LocalizerRules()
    derived: DerivedRules = DerivedRules()
    min_slices: int = Field(default=8, ge=1)


class PostContrastRules(_Model):
    use_contrast_agent_attribute: bool = True
    agent_none_values: Words = ("NONE", "NO")
    description_patterns: tuple[Regex, ...] = ()
    description_excludes: tuple[Regex, ...] = ()


class ClassRule(_Model):
    """One classification rule: every condition given must hold (see the YAML)."""

    name: str = Field(min_length=1)
    series_class: SeriesClass = Field(alias="class")
    description: Regex | None = None
    description_excludes: Regex | None = None
    sequence_name: Regex | None = None
    acquisition_contrast: Words | None = None
    scanning_sequence_includes: Words = ()
    scanning_sequence_excludes: Words = ()
    sequence_variant_includes: Words = ()
    image_type_includes: Words = ()
    mr_acquisition_type: tuple[AcquisitionDimension, ...] | None = None
    inversion_recovery: bool | None = None
    echo_time_ms: Range | None = None
    repetition_time_ms: Range | None = None
    inversion_time_ms: Range | None = None
    contrast_agent: bool | None = None

    @model_validator(mode="after")
    def _has_condition(self) -> ClassRule:
        conditions = self.model_dump(exclude={"name", "series_class"}, exclude_defaults=True)
        if not conditions:
            raise ValueError(f"rule {self.name!r} has no condition and would match every series")
        return self


class SeriesRules(_Model):
    version: Literal[1]
    selection: SelectionRules = SelectionRules()
    skip: SkipRules = SkipRules()
    post_contrast: PostContrastRules = PostContrastRules()
    rules: tuple[ClassRule, ...] = Field(min_length=1)
    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _unique_names(self) -> SeriesRules:
        names = [r.name for r in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique; repeated: {duplicates}")
        return self

    @property
    def source(self) -> str | None:
        """The file the rules were loaded from (None when built in code)."""
        return self._source


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def default_rules_path() -> Path:
    """``$MSFN_SERIES_RULES``, else the repository's ``dicom_templates/``, else the packaged
    copy under ``ms_forecast_node/data/dicom_templates/``."""
    override = os.environ.get(ENV_RULES_PATH, "").strip()
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise SeriesRulesError(
                f"{ENV_RULES_PATH}={override!r} does not name a readable file",
                reason="series_rules_missing",
            )
        return path
    for candidate in (REPO_RULES_PATH, PACKAGED_RULES_PATH):
        if candidate.is_file():
            return candidate
    raise SeriesRulesError(
        f"no series rules file found; looked at {REPO_RULES_PATH} and {PACKAGED_RULES_PATH} "
        f"(set {ENV_RULES_PATH} to name one)",
        reason="series_rules_missing",
    )


def _field_path(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        # Pydantic adds the failing type's name (e.g. "function-after[...]") to the location;
        # IT needs the YAML path only.
        loc = [p for p in error["loc"] if isinstance(p, int) or "[" not in str(p)]
        # YAML has lists, not tuples: say "list" to the person editing the file.
        message = str(error["msg"]).removeprefix("Value error, ")
        message = message.replace("a valid tuple", "a list").replace("Tuple should", "List should")
        given = error.get("input")
        shown = ""
        if isinstance(given, (str, int, float, bool)) and error["type"] != "missing":
            shown = f" (got {given!r})"
        lines.append(f"{_field_path(loc)}: {message}{shown}")
    return f"series rules file {path} is invalid:\n  " + "\n  ".join(lines)


def load_series_rules(path: Path | str | None = None) -> SeriesRules:
    """Load and validate a rules file (default: :func:`default_rules_path`)."""
    path = Path(path) if path is not None else default_rules_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SeriesRulesError(
            f"cannot read series rules file {path}: {exc}", reason="series_rules_missing"
        ) from exc
    except yaml.YAMLError as exc:
        raise SeriesRulesError(f"series rules file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SeriesRulesError(f"series rules file {path}: expected a mapping at the top level")
    try:
        rules = SeriesRules.model_validate(raw)
    except ValidationError as exc:
        raise SeriesRulesError(_format_errors(path, exc)) from exc
    rules._source = str(path)
    return rules


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------
def _dicom_multi(values: Sequence[str]) -> str:
    """A multi-valued attribute as DICOM writes it: values joined by backslashes."""
    return "\\".join(values)


def _search(pattern: str, text: str) -> bool:
    return bool(text) and re.search(pattern, text, re.IGNORECASE) is not None


def _named_text(attrs: SeriesAttributes, pattern: str) -> str | None:
    """Which of SeriesDescription / ProtocolName matches ``pattern`` (as a reason text)."""
    for label, text in (
        ("SeriesDescription", attrs.description),
        ("ProtocolName", attrs.protocol_name),
    ):
        found = re.search(pattern, text, re.IGNORECASE) if text else None
        if found is not None:
            return f"{label} {text!r} contains {found.group(0)!r}"
    return None


def has_contrast_agent(attrs: SeriesAttributes, none_values: Sequence[str]) -> bool:
    if attrs.contrast_administered is not None:
        return attrs.contrast_administered
    agent = (attrs.contrast_agent or "").strip()
    return bool(agent) and agent.upper() not in set(none_values)


def _number_condition(name: str, value: float | None, wanted: Range | None) -> str | bool:
    """True when there is no condition, a reason text when it holds, False otherwise."""
    if wanted is None:
        return True
    if value is None or not wanted.contains(value):
        return False
    return f"{name} {value:g} {wanted.describe()}"


def _rule_match(rule: ClassRule, a: SeriesAttributes, rules: SeriesRules) -> str | None:
    """The reason text when every condition of ``rule`` holds, else None."""
    why: list[str] = []
    if rule.description is not None:
        hit = _named_text(a, rule.description)
        if hit is None:
            return None
        why.append(hit)
    if rule.description_excludes is not None and _named_text(a, rule.description_excludes):
        return None
    if rule.sequence_name is not None:
        if not _search(rule.sequence_name, a.sequence_name):
            return None
        why.append(f"sequence name {a.sequence_name!r}")
    if rule.acquisition_contrast is not None:
        contrast = (a.acquisition_contrast or "").upper()
        if contrast not in rule.acquisition_contrast:
            return None
        why.append(f"AcquisitionContrast {contrast}")
    scanning = {v.upper() for v in a.scanning_sequence}
    if not set(rule.scanning_sequence_includes) <= scanning:
        return None
    if scanning & set(rule.scanning_sequence_excludes):
        return None
    if rule.scanning_sequence_includes:
        why.append(f"ScanningSequence {_dicom_multi(a.scanning_sequence)}")
    if not set(rule.sequence_variant_includes) <= {v.upper() for v in a.sequence_variant}:
        return None
    if not set(rule.image_type_includes) <= a.all_image_type_values:
        return None
    if rule.mr_acquisition_type is not None:
        if (a.mr_acquisition_type or "").upper() not in {d.value for d in rule.mr_acquisition_type}:
            return None
        why.append(f"MRAcquisitionType {a.mr_acquisition_type}")
    if rule.inversion_recovery is not None:
        if a.inversion_recovery != rule.inversion_recovery:
            return None
        why.append("inversion recovery" if a.inversion_recovery else "no inversion")
    for name, value, wanted in (
        ("TE", a.echo_time_ms, rule.echo_time_ms),
        ("TR", a.repetition_time_ms, rule.repetition_time_ms),
        ("TI", a.inversion_time_ms, rule.inversion_time_ms),
    ):
        held = _number_condition(name, value, wanted)
        if held is False:
            return None
        if isinstance(held, str):
            why.append(held)
    if rule.contrast_agent is not None:
        agent = has_contrast_agent(a, rules.post_contrast.agent_none_values)
        if agent != rule.contrast_agent:
            return None
        why.append("contrast agent given" if agent else "no contrast agent")
    return ", ".join(why)


def _post_contrast(a: SeriesAttributes, rules: SeriesRules) -> str | None:
    pc = rules.post_contrast
    if pc.use_contrast_agent_attribute and has_contrast_agent(a, pc.agent_none_values):
        if a.contrast_administered is not None:
            return "the Enhanced Contrast/Bolus module says an agent was administered"
        return f"ContrastBolusAgent {a.contrast_agent!r}"
    if any(_named_text(a, p) for p in pc.description_excludes):
        return None
    for pattern in pc.description_patterns:
        hit = _named_text(a, pattern)
        if hit is not None:
            return hit
    return None


def classify(attrs: SeriesAttributes, rules: SeriesRules) -> tuple[SeriesClass, str]:
    """The class of a series and a human-readable reason (which rule matched and on what)."""
    for rule in rules.rules:
        why = _rule_match(rule, attrs, rules)
        if why is None:
            continue
        reason = f"rule {rule.name!r}: {why}"
        if rule.series_class is SeriesClass.T1:
            contrast = _post_contrast(attrs, rules)
            if contrast is not None:
                return SeriesClass.T1C, f"{reason}; post-contrast: {contrast}"
        return rule.series_class, reason
    return SeriesClass.OTHER, "no classification rule matched"


def localizer_reason(attrs: SeriesAttributes, rules: SeriesRules) -> str | None:
    """Why the series looks like a localizer (whether or not localizers are kept)."""
    loc = rules.skip.localizer
    hit_words = sorted(attrs.all_image_type_values & set(loc.image_type_values))
    if hit_words:
        return f"localizer (ImageType {', '.join(hit_words)})"
    for pattern in loc.description_patterns:
        hit = _named_text(attrs, pattern)
        if hit is not None:
            return f"localizer ({hit})"
    return None


def derived_reason(attrs: SeriesAttributes, rules: SeriesRules) -> str | None:
    """Why the series looks derived or reformatted (whether or not such series are kept);
    the selection ranks these after original series when they are kept."""
    der = rules.skip.derived
    for image_type in attrs.image_types or (attrs.image_type,):
        upper = [v.upper() for v in image_type]
        if (upper[:1] and upper[0] in der.image_type_value1) or (
            len(upper) > 1 and upper[1] in der.image_type_value2
        ):
            return f"derived or secondary image (ImageType {_dicom_multi(image_type)})"
    hit_words = sorted(attrs.all_image_type_values & set(der.image_type_values))
    if hit_words:
        return f"reformat or projection (ImageType {', '.join(hit_words)})"
    for pattern in der.description_patterns:
        hit = _named_text(attrs, pattern)
        if hit is not None:
            return f"reformat or projection ({hit})"
    return None


def skip_reason(
    attrs: SeriesAttributes, modality: str, n_slices: int, rules: SeriesRules
) -> tuple[SkipCategory, str] | None:
    """Why a series must not be used (category and text), or None when it is usable."""
    skip = rules.skip
    if modality.upper() not in skip.modalities:
        return SkipCategory.MODALITY, (
            f"modality {modality or '(none)'} is not used (allowed: {', '.join(skip.modalities)})"
        )
    localizer = None if skip.localizer.keep else localizer_reason(attrs, rules)
    if localizer is not None:
        return SkipCategory.LOCALIZER, localizer
    derived = None if skip.derived.keep else derived_reason(attrs, rules)
    if derived is not None:
        return SkipCategory.DERIVED, derived
    if n_slices < skip.min_slices:
        return SkipCategory.TOO_FEW_SLICES, (
            f"{n_slices} slice(s), fewer than the {skip.min_slices} a volume needs"
        )
    return None
