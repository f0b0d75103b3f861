"""Series inventory of a study and the choice of one series per class.

:func:`inventory` reads the headers of every file (never the pixels), groups them by study and
series, classifies each series with the site's rules and records why a series is skipped
(localizer, derived, reformat, too few slices, not MR). :func:`select_series` then chooses one
series per class for one study and says why, or raises :class:`SeriesSelectionError` with a
reason code IT can look up. Both results have ``to_json()`` for the job state.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from ms_forecast_node.assemble.rules import (
    PIXEL_AREA_RESOLUTION_MM2,
    THICKNESS_RESOLUTION_MM,
    PreferenceKey,
    SeriesAttributes,
    SeriesClass,
    SeriesRules,
    SkipCategory,
    classify,
    derived_reason,
    load_series_rules,
    skip_reason,
)
from ms_forecast_node.errors import SeriesSelectionError

__all__ = [
    "Choice",
    "IgnoredFile",
    "Selection",
    "SeriesClass",
    "SeriesInfo",
    "StudyInventory",
    "inventory",
    "select_series",
]

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IgnoredFile:
    """A file that is not part of any series (not DICOM, a DICOMDIR, unreadable)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study as the inventory sees it (headers only)."""

    series_instance_uid: str
    study_instance_uid: str
    series_number: int | None
    description: str
    modality: str
    sop_class_uid: str
    files: tuple[Path, ...]  # sorted by InstanceNumber, then path
    n_instances: int
    n_frames: int  # slices: one per single-frame instance, NumberOfFrames per multi-frame one
    attributes: SeriesAttributes
    series_class: SeriesClass
    reason: str  # which classification rule matched, on what
    skipped_reason: str | None  # None when the series may be used
    skip_category: SkipCategory | None = None
    derived: bool = False  # derived image or reformat, even when such series are kept
    patient_id: str = ""
    study_date: str = ""
    frame_of_reference_uid: str = ""

    @property
    def usable(self) -> bool:
        return self.skipped_reason is None

    @property
    def is_multiframe(self) -> bool:
        return self.n_frames > self.n_instances

    @property
    def label(self) -> str:
        """Short human-readable name: ``#301 'MPRAGE_S2'``."""
        number = "#?" if self.series_number is None else f"#{self.series_number}"
        return f"{number} {self.description!r}"

    def to_json(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "series_number": self.series_number,
            "description": self.description,
            "modality": self.modality,
            "sop_class_uid": self.sop_class_uid,
            "n_instances": self.n_instances,
            "n_frames": self.n_frames,
            "series_class": self.series_class.value,
            "reason": self.reason,
            "skipped_reason": self.skipped_reason,
            "skip_category": self.skip_category.value if self.skip_category else None,
            "derived": self.derived,
            "attributes": self.attributes.to_json(),
            "folders": sorted({str(p.parent) for p in self.files}),
        }


@dataclass(frozen=True)
class StudyInventory:
    """Every series found in a set of files, grouped by study; plus the files ignored."""

    series: tuple[SeriesInfo, ...]
    ignored: tuple[IgnoredFile, ...] = ()
    rules_source: str | None = None

    @property
    def study_instance_uids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.study_instance_uid for s in self.series))

    def for_study(self, study_instance_uid: str) -> StudyInventory:
        return StudyInventory(
            tuple(s for s in self.series if s.study_instance_uid == study_instance_uid),
            self.ignored,
            self.rules_source,
        )

    def by_class(self, series_class: SeriesClass, *, usable_only: bool = True) -> list[SeriesInfo]:
        return [
            s
            for s in self.series
            if s.series_class is series_class and (s.usable or not usable_only)
        ]

    def get(self, series_instance_uid: str) -> SeriesInfo:
        for s in self.series:
            if s.series_instance_uid == series_instance_uid:
                return s
        raise KeyError(series_instance_uid)

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": self.rules_source,
            "studies": list(self.study_instance_uids),
            "series": [s.to_json() for s in self.series],
            "ignored_files": [{"path": str(f.path), "reason": f.reason} for f in self.ignored],
        }


# --------------------------------------------------------------------------------------------
# Header reading
# --------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _words(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return (str(value).strip(),)


