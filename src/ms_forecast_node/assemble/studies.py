"""Study assembly: after a quiet period per calling AE, received series become a study version
and a job. A series arriving later makes a new version whose job supersedes the old one."""

from __future__ import annotations

import hashlib
import logging
import time

from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.store.database import Database, JobState, OutboxState

log = logging.getLogger(__name__)


def content_hash(db: Database, study_uid: str) -> tuple[str, int]:
    rows = db.query(
        "SELECT series_uid, COUNT(*) FROM instances WHERE study_uid = ? GROUP BY series_uid "
        "ORDER BY series_uid",
        (study_uid,),
    )
    text = ";".join(f"{r[0]}:{r[1]}" for r in rows)
    return hashlib.sha256(text.encode()).hexdigest(), sum(int(r[1]) for r in rows)


class StudyAssembler:
    def __init__(self, config: NodeConfig, db: Database) -> None:
        self.config = config
        self.db = db
        # No quiet period ends before this (the node sets its start time): a study cut by a
        # crash or a stop is assembled only after its sender has had a quiet period to resend,
        # not at once from what the crash left.
        self.quiet_from = 0.0

    def tick(self, now: float | None = None) -> list[int]:
        """Turn every quiet, changed study into a new version and job; returns job ids."""
        now = time.time() if now is None else now
        created = []
        for row in self.db.query(
            # Priors fetched by C-MOVE are inputs of another study's job, not jobs themselves.
            "SELECT study_uid, calling_ae, last_received_at FROM studies WHERE dirty = 1 "
            "AND study_uid NOT IN (SELECT study_uid FROM retrieved_studies)"
        ):
            last = max(float(row["last_received_at"]), self.quiet_from)
            if now - last < self.config.quiet_period(row["calling_ae"]):
                continue
            job_id = self.new_version(str(row["study_uid"]), force=False, now=now)
            if job_id is not None:
                created.append(job_id)
        return created

    def new_version(self, study_uid: str, *, force: bool, now: float | None = None) -> int | None:
        """Create version N+1 and its job unless the content is unchanged (or ``force``)."""
        now = time.time() if now is None else now
        digest, n_instances = content_hash(self.db, study_uid)
        with self.db.transaction() as con:
            study = con.execute(
                "SELECT calling_ae, latest_version FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if study is None:
                raise KeyError(study_uid)
            latest = int(study["latest_version"])
            previous = con.execute(
                "SELECT content_hash FROM study_versions WHERE study_uid = ? AND version = ?",
                (study_uid, latest),
            ).fetchone()
            con.execute("UPDATE studies SET dirty = 0 WHERE study_uid = ?", (study_uid,))
            if previous is not None and previous[0] == digest and not force:
                return None  # a resend of what we already processed
            version = latest + 1
            con.execute(
                "INSERT INTO study_versions VALUES (?, ?, ?, ?, ?)",
                (study_uid, version, digest, n_instances, now),
            )
            con.execute(
                "UPDATE studies SET latest_version = ? WHERE study_uid = ?", (version, study_uid)
            )
            older = [
                int(r[0])
                for r in con.execute(
                    "SELECT id FROM jobs WHERE study_uid = ? AND state NOT IN ('done', 'failed', "
                    "'superseded')",
                    (study_uid,),
                )
            ]
            for job_id in older:
                con.execute(
                    "UPDATE jobs SET state = ?, reason = 'superseded', updated_at = ? WHERE id = ?",
                    (JobState.SUPERSEDED.value, now, job_id),
                )
                con.execute(
                    "UPDATE outbox SET state = ? WHERE job_id = ? AND state = ?",
                    (OutboxState.CANCELLED.value, job_id, OutboxState.PENDING.value),
                )
            calling_ae = str(study["calling_ae"])
            cur = con.execute(
                """INSERT INTO jobs (study_uid, version, state, calling_ae, destination,
                       created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (
                    study_uid,
                    version,
                    JobState.ASSEMBLED.value,
                    calling_ae,
                    self.config.destination_for(calling_ae),
                    now,
                    now,
                ),
            )
            job_id = int(cur.lastrowid or 0)
        log.info(
            "study %s version %d assembled (%d instances): job %d",
            study_uid,
            version,
            n_instances,
            job_id,
        )
        return job_id
