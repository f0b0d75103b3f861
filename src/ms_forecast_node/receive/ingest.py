"""Durable ingest: what the C-STORE handler does, and nothing more.

The received dataset is written as received — file meta plus the encoded bytes, never decoded
— to a temporary file, fsynced, renamed atomically into place and its directory fsynced; only
then is it indexed in SQLite and success returned. Paths are built from UIDs that passed the
DICOM UID syntax check, so no peer-supplied string can climb out of the storage folder.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.store.database import Database, InstanceRecord

log = logging.getLogger(__name__)

UID_SYNTAX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# C-STORE statuses (PS3.4 Annex B.2.3; pynetdicom's documented Storage SCP statuses).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "SamplesPerPixel",
]


@dataclass(frozen=True)
class IngestOutcome:
    status: int
    reason: str  # "stored", "duplicate", or the refusal reason (also in the audit log)
    message: str = ""
    path: Path | None = None
    study_uid: str | None = None


def valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and bool(UID_SYNTAX.match(text))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """Create ``path`` and fsync each new directory's parent, so the entry itself survives."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        _fsync_dir(d.parent)


def _pixel_data_truncation(raw: bytes, position: int, ds: pydicom.Dataset) -> str | None:
    """Why the pixel data element is shorter than it declares, or ``None``.

    pydicom stops *before* the Pixel Data element, so ``position`` is where it starts; its
    header says how many bytes follow (undefined length = encapsulated, checked on decoding).
    """
    if position >= len(raw):
        return None  # no pixel data (e.g. a SEG's pixel data comes later, or none at all)
    explicit = (
        not ds.file_meta.TransferSyntaxUID.is_implicit_VR
        if "TransferSyntaxUID" in ds.file_meta
        else True
    )
    header = raw[position : position + (12 if explicit else 8)]
    if len(header) < 8 or header[:4] != b"\xe0\x7f\x10\x00":
        return None  # not the (7FE0,0010) element: nothing to check here
    if explicit:
        if len(header) < 12:
            return "the Pixel Data element header is cut off"
        length = int.from_bytes(header[8:12], "little")
    else:
        length = int.from_bytes(header[4:8], "little")
    if length == 0xFFFFFFFF:
        return None
    available = len(raw) - position - len(header)
    if available < length:
        return f"Pixel Data declares {length} bytes, {available} received"
    # A sender that decoded a truncated file re-encodes the shorter value with a consistent
    # length: compare with what the image attributes need.
    try:
        bits = int(ds.get("BitsAllocated") or 0)
        needed = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0)
        needed *= int(ds.get("NumberOfFrames") or 1) * int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError):
        return None
    needed = (needed * bits + 7) // 8
    if bits and length < needed:
        return f"Pixel Data holds {length} bytes, the image needs {needed}"
    return None