def _number(value: Any) -> float | None:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    if seq is None or not isinstance(seq, pydicom.sequence.Sequence) or len(seq) == 0:
        return None
    item = seq[0]
    return item if isinstance(item, Dataset) else None


def _functional(ds: Dataset, macro: str, keyword: str) -> Any:
    """An Enhanced MR functional group value: shared groups first, else the first frame's.

    Frames of one series can differ (multi-echo); the first frame stands for the series here,
    the per-frame values matter to conversion, not to classification.
    """
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        item = _first_item(_first_item(ds, groups), macro)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _value(ds: Dataset, keyword: str, macro: str | None = None, inner: str | None = None) -> Any:
    """A top-level attribute, else its Enhanced MR functional group equivalent."""
    value = ds.get(keyword)
    if value not in (None, "") or macro is None:
        return value
    return _functional(ds, macro, inner or keyword)


def _enhanced_scanning_sequence(ds: Dataset) -> tuple[str, ...]:
    """Enhanced MR has no ScanningSequence; rebuild its classic meaning from the MR Pulse
    Sequence module so that the same rules apply to both kinds of objects."""
    words: list[str] = []
    echo = _text(ds.get("EchoPulseSequence")).upper()
    if echo in ("SPIN", "BOTH"):
        words.append("SE")
    if echo in ("GRADIENT", "BOTH"):
        words.append("GR")
    if _text(_functional(ds, "MRModifierSequence", "InversionRecovery")).upper() == "YES":
        words.append("IR")
    if _text(ds.get("EchoPlanarPulseSequence")).upper() == "YES":
        words.append("EP")
    return tuple(words)


def _contrast(ds: Dataset) -> tuple[str | None, bool | None]:
    """(agent text, administered flag) from the classic or the Enhanced Contrast/Bolus module."""
    agent = _text(ds.get("ContrastBolusAgent")) or None
    administered: bool | None = None
    item = _first_item(ds, "ContrastBolusAgentSequence")
    if item is not None and agent is None:
        agent = _text(item.get("CodeMeaning")) or _text(item.get("CodeValue")) or None
    usage = _functional(ds, "ContrastBolusUsageSequence", "ContrastBolusAgentAdministered")
    if usage is not None:
        administered = _text(usage).upper() == "YES"
    return agent, administered


def series_attributes(ds: Dataset, image_types: Iterable[tuple[str, ...]] = ()) -> SeriesAttributes:
    """The classification attributes of a classic or Enhanced MR header."""
    image_type = _words(ds.get("ImageType"))
    scanning = _words(ds.get("ScanningSequence")) or _enhanced_scanning_sequence(ds)
    te = _number(_value(ds, "EchoTime", "MREchoSequence", "EffectiveEchoTime"))
    tr = _number(_value(ds, "RepetitionTime", "MRTimingAndRelatedParametersSequence"))
    ti = _number(_value(ds, "InversionTime", "MRModifierSequence", "InversionTimes"))
    ir_flag = _text(_functional(ds, "MRModifierSequence", "InversionRecovery")).upper() == "YES"
    contrast = _text(
        _value(ds, "AcquisitionContrast", "MRImageFrameTypeSequence", "AcquisitionContrast")
    )
    thickness = _number(_value(ds, "SliceThickness", "PixelMeasuresSequence"))
    spacing = _value(ds, "PixelSpacing", "PixelMeasuresSequence")
    pixel_spacing = None
    if spacing is not None and len(spacing) == 2:
        row, col = _number(spacing[0]), _number(spacing[1])
        if row is not None and col is not None:
            pixel_spacing = (row, col)
    agent, administered = _contrast(ds)
    distinct = tuple(dict.fromkeys(t for t in image_types if t)) or (
        (image_type,) if image_type else ()
    )
    return SeriesAttributes(
        description=_text(ds.get("SeriesDescription")),
        protocol_name=_text(ds.get("ProtocolName")),
        sequence_name=_text(ds.get("SequenceName")) or _text(ds.get("PulseSequenceName")),
        image_type=image_type,
        image_types=distinct,
        scanning_sequence=scanning,
        sequence_variant=_words(ds.get("SequenceVariant")),
        mr_acquisition_type=_text(ds.get("MRAcquisitionType")).upper() or None,
        echo_time_ms=te,
        repetition_time_ms=tr,
        inversion_time_ms=ti,
        inversion_recovery=("IR" in {s.upper() for s in scanning})
        or ir_flag
        or (ti is not None and ti > 0),
        acquisition_contrast=contrast.upper() or None,
        contrast_agent=agent,
        contrast_administered=administered,
        slice_thickness_mm=thickness,
        pixel_spacing_mm=pixel_spacing,
    )


