"""What the status pages show, read from the node's database as plain values.

Kept apart from the HTML so the pages are pure functions of data (easy to test and to escape
in one place) and the SQL stays next to the schema's vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.metrics import NodeMetrics
from ms_forecast_node.store.database import Database, JobState, OutboxState

#: Rows per table on the overview; the page is for a glance, ``ms-forecast-node status`` and
#: SQL are there for archaeology.
LIMIT = 50


def _stages(text: str | None) -> dict[str, float]:
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}


@dataclass(frozen=True)
class Overview:
    studies: list[dict[str, Any]]
    n_studies: int
    jobs: list[dict[str, Any]]
    job_counts: dict[str, int]
    failures: list[dict[str, Any]]
    failure_reasons: dict[str, int]
    outbox_counts: dict[str, int]
    outbox_by_destination: dict[str, dict[str, int]]
    dead_letters: list[dict[str, Any]]


def _job(row: Any) -> dict[str, Any]:
    job = dict(row)
    job["stages"] = _stages(row["stages"])
    job.pop("summary", None)  # large, and only the study page needs it
    return job


def overview(db: Database) -> Overview:
    studies = [
        dict(r)
        for r in db.query(
            "SELECT study_uid, calling_ae, n_instances, latest_version, dirty, "
            "first_received_at, last_received_at FROM studies "
            "ORDER BY last_received_at DESC LIMIT ?",
            (LIMIT,),
        )
    ]
    n_studies = int(db.query("SELECT COUNT(*) FROM studies")[0][0])
    failures = [
        _job(r)
        for r in db.query(
            "SELECT * FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?",
            (JobState.FAILED.value, LIMIT),
        )
    ]
    reasons = {
        str(r[0]): int(r[1])
        for r in db.query(
            "SELECT COALESCE(reason, '(none)'), COUNT(*) FROM jobs WHERE state = ? "
            "GROUP BY 1 ORDER BY 2 DESC",
            (JobState.FAILED.value,),
        )
    }
    by_destination: dict[str, dict[str, int]] = {}
    for r in db.query("SELECT destination, state, COUNT(*) FROM outbox GROUP BY 1, 2"):
        by_destination.setdefault(str(r[0]), {})[str(r[1])] = int(r[2])
    dead = [
        dict(r)
        for r in db.query(
            "SELECT o.id, o.job_id, j.study_uid, o.sop_instance_uid, o.sop_class_uid, "
            "o.destination, o.attempts, o.last_error FROM outbox o JOIN jobs j ON j.id = o.job_id "
            "WHERE o.state = ? ORDER BY o.id DESC LIMIT ?",
            (OutboxState.DEAD.value, LIMIT),
        )
    ]
    return Overview(
        studies=studies,
        n_studies=n_studies,
        jobs=[_job(r) for r in db.jobs(limit=LIMIT)],
        job_counts=db.job_counts(),
        failures=failures,
        failure_reasons=reasons,
        outbox_counts=db.outbox_counts(),
        outbox_by_destination=by_destination,
        dead_letters=dead,
    )


@dataclass(frozen=True)
class StudyResult:
    study: dict[str, Any]
    jobs: list[dict[str, Any]]  # every version's job, newest first
    job: dict[str, Any] | None  # the job shown: the requested version, else the newest result
    summary: dict[str, Any] | None


def study_result(db: Database, study_uid: str, version: int | None = None) -> StudyResult | None:
    """``None`` when the study was never received. ``study_uid`` must be a checked UID."""
    rows = db.query("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))
    if not rows:
        return None
    job_rows = db.query(
        "SELECT * FROM jobs WHERE study_uid = ? ORDER BY version DESC", (study_uid,)
    )
    shown = None
    for r in job_rows:
        if (version is None and r["summary"] is not None) or int(r["version"]) == version:
            shown = r
            break
    summary = None
    if shown is not None and shown["summary"] is not None:
        try:
            summary = json.loads(shown["summary"])
        except json.JSONDecodeError:
            summary = None
    return StudyResult(
        study=dict(rows[0]),
        jobs=[_job(r) for r in job_rows],
        job=_job(shown) if shown is not None else None,
        summary=summary,
    )


def output_dir(config: NodeConfig, study_uid: str, version: int) -> Path:
    """Where the worker wrote a job's outputs (``study_uid`` must be a checked UID)."""
    return config.storage.root / "derived" / study_uid / f"v{int(version)}"


def counts_by_label(counter: Counter) -> dict[str, int]:
    """A labelled counter's totals per label value (since the node started)."""
    totals: dict[str, int] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels:
                label = next(iter(sample.labels.values()))
                totals[label] = totals.get(label, 0) + int(sample.value)
    return totals


def refresh_gauges(db: Database, metrics: NodeMetrics) -> None:
    """Set the jobs and outbox gauges from the database at scrape time, so /metrics is current
    even when the sender thread (which also sets them) is stuck — when it matters most."""
    jobs = db.job_counts()
    for j in JobState:
        metrics.jobs.labels(j.value).set(jobs.get(j.value, 0))
    outbox = db.outbox_counts()
    for o in OutboxState:
        metrics.outbox_depth.labels(o.value).set(outbox.get(o.value, 0))
