"""Prior-visit retrieval: C-FIND the patient's earlier MR studies on a configured PACS and
C-MOVE the latest one to the node itself.

The moved instances arrive through the node's own Storage SCP (the PACS must know the node as a
move destination, and be an allowed peer). The study is registered as *retrieved* before the move,
so the assembler does not turn it into a job of its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.receive.ingest import valid_uid
from ms_forecast_node.receive.security import client_context
from ms_forecast_node.store.database import Database

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)


@dataclass(frozen=True)
class PriorCandidate:
    study_uid: str
    study_date: str


def _associate(config: NodeConfig, name: str, context: str) -> Any:
    dest = config.destinations[name]
    ae = AE(ae_title=config.listen.ae_title)
    ae.add_requested_context(context)
    ae.acse_timeout = ae.network_timeout = 30
    tls = client_context(dest.tls)
    return ae.associate(
        dest.host, dest.port, ae_title=dest.ae_title, tls_args=(tls, dest.host) if tls else None
    )


def find_priors(config: NodeConfig, patient_id: str, before: str) -> list[PriorCandidate]:
    """Earlier MR studies of ``patient_id`` (study date before ``before``), latest first."""
    source = config.prior_retrieval.source
    if source is None or not patient_id:
        return []
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    query.StudyDate = ""
    query.ModalitiesInStudy = "MR"
    assoc = _associate(config, source, StudyRootQueryRetrieveInformationModelFind)
    if not assoc.is_established:
        log.warning("prior retrieval: cannot associate with %s for C-FIND", source)
        return []
    found: list[PriorCandidate] = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if status and int(status.Status) in PENDING and identifier is not None:
                uid, date = (
                    str(identifier.get("StudyInstanceUID", "")),
                    str(identifier.get("StudyDate", "")),
                )
                if valid_uid(uid) and date and date < before:
                    found.append(PriorCandidate(uid, date))
    finally:
        assoc.release()
    return sorted(found, key=lambda c: c.study_date, reverse=True)


def move_study(config: NodeConfig, db: Database, candidate: PriorCandidate) -> bool:
    """C-MOVE one study to this node; ``True`` when the PACS reports it complete."""
    source = config.prior_retrieval.source
    assert source is not None
    with db.transaction() as con:
        con.execute(
            "INSERT OR IGNORE INTO retrieved_studies (study_uid, requested_at) VALUES (?, ?)",
            (candidate.study_uid, time.time()),
        )
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = candidate.study_uid
    assoc = _associate(config, source, StudyRootQueryRetrieveInformationModelMove)
    if not assoc.is_established:
        log.warning("prior retrieval: cannot associate with %s for C-MOVE", source)
        return False
    final = None
    try:
        for status, _ in assoc.send_c_move(
            query, config.listen.ae_title, StudyRootQueryRetrieveInformationModelMove
        ):
            if status:
                final = int(status.Status)
    finally:
        assoc.release()
    ok = final == 0x0000
    log.info("prior study %s moved from %s: status 0x%04X", candidate.study_uid, source, final or 0)
    return ok


def retrieve_prior(config: NodeConfig, db: Database, study_uid: str) -> str | None:
    """Fetch the latest earlier MR study of the study's patient; its UID, or ``None``."""
    if config.prior_retrieval.source is None:
        return None
    rows = db.query(
        "SELECT patient_id, MIN(path) AS path FROM instances WHERE study_uid = ? "
        "GROUP BY patient_id",
        (study_uid,),
    )
    if not rows:
        return None
    current = pydicom.dcmread(rows[0]["path"], stop_before_pixels=True, specific_tags=["StudyDate"])
    before = str(current.get("StudyDate", "")) or "99999999"
    try:
        candidates = find_priors(config, str(rows[0]["patient_id"]), before)
    except Exception as exc:  # a PACS that misbehaves must not fail the forecast
        log.warning("prior retrieval: C-FIND failed: %s", exc)
        return None
    for candidate in candidates[: config.prior_retrieval.max_studies]:
        if db.study_instance_count(candidate.study_uid):
            return candidate.study_uid  # already here
        try:
            if move_study(config, db, candidate):
                return candidate.study_uid
        except Exception as exc:
            log.warning("prior retrieval: C-MOVE failed: %s", exc)
    return None
