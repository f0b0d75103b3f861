"""SQLite state: instances, studies and their versions, jobs, the outbox.

One connection per thread (SQLite connections must not cross threads), WAL journal so readers
never block the C-STORE writers. ``synchronous=NORMAL`` is durable against a killed process;
against power loss the instance *files* are the truth (fsynced before success) and
:meth:`Database.missing_from_index` lets the node re-index files on start.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    modality TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    peer_host TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    dirty INTEGER NOT NULL DEFAULT 1,
    latest_version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_dirty ON studies (dirty, last_received_at);
CREATE TABLE IF NOT EXISTS study_versions (
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    n_instances INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (study_uid, version)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    message TEXT,
    calling_ae TEXT NOT NULL,
    destination TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    stages TEXT NOT NULL DEFAULT '{}',
    summary TEXT,
    UNIQUE (study_uid, version)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (job_id, sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS retrieved_studies (
    study_uid TEXT PRIMARY KEY,
    requested_at REAL NOT NULL
);
"""


class JobState(str, enum.Enum):
    """A job's life: assembled → preprocessing → forecasting → reporting → sending → done."""

    ASSEMBLED = "assembled"
    PREPROCESSING = "preprocessing"
    FORECASTING = "forecasting"
    REPORTING = "reporting"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a later study version replaced it before it finished

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.SUPERSEDED)


#: States a worker picks up (after a restart, too: the stages are recomputed, their outputs
#: are deterministic, so resuming cannot create different objects).
RUNNABLE = (JobState.ASSEMBLED, JobState.PREPROCESSING, JobState.FORECASTING, JobState.REPORTING)


class OutboxState(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"  # gave up after the configured attempts
    CANCELLED = "cancelled"  # superseded by a later study version


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    path: str
    size: int
    calling_ae: str
    peer_host: str


class Database:
    """Thread-safe access to the node's SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # executescript commits on its own, so it runs outside transaction().
        self._connection().executescript(SCHEMA)
        with self.transaction() as con:
            con.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    def _connection(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
        return con

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on error)."""
        con = self._connection()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self._connection().execute(sql, params).fetchall())

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # --- ingest ------------------------------------------------------------------------------
    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(
            self.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        )

    def study_instance_count(self, study_uid: str) -> int:
        rows = self.query("SELECT n_instances FROM studies WHERE study_uid = ?", (study_uid,))
        return int(rows[0][0]) if rows else 0

    def add_instance(self, rec: InstanceRecord, now: float | None = None) -> bool:
        """Index a stored instance; ``False`` when it was already known (idempotent)."""
        now = time.time() if now is None else now
        with self.transaction() as con:
            cur = con.execute(
                "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.sop_instance_uid,
                    rec.sop_class_uid,
                    rec.study_uid,
                    rec.series_uid,
                    rec.patient_id,
                    rec.modality,
                    rec.path,
                    rec.size,
                    rec.calling_ae,
                    rec.peer_host,
                    now,
                ),
            )
            if cur.rowcount == 0:
                return False
            con.execute(
                """INSERT INTO studies (study_uid, patient_id, calling_ae, first_received_at,
                       last_received_at, n_instances, dirty)
                   VALUES (?, ?, ?, ?, ?, 1, 1)
                   ON CONFLICT (study_uid) DO UPDATE SET
                       last_received_at = excluded.last_received_at,
                       calling_ae = excluded.calling_ae,
                       n_instances = n_instances + 1,
                       dirty = 1""",
                (rec.study_uid, rec.patient_id, rec.calling_ae, now, now),
            )
        return True

    def indexed_paths(self) -> set[str]:
        return {str(r[0]) for r in self.query("SELECT path FROM instances")}

    # --- jobs -------------------------------------------------------------------------------
    def set_job_state(
        self,
        job_id: int,
        state: JobState,
        *,
        reason: str | None = None,
        message: str | None = None,
        stage_seconds: dict[str, float] | None = None,
        summary: dict[str, Any] | None = None,
        con: sqlite3.Connection | None = None,
    ) -> None:
        """``con``: inside the caller's open transaction (else in a transaction of its own)."""
        with nullcontext(con) if con is not None else self.transaction() as con:
            row = con.execute("SELECT stages FROM jobs WHERE id = ?", (job_id,)).fetchone()
            stages = json.loads(row[0]) if row else {}
            stages.update(stage_seconds or {})
            con.execute(
                """UPDATE jobs SET state = ?, reason = COALESCE(?, reason),
                       message = COALESCE(?, message), updated_at = ?, stages = ?,
                       summary = COALESCE(?, summary)
                   WHERE id = ?""",
                (
                    state.value,
                    reason,
                    message,
                    time.time(),
                    json.dumps(stages),
                    json.dumps(summary) if summary is not None else None,
                    job_id,
                ),
            )

    def job(self, job_id: int) -> sqlite3.Row:
        rows = self.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise KeyError(job_id)
        return rows[0]

    def jobs(self, *, limit: int = 100) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))

    def next_runnable_job(self) -> sqlite3.Row | None:
        """The oldest runnable job whose patient has no other study still arriving: a
        follow-up routed before (or beside) its baseline waits for the baseline's quiet
        period, so it is never forecast with half a prior."""
        marks = ",".join("?" for _ in RUNNABLE)
        rows = self.query(
            f"""SELECT j.* FROM jobs j JOIN studies s ON s.study_uid = j.study_uid
                WHERE j.state IN ({marks}) AND NOT EXISTS (
                    SELECT 1 FROM studies o
                    WHERE o.patient_id = s.patient_id AND o.study_uid != s.study_uid
                      AND o.dirty = 1
                      AND o.study_uid NOT IN (SELECT study_uid FROM retrieved_studies))
                ORDER BY j.id LIMIT 1""",
            tuple(s.value for s in RUNNABLE),
        )
        return rows[0] if rows else None

    def study_files(self, study_uid: str) -> list[Path]:
        rows = self.query("SELECT path FROM instances WHERE study_uid = ?", (study_uid,))
        return [Path(r[0]) for r in rows]

    def prior_study_files(self, study_uid: str) -> list[Path]:
        """Files of the patient's other studies already received (prior-visit candidates)."""
        rows = self.query(
            """SELECT path FROM instances WHERE study_uid != ? AND patient_id = (
                   SELECT patient_id FROM studies WHERE study_uid = ?)""",
            (study_uid, study_uid),
        )
        return [Path(r[0]) for r in rows]

    # --- outbox -------------------------------------------------------------------------------
    def due_outbox(self, now: float, limit: int = 500) -> list[sqlite3.Row]:
        return self.query(
            """SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ?
               ORDER BY destination, id LIMIT ?""",
            (now, limit),
        )

    def outbox_counts(self) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        return {str(r[0]): int(r[1]) for r in rows}

    def job_counts(self) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {str(r[0]): int(r[1]) for r in rows}