class Ingest:
    """Writes, fsyncs and indexes received instances."""

    def __init__(self, config: NodeConfig, db: Database) -> None:
        self.config = config
        self.db = db
        self.instances_dir = config.storage.root / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True)

    def store(
        self,
        raw: bytes,
        *,
        request_sop_class: str,
        request_sop_instance: str,
        calling_ae: str,
        peer_host: str,
    ) -> IngestOutcome:
        limits = self.config.limits
        if not valid_uid(request_sop_instance):
            return IngestOutcome(
                CANNOT_UNDERSTAND, "invalid_uid", f"SOP Instance UID {request_sop_instance!r}"
            )
        if len(raw) > limits.max_instance_bytes:
            return IngestOutcome(
                OUT_OF_RESOURCES,
                "instance_too_large",
                f"{len(raw)} bytes > limit {limits.max_instance_bytes}",
            )
        free = shutil.disk_usage(self.instances_dir).free
        if free - len(raw) < self.config.storage.min_free_bytes:
            return IngestOutcome(
                OUT_OF_RESOURCES,
                "disk_guard",
                f"{free} bytes free, guard {self.config.storage.min_free_bytes}",
            )
        try:
            fp = io.BytesIO(raw)
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            header = {k: ds.get(k) for k in HEADER_TAGS}
            truncation = _pixel_data_truncation(raw, fp.tell(), ds)
        except (InvalidDicomError, ValueError, EOFError, OSError, KeyError) as exc:
            return IngestOutcome(CANNOT_UNDERSTAND, "unparsable_dataset", str(exc)[:200])
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not valid_uid(header[keyword]):
                return IngestOutcome(
                    CANNOT_UNDERSTAND, "invalid_uid", f"{keyword} {str(header[keyword])[:80]!r}"
                )
        if str(header["SOPInstanceUID"]) != request_sop_instance:
            return IngestOutcome(
                CANNOT_UNDERSTAND,
                "uid_mismatch",
                "dataset SOP Instance UID differs from the request",
            )
        if str(header["SOPClassUID"] or "") != request_sop_class:
            return IngestOutcome(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "sop_class_mismatch",
                f"dataset {header['SOPClassUID']} vs request {request_sop_class}",
            )
        try:
            pixels = int(header["Rows"] or 0) * int(header["Columns"] or 0)
            pixels *= int(header["NumberOfFrames"] or 1)
        except (TypeError, ValueError):
            return IngestOutcome(
                CANNOT_UNDERSTAND, "invalid_dimensions", "Rows/Columns/Frames unreadable"
            )
        if pixels > limits.max_pixels_per_instance:
            return IngestOutcome(
                CANNOT_UNDERSTAND,
                "absurd_dimensions",
                f"{header['Rows']}x{header['Columns']}x{header['NumberOfFrames'] or 1} pixels",
            )
        if truncation:
            return IngestOutcome(CANNOT_UNDERSTAND, "truncated_dataset", truncation)
        sop = request_sop_instance
        study, series = str(header["StudyInstanceUID"]), str(header["SeriesInstanceUID"])
        if self.db.has_instance(sop):
            return IngestOutcome(SUCCESS, "duplicate", study_uid=study)
        if self.db.study_instance_count(study) >= limits.max_instances_per_study:
            return IngestOutcome(
                OUT_OF_RESOURCES,
                "study_too_large",
                f"more than {limits.max_instances_per_study} instances",
            )
        folder = self.instances_dir / study / series
        path = folder / f"{sop}.dcm"
        try:
            _make_dirs(folder)
            tmp = folder / f".{sop}.partial"
            with open(tmp, "wb") as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(folder)
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc)
            return IngestOutcome(OUT_OF_RESOURCES, "write_failed", str(exc)[:200])
        self.db.add_instance(
            InstanceRecord(
                sop_instance_uid=sop,
                sop_class_uid=request_sop_class,
                study_uid=study,
                series_uid=series,
                patient_id=str(header["PatientID"] or ""),
                modality=str(header["Modality"] or ""),
                path=str(path),
                size=len(raw),
                calling_ae=calling_ae,
                peer_host=peer_host,
            )
        )
        return IngestOutcome(SUCCESS, "stored", path=path, study_uid=study)

    def reindex_orphans(self) -> int:
        """Index files that are on disk but not in the database (power loss after the fsync
        but before the index commit). Returns how many were re-indexed."""
        known = self.db.indexed_paths()
        count = 0
        for path in self.instances_dir.glob("*/*/*.dcm"):
            if str(path) in known:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            except (InvalidDicomError, ValueError, EOFError, OSError):
                log.warning("unreadable orphan file left alone: %s", path)
                continue
            self.db.add_instance(
                InstanceRecord(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    study_uid=str(ds.StudyInstanceUID),
                    series_uid=str(ds.SeriesInstanceUID),
                    patient_id=str(ds.get("PatientID", "")),
                    modality=str(ds.get("Modality", "")),
                    path=str(path),
                    size=path.stat().st_size,
                    calling_ae="(reindexed)",
                    peer_host="",
                )
            )
            count += 1
        for stale in self.instances_dir.glob("*/*/.*.partial"):
            stale.unlink(missing_ok=True)  # never acknowledged: the sender will resend
        return count
