"""Retention: delete the received instances and derived outputs of studies idle for N days.

:func:`plan_retention` lists what would go — every file with its size, and the database rows —
without touching anything (the dry run). :func:`apply_retention` deletes exactly the files a
plan listed, never others: a file that arrived after planning is not in the plan, and a study
whose activity changed since is skipped altogether. Files go first, database rows second, so an
interruption leaves rows pointing at missing files (the next run removes them) rather than
unindexed files that the node's start-up re-index would bring back as a new study.

A study is kept while anything is still happening to it: a job that is not finished, an
outbox object still to send, or instances inside their quiet period. Its last activity is the
latest of: instance received, version created, job updated, object sent, prior retrieval
requested. A prior study is a study like any other: once it is older than N days it goes even
if a newer study of the patient is kept (reprocessing that one then runs without its prior).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.receive.ingest import valid_uid
from ms_forecast_node.store.database import Database, JobState, OutboxState

log = logging.getLogger(__name__)

_DAY_S = 86400.0
_TERMINAL = tuple(s.value for s in JobState if s.terminal)


@dataclass(frozen=True)
class FileEntry:
    path: Path
    bytes: int
    kind: str  # "instance" (received) or "derived" (our outputs)


@dataclass(frozen=True)
class RetentionItem:
    """One study that would go, with everything of it that would be deleted."""

    study_uid: str
    last_activity: float  # epoch seconds; apply checks it is unchanged
    files: tuple[FileEntry, ...]
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows that would go

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


@dataclass
class RetentionOutcome:
    deleted: list[RetentionItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (study, why)
    files_deleted: int = 0
    bytes_freed: int = 0


def _study_state(db: Database, study_uid: str) -> tuple[float, str | None] | None:
    """(last activity, why it must be kept or None); None when the study is gone."""
    rows = db.query("SELECT dirty, last_received_at FROM studies WHERE study_uid = ?", (study_uid,))
    if not rows:
        return None
    marks = ",".join("?" for _ in _TERMINAL)
    activity = db.query(
        """SELECT MAX(t) FROM (
              SELECT ? AS t
              UNION ALL SELECT MAX(created_at) FROM study_versions WHERE study_uid = ?
              UNION ALL SELECT MAX(updated_at) FROM jobs WHERE study_uid = ?
              UNION ALL SELECT MAX(o.sent_at) FROM outbox o JOIN jobs j ON j.id = o.job_id
                        WHERE j.study_uid = ?
              UNION ALL SELECT MAX(requested_at) FROM retrieved_studies WHERE study_uid = ?)""",
        (float(rows[0]["last_received_at"]), study_uid, study_uid, study_uid, study_uid),
    )
    last = float(activity[0][0])
    # A prior fetched by C-MOVE stays "dirty" for good (the assembler never makes it a job),
    # so for those only the age counts.
    retrieved = db.query("SELECT 1 FROM retrieved_studies WHERE study_uid = ?", (study_uid,))
    if int(rows[0]["dirty"]) and not retrieved:
        return last, "instances waiting for their quiet period"
    running = db.query(
        f"SELECT COUNT(*) FROM jobs WHERE study_uid = ? AND state NOT IN ({marks})",
        (study_uid, *_TERMINAL),
    )
    if int(running[0][0]):
        return last, "a job is not finished"
    pending = db.query(
        "SELECT COUNT(*) FROM outbox o JOIN jobs j ON j.id = o.job_id "
        "WHERE j.study_uid = ? AND o.state = ?",
        (study_uid, OutboxState.PENDING.value),
    )
    if int(pending[0][0]):
        return last, "objects still to send"
    return last, None


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def _walk(folder: Path, kind: str) -> dict[Path, FileEntry]:
    """Every file (and symlink, which is removed as a link) under ``folder``; links to
    directories are not followed, so nothing outside the folder is ever listed."""
    found: dict[Path, FileEntry] = {}
    if not folder.is_dir():
        return found
    for top, _, names in os.walk(folder, followlinks=False):
        for name in names:
            path = Path(top) / name
            found[path] = FileEntry(path, path.lstat().st_size, kind)
    return found


def _row_counts(db: Database, study_uid: str) -> dict[str, int]:
    def count(sql: str) -> int:
        return int(db.query(sql, (study_uid,))[0][0])

    return {
        "instances": count("SELECT COUNT(*) FROM instances WHERE study_uid = ?"),
        "study_versions": count("SELECT COUNT(*) FROM study_versions WHERE study_uid = ?"),
        "jobs": count("SELECT COUNT(*) FROM jobs WHERE study_uid = ?"),
        "outbox": count(
            "SELECT COUNT(*) FROM outbox WHERE job_id IN (SELECT id FROM jobs WHERE study_uid = ?)"
        ),
        "retrieved_studies": count("SELECT COUNT(*) FROM retrieved_studies WHERE study_uid = ?"),
        "studies": 1,
    }


def _study_folders(config: NodeConfig, study_uid: str) -> tuple[Path, Path]:
    root = config.storage.root
    return root / "instances" / study_uid, root / "derived" / study_uid


def plan_retention(
    config: NodeConfig, db: Database, days: float, now: float | None = None
) -> list[RetentionItem]:
    """Studies idle for more than ``days`` and everything of theirs that would be deleted."""
    if days < 0:
        raise ValueError("days must be >= 0")
    now = time.time() if now is None else now
    cutoff = now - days * _DAY_S
    items = []
    for row in db.query("SELECT study_uid FROM studies ORDER BY last_received_at, study_uid"):
        uid = str(row["study_uid"])
        if not valid_uid(uid):  # the index only holds checked UIDs; never build a path anyway
            log.warning("retention: study %r has no valid UID; left alone", uid)
            continue
        state = _study_state(db, uid)
        if state is None or state[1] is not None or state[0] >= cutoff:
            continue
        instances_dir, derived_dir = _study_folders(config, uid)
        files = _walk(instances_dir, "instance") | _walk(derived_dir, "derived")
        # Indexed files missing from the study's folder are either gone (nothing to free; the
        # row still goes) or elsewhere (storage.root moved): those are never deleted.
        indexed = db.query("SELECT path FROM instances WHERE study_uid = ?", (uid,))
        outside = [
            p
            for p in (Path(r["path"]) for r in indexed)
            if p not in files and not _inside(p, instances_dir)
        ]
        if outside:
            log.warning(
                "retention: %d indexed files of study %s lie outside %s (e.g. %s); "
                "they are not deleted, their rows are",
                len(outside),
                uid,
                instances_dir,
                outside[0],
                extra={"study_uid": uid},
            )
        items.append(
            RetentionItem(
                study_uid=uid,
                last_activity=state[0],
                files=tuple(sorted(files.values(), key=lambda f: str(f.path))),
                rows=_row_counts(db, uid),
            )
        )
    return items


def _delete_rows(db: Database, study_uid: str, files: set[str], whole_study: bool) -> None:
    with db.transaction() as con:
        if not whole_study:
            # Activity since the files went: keep the study, drop only the rows of files
            # we removed, so the index matches the disk.
            for path in files:
                con.execute("DELETE FROM instances WHERE path = ?", (path,))
            return
        jobs = "SELECT id FROM jobs WHERE study_uid = ?"
        con.execute(f"DELETE FROM outbox WHERE job_id IN ({jobs})", (study_uid,))
        con.execute("DELETE FROM jobs WHERE study_uid = ?", (study_uid,))
        con.execute("DELETE FROM study_versions WHERE study_uid = ?", (study_uid,))
        con.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
        con.execute("DELETE FROM retrieved_studies WHERE study_uid = ?", (study_uid,))
        con.execute("DELETE FROM studies WHERE study_uid = ?", (study_uid,))


def _prune_empty(folder: Path) -> None:
    if not folder.is_dir():
        return
    for top, _, _ in sorted(os.walk(folder, followlinks=False), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):  # rmdir only succeeds on an empty directory
            os.rmdir(top)


def apply_retention(
    config: NodeConfig, db: Database, items: list[RetentionItem]
) -> RetentionOutcome:
    """Delete what ``items`` (from :func:`plan_retention`) list, re-checking each study first."""
    outcome = RetentionOutcome()
    for item in items:
        uid = item.study_uid
        if not valid_uid(uid):
            outcome.skipped.append((uid, "not a valid UID"))
            continue
        state = _study_state(db, uid)
        if state is None:
            outcome.skipped.append((uid, "no longer in the database"))
            continue
        if state[1] is not None or state[0] != item.last_activity:
            outcome.skipped.append((uid, state[1] or "new activity since the plan"))
            continue
        folders = _study_folders(config, uid)
        removed: set[str] = set()
        for entry in item.files:
            # The parent, not the path: a symlink in the folder is removed as a link even
            # when it points elsewhere; a hand-made item naming another folder is refused.
            if not any(_inside(entry.path.parent, f) for f in folders):
                outcome.skipped.append((uid, f"{entry.path} is outside the study's folders"))
                continue
            try:
                entry.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("retention: cannot delete %s: %s", entry.path, exc)
                continue
            removed.add(str(entry.path))
            outcome.files_deleted += 1
            outcome.bytes_freed += entry.bytes
        after = _study_state(db, uid)
        whole = after is not None and after[1] is None and after[0] == item.last_activity
        _delete_rows(db, uid, removed, whole)
        for folder in folders:
            _prune_empty(folder)
        if whole:
            outcome.deleted.append(item)
            log.info(
                "retention: study %s deleted (%d files, %d bytes)",
                uid,
                len(removed),
                item.bytes,
                extra={"study_uid": uid},
            )
        else:
            outcome.skipped.append((uid, "new activity while deleting; only listed files went"))
    return outcome