# --------------------------------------------------------------------------------------------
# Inventory
# --------------------------------------------------------------------------------------------
@dataclass
class _SeriesFiles:
    """Files of one series while they are being collected."""

    files: list[tuple[int, Path, int]] = field(default_factory=list)  # (instance, path, frames)
    image_types: dict[tuple[str, ...], None] = field(default_factory=dict)
    first: Dataset | None = None
    first_key: tuple[int, str] = (2**31, "")

    def add(self, ds: Dataset, path: Path) -> None:
        number = ds.get("InstanceNumber")
        instance = int(number) if _number(number) is not None else 2**31 - 1
        frames = int(_number(ds.get("NumberOfFrames")) or 1)
        self.files.append((instance, path, max(frames, 1)))
        self.image_types[_words(ds.get("ImageType"))] = None
        key = (instance, str(path))
        if self.first is None or key < self.first_key:
            self.first, self.first_key = ds, key


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            candidates: Iterable[Path] = (
                Path(root) / name
                for root, _dirs, names in sorted(os.walk(path))
                for name in sorted(names)
            )
        else:
            candidates = (path,)
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                yield candidate


def _read_header(path: Path) -> Dataset | str:
    """The header without pixel data, or the reason the file is ignored."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        return "not a DICOM file"
    except OSError as exc:
        return f"cannot be read: {exc}"
    except Exception as exc:  # pydicom raises many types on corrupt data; never stop the scan
        return f"corrupt DICOM header: {type(exc).__name__}: {exc}"
    sop_class = _text(ds.get("SOPClassUID")) or _text(
        getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    )
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        return "DICOMDIR (a directory of files, not an instance)"
    if not _text(ds.get("SeriesInstanceUID")) or not _text(ds.get("StudyInstanceUID")):
        return "no StudyInstanceUID / SeriesInstanceUID"
    return ds


def _series_info(
    study_uid: str, series_uid: str, collected: _SeriesFiles, rules: SeriesRules
) -> SeriesInfo:
    ds = collected.first
    assert ds is not None  # a _SeriesFiles exists only once a file was added
    ordered = sorted(collected.files, key=lambda f: (f[0], str(f[1])))
    attrs = series_attributes(ds, collected.image_types)
    modality = _text(ds.get("Modality")).upper()
    n_frames = sum(f[2] for f in ordered)
    series_class, reason = classify(attrs, rules)
    skipped = skip_reason(attrs, modality, n_frames, rules)
    number = _number(ds.get("SeriesNumber"))
    return SeriesInfo(
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        series_number=None if number is None else int(number),
        description=attrs.description,
        modality=modality,
        sop_class_uid=_text(ds.get("SOPClassUID")),
        files=tuple(f[1] for f in ordered),
        n_instances=len(ordered),
        n_frames=n_frames,
        attributes=attrs,
        series_class=series_class,
        reason=reason,
        skipped_reason=None if skipped is None else skipped[1],
        skip_category=None if skipped is None else skipped[0],
        derived=derived_reason(attrs, rules) is not None,
        patient_id=_text(ds.get("PatientID")),
        study_date=_text(ds.get("StudyDate")),
        frame_of_reference_uid=_text(ds.get("FrameOfReferenceUID")),
    )


def inventory(paths: Iterable[Path], rules: SeriesRules | None = None) -> StudyInventory:
    """List, classify and screen every series in ``paths`` (files or folders, recursively).

    Only headers are read. Files that are not DICOM instances are ignored with a warning in
    the log and listed in :attr:`StudyInventory.ignored`.
    """
    rules = rules if rules is not None else load_series_rules()
    groups: dict[tuple[str, str], _SeriesFiles] = {}
    ignored: list[IgnoredFile] = []
    for path in _walk(paths):
        header = _read_header(path)
        if isinstance(header, str):
            log.warning("ignoring %s: %s", path, header)
            ignored.append(IgnoredFile(path, header))
            continue
        key = (_text(header.StudyInstanceUID), _text(header.SeriesInstanceUID))
        groups.setdefault(key, _SeriesFiles()).add(header, path)
    series = [_series_info(study, uid, files, rules) for (study, uid), files in groups.items()]
    series.sort(
        key=lambda s: (
            s.study_date,
            s.study_instance_uid,
            s.series_number if s.series_number is not None else 2**31,
            s.series_instance_uid,
        )
    )
    for s in series:
        state = "usable" if s.usable else f"skipped: {s.skipped_reason}"
        log.info("series %s -> %s (%s; %s)", s.label, s.series_class.value, s.reason, state)
    return StudyInventory(tuple(series), tuple(ignored), rules.source)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """The series chosen for one class, why, and the candidates it was preferred to."""

    series_class: SeriesClass
    series: SeriesInfo
    why: str
    alternatives: tuple[SeriesInfo, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series.series_instance_uid,
            "series_number": self.series.series_number,
            "description": self.series.description,
            "why": self.why,
            "alternatives": [s.series_instance_uid for s in self.alternatives],
        }


@dataclass(frozen=True)
class Selection:
    """One series per class for one study."""

    study_instance_uid: str
    choices: Mapping[SeriesClass, Choice]
    reference_class: SeriesClass
    missing: tuple[SeriesClass, ...]  # wanted (optional) classes the study lacks
    inventory: StudyInventory

    @property
    def reference(self) -> SeriesInfo:
        """The series every other one is registered to (the FLAIR by default)."""
        return self.choices[self.reference_class].series

    def series(self, series_class: SeriesClass) -> SeriesInfo | None:
        choice = self.choices.get(series_class)
        return None if choice is None else choice.series

    def summary(self) -> str:
        """Several lines a person can read in a log or a report."""
        lines = [f"study {self.study_instance_uid}:"]
        for cls, choice in self.choices.items():
            lines.append(f"  {cls.value}: {choice.series.label} — {choice.why}")
        if self.missing:
            lines.append(f"  not present (optional): {', '.join(c.value for c in self.missing)}")
        for s in self.inventory.series:
            if not s.usable:
                lines.append(f"  skipped {s.label}: {s.skipped_reason}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "reference": self.reference_class.value,
            "chosen": {cls.value: choice.to_json() for cls, choice in self.choices.items()},
            "missing_optional": [c.value for c in self.missing],
            "inventory": self.inventory.to_json(),
        }


def _rank_value(s: SeriesInfo, key: PreferenceKey) -> float:
    """Smaller is better; unknown values rank last."""
    a = s.attributes
    if key is PreferenceKey.ORIGINAL_OVER_DERIVED:
        return 1.0 if s.derived or a.is_derived_image else 0.0
    if key is PreferenceKey.PREFER_3D:
        return 0.0 if a.mr_acquisition_type == "3D" else 1.0
    if key is PreferenceKey.THINNER_SLICES:
        t = a.slice_thickness_mm
        return math.inf if t is None else round(t / THICKNESS_RESOLUTION_MM)
    if key is PreferenceKey.FINER_IN_PLANE:
        p = a.pixel_spacing_mm
        return math.inf if p is None else round(p[0] * p[1] / PIXEL_AREA_RESOLUTION_MM2)
    if key is PreferenceKey.MORE_SLICES:
        return -float(s.n_frames)
    number = s.series_number
    if key is PreferenceKey.LATER_SERIES:
        return math.inf if number is None else -float(number)
    return math.inf if number is None else float(number)  # EARLIER_SERIES


_PREFERENCE_TEXT = {
    PreferenceKey.ORIGINAL_OVER_DERIVED: "original rather than derived images",
    PreferenceKey.PREFER_3D: "3D rather than 2D acquisition",
    PreferenceKey.THINNER_SLICES: "thinner slices",
    PreferenceKey.FINER_IN_PLANE: "finer in-plane resolution",
    PreferenceKey.MORE_SLICES: "more slices",
    PreferenceKey.LATER_SERIES: "later series",
    PreferenceKey.EARLIER_SERIES: "earlier series",
}


def _choose(
    series_class: SeriesClass, candidates: list[SeriesInfo], keys: tuple[PreferenceKey, ...]
) -> Choice:
    def rank(s: SeriesInfo) -> tuple[Any, ...]:
        # The UID ends the key so that a full tie still gives the same answer every time.
        return (*(_rank_value(s, k) for k in keys), s.series_instance_uid)

    ordered = sorted(candidates, key=rank)
    best = ordered[0]
    classified = f"classified {series_class.value} by {best.reason}"
    if len(ordered) == 1:
        return Choice(series_class, best, f"the only {series_class.value} candidate; {classified}")
    runner_up = ordered[1]
    decided = next(
        (k for k in keys if _rank_value(best, k) != _rank_value(runner_up, k)),
        None,
    )
    because = (
        f"preferred for {_PREFERENCE_TEXT[decided]}"
        if decided is not None
        else "equal on every preference; first by series UID"
    )
    others = ", ".join(s.label for s in ordered[1:])
    why = f"{because} over {others}; {classified}"
    return Choice(series_class, best, why, tuple(ordered[1:]))


def _describe_found(series: Iterable[SeriesInfo]) -> str:
    usable = [f"{s.series_class.value} {s.label}" for s in series if s.usable]
    skipped = [f"{s.label} ({s.skipped_reason})" for s in series if not s.usable]
    parts = []
    if usable:
        parts.append("usable: " + "; ".join(usable))
    if skipped:
        parts.append("skipped: " + "; ".join(skipped))
    return ". ".join(parts) if parts else "no series"


def select_series(
    inv: StudyInventory,
    rules: SeriesRules | None = None,
    study_instance_uid: str | None = None,
) -> Selection:
    """Choose one usable series per required/wanted class of one study.

    ``study_instance_uid`` may be omitted when the inventory holds one study. Raises
    :class:`SeriesSelectionError` with reason ``no_usable_series`` (nothing usable at all),
    ``required_series_missing`` (e.g. "no FLAIR series"), ``multiple_studies`` or
    ``study_not_found``.
    """
    rules = rules if rules is not None else load_series_rules()
    studies = inv.study_instance_uids
    if study_instance_uid is None:
        if len(studies) > 1:
            raise SeriesSelectionError(
                f"the files hold {len(studies)} studies ({', '.join(studies)}); name one",
                reason="multiple_studies",
            )
        study_instance_uid = studies[0] if studies else ""
    elif study_instance_uid not in studies:
        raise SeriesSelectionError(
            f"study {study_instance_uid} is not among the files (found: {', '.join(studies)})",
            reason="study_not_found",
        )
    study = inv.for_study(study_instance_uid) if studies else inv
    if not study.series:
        ignored = f"; {len(inv.ignored)} file(s) ignored" if inv.ignored else ""
        raise SeriesSelectionError(f"no DICOM series found{ignored}", reason="no_usable_series")
    if not any(s.usable for s in study.series):
        raise SeriesSelectionError(
            f"no usable series in study {study_instance_uid}: every series is skipped "
            f"({_describe_found(study.series)})",
            reason="no_usable_series",
        )
    selection = rules.selection
    missing_required = [c for c in selection.required if not study.by_class(c)]
    if missing_required:
        names = " and no ".join(c.value for c in missing_required)
        raise SeriesSelectionError(
            f"no {names} series in study {study_instance_uid} ({_describe_found(study.series)})",
            reason="required_series_missing",
        )
    choices: dict[SeriesClass, Choice] = {}
    missing: list[SeriesClass] = []
    for series_class in selection.used_classes:
        candidates = study.by_class(series_class)
        if not candidates:
            missing.append(series_class)
            continue
        choices[series_class] = _choose(
            series_class, candidates, selection.preference_for(series_class)
        )
    result = Selection(study_instance_uid, choices, selection.reference, tuple(missing), study)
    log.info("series selection\n%s", result.summary())
    return result
