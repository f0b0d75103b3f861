"""A folder of DICOM files → the current visit (and the prior one) as volumes.

The folder may hold one study or two of the same patient; the latest is the current visit and
the one before it, when its FLAIR is usable, the prior. A DICOM SEG in the current study is
taken as its T2 lesion mask.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ms_forecast_node.assemble.inventory import (
    Selection,
    SeriesClass,
    StudyInventory,
    inventory,
    select_series,
)
from ms_forecast_node.assemble.rules import SeriesRules
from ms_forecast_node.errors import SeriesSelectionError, StudyInputError
from ms_forecast_node.image.preprocess import VisitSeries
from ms_forecast_node.image.series import read_series
from ms_forecast_node.simulate.protocols import MRSequence

log = logging.getLogger(__name__)

SEQUENCE_OF_CLASS = {
    SeriesClass.FLAIR: MRSequence.FLAIR,
    SeriesClass.T1: MRSequence.T1,
    SeriesClass.T2: MRSequence.T2,
    SeriesClass.PD: MRSequence.PD,
}
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class LoadedVisits:
    current: VisitSeries
    selection: Selection
    prior: VisitSeries | None
    prior_selection: Selection | None
    prior_note: str  # why a prior was or was not used
    inventory: StudyInventory


def _date(value: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _visit(selection: Selection) -> VisitSeries:
    volumes = {}
    for cls, sequence in SEQUENCE_OF_CLASS.items():
        info = selection.series(cls)
        if info is not None:
            volumes[sequence] = read_series(info.files)
    segs = [
        s
        for s in selection.inventory.series
        if s.study_instance_uid == selection.study_instance_uid
        and s.sop_class_uid == SEGMENTATION_SOP_CLASS
    ]
    reference = selection.reference
    return VisitSeries(
        flair=volumes.pop(MRSequence.FLAIR),
        others=volumes,
        lesion_seg=segs[-1].files[0] if segs else None,
        study_instance_uid=selection.study_instance_uid,
        study_date=_date(reference.study_date),
    )


def load_visits(
    source: Path | Sequence[Path],
    rules: SeriesRules | None = None,
    study_instance_uid: str | None = None,
) -> LoadedVisits:
    """Inventory ``source`` (a folder, or files and folders), choose series, read them.

    Typed errors for unusable studies."""
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    study_dir = paths[0] if len(paths) == 1 else f"{len(paths)} paths"
    inv = inventory(paths, rules)
    if not inv.series:
        raise StudyInputError(f"no DICOM series found under {study_dir}", reason="no_dicom_found")
    dates = {
        uid: max((s.study_date for s in inv.series if s.study_instance_uid == uid), default="")
        for uid in inv.study_instance_uids
    }
    ordered = sorted(dates, key=lambda uid: dates[uid])
    current_uid = study_instance_uid or ordered[-1]
    if current_uid not in dates:
        raise StudyInputError(
            f"study {current_uid} not found under {study_dir}", reason="study_not_found"
        )
    selection = select_series(inv, rules, study_instance_uid=current_uid)
    current = _visit(selection)
    patient = next(s.patient_id for s in inv.series if s.study_instance_uid == current_uid)
    earlier = [
        uid
        for uid in ordered
        if dates[uid] < dates[current_uid]
        and any(s.patient_id == patient for s in inv.series if s.study_instance_uid == uid)
    ]
    prior = prior_selection = None
    note = "no earlier study of this patient in the input"
    if earlier:
        try:
            prior_selection = select_series(inv, rules, study_instance_uid=earlier[-1])
            prior = _visit(prior_selection)
            note = f"prior study {earlier[-1]} of {dates[earlier[-1]]}"
        except (SeriesSelectionError, StudyInputError) as exc:
            note = f"prior study {earlier[-1]} not usable: {exc}"
            log.warning("going on without the prior visit: %s", exc)
    return LoadedVisits(current, selection, prior, prior_selection, note, inv)
