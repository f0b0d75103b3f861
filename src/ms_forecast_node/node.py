"""The DICOM node: receive → assemble → (worker) image → forecast → report → (sender) send.

Threads: pynetdicom's association threads (handlers only write and index), one assembler
(quiet periods → study versions → jobs), one worker (one job at a time, so at most one GPU
job), one sender (the outbox). All state is in SQLite and files under ``storage.root``, so a
restart resumes where the node stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from ms_forecast_node.assemble.studies import StudyAssembler
from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.jobs.worker import Worker
from ms_forecast_node.metrics import NodeMetrics
from ms_forecast_node.pipeline.run import ForecastPipeline, PipelineSettings
from ms_forecast_node.receive.audit import AuditLog
from ms_forecast_node.receive.ingest import Ingest
from ms_forecast_node.receive.scp import StorageSCP
from ms_forecast_node.send.outbox import Sender
from ms_forecast_node.status import StatusServer, start_status_server
from ms_forecast_node.store.database import Database

log = logging.getLogger(__name__)


def pipeline_settings(config: NodeConfig) -> PipelineSettings:
    p = config.processing
    return PipelineSettings(
        therapies=p.therapies,
        horizon_weeks=p.horizon_weeks,
        samples=p.samples,
        seed=p.seed,
        steps=p.steps,
        outputs=p.outputs,
        templates_dir=p.templates_dir,
        series_rules=p.series_rules,
        device=p.device,
    )


class Node:
    def __init__(
        self,
        config: NodeConfig,
        pipeline_factory: Callable[[], ForecastPipeline] | None = None,
    ) -> None:
        self.config = config
        config.storage.root.mkdir(parents=True, exist_ok=True)
        self.db = Database(config.storage.database_path)
        self.ingest = Ingest(config, self.db)
        self.audit = AuditLog(config.storage.root / "audit.jsonl")
        self.metrics = NodeMetrics()
        self.scp = StorageSCP(
            config,
            self.ingest,
            self.audit,
            metrics=self.metrics,
            extra_sop_classes=config.listen.extra_sop_classes,
        )
        self.assembler = StudyAssembler(config, self.db)
        factory = pipeline_factory or (lambda: ForecastPipeline(pipeline_settings(config)))
        self.worker = Worker(config, self.db, factory, metrics=self.metrics)
        self.sender = Sender(config, self.db, metrics=self.metrics)
        self.status: StatusServer | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _assembler_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.assembler.tick()
            except Exception:
                log.exception("assembler loop error")
            self._stop.wait(0.5)

    def start(self) -> None:
        self.assembler.quiet_from = time.time()
        reindexed = self.ingest.reindex_orphans()
        if reindexed:
            log.warning(
                "re-indexed %d instance files found on disk but not in the index", reindexed
            )
        if self.config.status_page.enabled:
            # Before the SCP: a status port already taken stops the start here, with nothing
            # else listening yet (a node nobody can watch is a configuration error).
            try:
                self.status = start_status_server(self.config, self.db, self.metrics)
            except OSError as exc:
                page = self.config.status_page
                raise ConfigurationError(
                    f"status page cannot listen on {page.bind_address}:{page.port}: {exc} "
                    "(set status_page.port, or status_page.enabled: false)"
                ) from exc
        self.scp.start()
        for name, target in (
            ("assembler", self._assembler_loop),
            ("worker", lambda: self.worker.loop(self._stop)),
            ("sender", lambda: self.sender.loop(self._stop)),
        ):
            thread = threading.Thread(target=target, name=f"msfn-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def port(self) -> int:
        return self.scp.port

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self.scp.stop()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()
        if self.status is not None:  # last: the page stays readable while work winds down
            self.status.stop()
            self.status = None

    def serve_forever(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
