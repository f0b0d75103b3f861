"""The worker: runs one job at a time (so at most one GPU job), apart from the network threads.

A job moves assembled → preprocessing → forecasting → reporting → sending; a crash or restart
leaves it in one of the first four states and the worker picks it up again from the start:
every stage is deterministic (seeded sampling, UIDs derived from the study), so a rerun builds
the same objects, and the outbox rows are written in the same transaction that moves the job
to ``sending`` — results are queued exactly once per study version.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable

from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.errors import MSForecastError
from ms_forecast_node.metrics import NodeMetrics
from ms_forecast_node.pipeline.run import ForecastPipeline
from ms_forecast_node.retrieve.prior import retrieve_prior
from ms_forecast_node.store.database import Database, JobState, OutboxState

log = logging.getLogger(__name__)

#: Runs of one job that may end with the process dying before the job is given up.
MAX_RUNS = 3


class Worker:
    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        pipeline_factory: Callable[[], ForecastPipeline],
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.metrics = metrics or NodeMetrics()
        self.config = config
        self.db = db
        self._factory = pipeline_factory
        self._pipeline: ForecastPipeline | None = None
        self.derived_dir = config.storage.root / "derived"

    @property
    def pipeline(self) -> ForecastPipeline:
        if self._pipeline is None:
            self._pipeline = self._factory()
        return self._pipeline

    def run_once(self) -> int | None:
        """Run the oldest runnable job to ``sending``, ``failed`` or ``superseded``."""
        job = self.db.next_runnable_job()
        if job is None:
            return None
        job_id, study_uid, version = int(job["id"]), str(job["study_uid"]), int(job["version"])
        if int(job["runs"]) >= MAX_RUNS:
            # Each earlier run ended with the process dying (killed, out of memory): resuming
            # it forever would keep the node from every other study.
            self.metrics.failures.labels("job_crashed_repeatedly").inc()
            self.db.set_job_state(
                job_id,
                JobState.FAILED,
                reason="job_crashed_repeatedly",
                message=f"the node stopped during this job {job['runs']} times",
            )
            return job_id
        with self.db.transaction() as con:
            con.execute("UPDATE jobs SET runs = runs + 1 WHERE id = ?", (job_id,))
        context = {"job_id": job_id, "study_uid": study_uid, "study_version": version}
        log.info(
            "job %d: study %s version %d (run %d)",
            job_id,
            study_uid,
            version,
            job["runs"] + 1,
            extra=context,
        )
        started = time.perf_counter()

        def on_stage(name: str, timings: dict[str, float]) -> None:
            if self._superseded(job_id):
                raise _SupersededError()
            self.db.set_job_state(job_id, JobState(name), stage_seconds=timings)

        out = self.derived_dir / study_uid / f"v{version}"
        try:
            if not self.db.prior_study_files(study_uid):
                retrieve_prior(self.config, self.db, study_uid)
            files = self.db.study_files(study_uid) + self.db.prior_study_files(study_uid)
            outcome = self.pipeline.run(
                files, out, study_instance_uid=study_uid, study_version=version, on_stage=on_stage
            )
        except _SupersededError:
            log.info("job %d superseded by a later version of the study", job_id, extra=context)
            return job_id
        except MSForecastError as exc:
            self.metrics.failures.labels(exc.reason).inc()
            log.error("job %d failed: %s", job_id, exc, extra={**context, "reason": exc.reason})
            self.db.set_job_state(job_id, JobState.FAILED, reason=exc.reason, message=str(exc))
            return job_id
        except Exception as exc:  # the node must keep serving whatever a study does
            self.metrics.failures.labels("internal_error").inc()
            log.error(
                "job %d failed unexpectedly: %s\n%s",
                job_id,
                exc,
                traceback.format_exc(),
                extra={**context, "reason": "internal_error"},
            )
            self.db.set_job_state(
                job_id,
                JobState.FAILED,
                reason="internal_error",
                message=f"{type(exc).__name__}: {exc}",
            )
            return job_id
        destination = job["destination"]
        timings = {**outcome.timings_s, "total_s": time.perf_counter() - started}
        for name in ("load_s", "preprocess_s", "forecast_s", "outputs_s"):
            if name in timings:
                self.metrics.stage_seconds.labels(name.removesuffix("_s")).observe(timings[name])
        self.metrics.forecast_seconds.observe(timings.get("forecast_s", 0.0))
        # write_outputs returns the files in the order of the objects: their UIDs come from the
        # datasets in memory, not from reading the files back.
        queued = [  # SOP Instance UID, SOP Class UID, file
            (str(obj.dataset.SOPInstanceUID), str(obj.dataset.SOPClassUID), str(path))
            for obj, path in zip(outcome.objects, outcome.files, strict=True)
        ]
        with self.db.transaction() as con:
            state = con.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            if state == JobState.SUPERSEDED.value:
                return job_id
            if destination is None:
                con.execute(
                    "UPDATE jobs SET state = ?, reason = 'no_destination', message = ?, "
                    "updated_at = ? WHERE id = ?",
                    (
                        JobState.FAILED.value,
                        f"no destination configured for the sending AE (results kept in {out})",
                        time.time(),
                        job_id,
                    ),
                )
                return job_id
            now = time.time()
            for sop_instance_uid, sop_class_uid, stored in queued:
                con.execute(
                    """INSERT OR IGNORE INTO outbox (job_id, sop_instance_uid, sop_class_uid, path,
                           destination, state, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                    (
                        job_id,
                        sop_instance_uid,
                        sop_class_uid,
                        stored,
                        destination,
                        OutboxState.PENDING.value,
                        now,
                    ),
                )
            # Same transaction as the rows (as the module docstring says): a crash leaves the
            # job either runnable with no rows or `sending` with all of them.
            self.db.set_job_state(
                job_id,
                JobState.SENDING,
                stage_seconds=timings,
                summary=outcome.summary,
                con=con,
            )
        return job_id

    def _superseded(self, job_id: int) -> bool:
        return str(self.db.job(job_id)["state"]) == JobState.SUPERSEDED.value

    def loop(self, stop: threading.Event, idle_s: float = 0.5) -> None:
        while not stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # keep the thread alive; the error is in the log
                log.exception("worker loop error")
                ran = None
            if ran is None:
                stop.wait(idle_s)


class _SupersededError(Exception):
    """Raised from a stage callback to abandon a job a later study version replaced."""
