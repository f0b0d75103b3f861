"""The outbox sender: C-STORE SCU, exponential backoff with jitter, dead letters.

Each outbox row is one object for one destination. A row is marked ``sent`` right after its
C-STORE succeeds; a crash between the two would resend that object once, under the same SOP
Instance UID, which a PACS treats as the same instance (no duplicate).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from typing import Any

from pydicom import dcmread
from pynetdicom import AE

from ms_forecast_node.config.settings import DestinationConfig, NodeConfig
from ms_forecast_node.metrics import NodeMetrics
from ms_forecast_node.receive.security import client_context
from ms_forecast_node.store.database import Database, JobState, OutboxState

log = logging.getLogger(__name__)


def echo(
    config: NodeConfig, destination: DestinationConfig, timeout_s: float = 10.0
) -> tuple[bool, str]:
    """C-ECHO a destination: (ok, human-readable outcome)."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=config.listen.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = timeout_s
    tls = client_context(destination.tls)
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=(tls, destination.host) if tls is not None else None,
    )
    if not assoc.is_established:
        return (
            False,
            f"association to {destination.ae_title}@{destination.host}:{destination.port} failed",
        )
    status = assoc.send_c_echo()
    assoc.release()
    ok = bool(status) and int(status.Status) == 0
    return ok, "C-ECHO success" if ok else f"C-ECHO status {getattr(status, 'Status', 'none')}"


class Sender:
    def __init__(
        self, config: NodeConfig, db: Database, metrics: NodeMetrics | None = None
    ) -> None:
        self.config = config
        self.db = db
        self.metrics = metrics or NodeMetrics()

    def _backoff(self, attempts: int) -> float:
        s = self.config.sending
        delay = min(s.backoff_initial_s * 2 ** max(attempts - 1, 0), s.backoff_max_s)
        return delay * (1.0 + random.uniform(-s.jitter, s.jitter))

    def _failed(self, row: Any, error: str) -> None:
        attempts = int(row["attempts"]) + 1
        dead = attempts >= self.config.sending.max_attempts
        with self.db.transaction() as con:
            con.execute(
                "UPDATE outbox SET attempts = ?, last_error = ?, state = ?, next_attempt_at = ? "
                "WHERE id = ?",
                (
                    attempts,
                    error,
                    OutboxState.DEAD.value if dead else OutboxState.PENDING.value,
                    time.time() + self._backoff(attempts),
                    int(row["id"]),
                ),
            )
        if dead:
            self.metrics.failures.labels("delivery_dead_letter").inc()
            log.error(
                "giving up on %s after %d attempts: %s", row["sop_instance_uid"], attempts, error
            )

    def _send_batch(self, name: str, rows: list[Any]) -> None:
        dest = self.config.destinations.get(name)
        if dest is None:
            for row in rows:
                self._failed(row, f"destination {name!r} is no longer configured")
            return
        ae = AE(ae_title=self.config.listen.ae_title)
        for uid in sorted({str(r["sop_class_uid"]) for r in rows}):
            ae.add_requested_context(uid)
        ae.acse_timeout = ae.network_timeout = 30
        tls = client_context(dest.tls)
        try:
            assoc = ae.associate(
                dest.host,
                dest.port,
                ae_title=dest.ae_title,
                tls_args=(tls, dest.host) if tls is not None else None,
            )
        except Exception as exc:  # socket/TLS errors: retry later
            for row in rows:
                self._failed(row, f"association failed: {exc}")
            return
        if not assoc.is_established:
            for row in rows:
                self._failed(
                    row, f"association to {dest.ae_title}@{dest.host}:{dest.port} refused or failed"
                )
            return
        try:
            for row in rows:
                try:
                    status = assoc.send_c_store(dcmread(row["path"]))
                except Exception as exc:
                    self._failed(row, f"C-STORE error: {exc}")
                    if not assoc.is_established:
                        break
                    continue
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in (0x0000, 0xB000, 0xB007, 0xB006):  # success or warning
                    with self.db.transaction() as con:
                        con.execute(
                            "UPDATE outbox SET state = ?, sent_at = ?, attempts = attempts + 1 "
                            "WHERE id = ?",
                            (OutboxState.SENT.value, time.time(), int(row["id"])),
                        )
                    self.metrics.objects_sent.inc()
                else:
                    self._failed(row, f"C-STORE status 0x{code & 0xFFFF:04X}")
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()

    def tick(self, now: float | None = None) -> int:
        """Send what is due; close jobs whose objects are all sent (or dead)."""
        now = time.time() if now is None else now
        due = self.db.due_outbox(now)
        by_destination: dict[str, list[Any]] = defaultdict(list)
        for row in due:
            by_destination[str(row["destination"])].append(row)
        for name, rows in by_destination.items():
            self._send_batch(name, rows)
        self._close_jobs()
        self._update_gauges()
        return len(due)

    def _update_gauges(self) -> None:
        outbox = self.db.outbox_counts()
        for o in OutboxState:
            self.metrics.outbox_depth.labels(o.value).set(outbox.get(o.value, 0))
        jobs = self.db.job_counts()
        for j in JobState:
            self.metrics.jobs.labels(j.value).set(jobs.get(j.value, 0))

    def _close_jobs(self) -> None:
        rows = self.db.query(
            """SELECT j.id,
                      SUM(o.state = 'pending') AS pending,
                      SUM(o.state = 'dead') AS dead
               FROM jobs j JOIN outbox o ON o.job_id = j.id
               WHERE j.state = 'sending' GROUP BY j.id"""
        )
        for r in rows:
            if int(r["pending"]) > 0:
                continue
            if int(r["dead"]) > 0:
                self.db.set_job_state(
                    int(r["id"]),
                    JobState.FAILED,
                    reason="delivery_failed",
                    message=f"{r['dead']} object(s) could not be delivered (see outbox)",
                )
            else:
                self.db.set_job_state(int(r["id"]), JobState.DONE)

    def loop(self, stop: threading.Event, idle_s: float = 0.5) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("sender loop error")
            stop.wait(idle_s)
