"""The Storage and Verification SCP (pynetdicom). Handlers only check, write and index.

Documented return statuses (pynetdicom Storage SCP): 0x0000 success (also for an instance
received before: idempotent), 0xA700 out of resources (disk guard, size limits, write error),
0xA900 dataset does not match SOP class, 0xC000 cannot understand (unparsable data, UIDs that
are not UIDs, absurd dimensions). Peers that are not configured are rejected at association
(A-ASSOCIATE-RJ permanent, calling AE title not recognised).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    EnhancedMRImageStorage,
    MRImageStorage,
    SegmentationStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from ms_forecast_node.config.settings import NodeConfig
from ms_forecast_node.metrics import NodeMetrics
from ms_forecast_node.receive.audit import AssociationRecord, AuditLog
from ms_forecast_node.receive.ingest import SUCCESS, Ingest
from ms_forecast_node.receive.security import peer_refusal, server_context

log = logging.getLogger(__name__)

STORAGE_CLASSES = (MRImageStorage, EnhancedMRImageStorage, SegmentationStorage)


def _text(value: Any) -> str:
    return (
        value.decode("ascii", "replace").strip() if isinstance(value, bytes) else str(value).strip()
    )


class StorageSCP:
    """Owns the AE, its handlers and the per-association audit records."""

    def __init__(
        self,
        config: NodeConfig,
        ingest: Ingest,
        audit: AuditLog,
        on_stored: Callable[[str], None] | None = None,
        extra_sop_classes: tuple[str, ...] = (),
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.config = config
        self.ingest = ingest
        self.audit = audit
        self.on_stored = on_stored
        self.metrics = metrics or NodeMetrics()
        self._records: dict[int, AssociationRecord] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title=config.listen.ae_title)
        ae.add_supported_context(Verification)
        for sop in (*STORAGE_CLASSES, *extra_sop_classes):
            ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
        ae.require_called_aet = config.listen.require_called_ae
        if not config.accept_unknown_peers:
            # pynetdicom rejects unknown calling AEs itself (A-ASSOCIATE-RJ, reason 3); the
            # EVT_REQUESTED handler adds the per-peer host check.
            ae.require_calling_aet = config.allowed_calling_aes() or ["\x00NOBODY"]
        ae.maximum_associations = config.limits.max_associations
        ae.maximum_pdu_size = config.limits.max_pdu_bytes
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        self.ae = ae
        self.server: ThreadedAssociationServer | None = None

    # --- association bookkeeping -------------------------------------------------------------
    def _record(self, event: evt.Event) -> AssociationRecord:
        key = id(event.assoc)
        with self._lock:
            rec = self._records.get(key)
            if rec is None:
                requestor = event.assoc.requestor
                # At EVT_REQUESTED the titles are only in the A-ASSOCIATE-RQ primitive.
                primitive = requestor.primitive
                calling = _text(requestor.ae_title) or _text(
                    getattr(primitive, "calling_ae_title", "") or ""
                )
                called = _text(getattr(primitive, "called_ae_title", "") or "") or _text(
                    event.assoc.acceptor.ae_title
                )
                rec = AssociationRecord(
                    association_id=f"{event.assoc.native_id or 0}-{key:x}",
                    calling_ae=calling,
                    called_ae=called,
                    peer_host=str(requestor.address),
                    peer_port=int(requestor.port or 0),
                    tls=self.server is not None and self.server.ssl_context is not None,
                )
                self._records[key] = rec
            return rec

    def _finish(self, event: evt.Event, outcome: str, reason: str | None = None) -> None:
        key = id(event.assoc)
        with self._lock:
            rec = self._records.pop(key, None)
        if rec is None:
            return
        rec.ended_at = time.time()
        rec.outcome = outcome if rec.outcome == "open" else rec.outcome
        rec.reason = reason or rec.reason
        self.audit.write(rec)
        self.metrics.associations.labels(rec.outcome).inc()

    def _on_requested(self, event: evt.Event) -> None:
        rec = self._record(event)
        refusal = peer_refusal(self.config, rec.calling_ae, rec.peer_host)
        if refusal is not None and self.config.peer(rec.calling_ae) is None:
            # Unknown AE: pynetdicom's own check rejects it right after this event.
            rec.outcome, rec.reason = "rejected", refusal
            log.warning("association refused: %s", refusal)
        elif refusal is not None:
            log.warning("association refused: %s", refusal)
            rec.outcome, rec.reason = "rejected", refusal
            # Rejected permanent, by the service user: calling AE title not recognised.
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)

    def _on_echo(self, event: evt.Event) -> int:
        self._record(event).echoes += 1
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        rec = self._record(event)
        request: Any = event.request  # a C-STORE request primitive
        try:
            raw = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # a malformed P-DATA stream must not crash the node
            rec.refused += 1
            rec.refusals["undecodable_request"] = rec.refusals.get("undecodable_request", 0) + 1
            log.warning("C-STORE from %s: cannot encode the received data: %s", rec.calling_ae, exc)
            status = Dataset()
            status.Status = 0xC000
            status.ErrorComment = "cannot read the received data set"
            return status
        outcome = self.ingest.store(
            raw,
            request_sop_class=str(request.AffectedSOPClassUID),
            request_sop_instance=str(request.AffectedSOPInstanceUID),
            calling_ae=rec.calling_ae,
            peer_host=rec.peer_host,
        )
        rec.bytes_received += len(raw)
        self.metrics.bytes_received.inc(len(raw))
        if outcome.status == SUCCESS:
            if outcome.reason == "duplicate":
                rec.duplicates += 1
            else:
                rec.stored += 1
                self.metrics.instances_received.inc()
            if outcome.study_uid and outcome.study_uid not in rec.studies:
                rec.studies.append(outcome.study_uid)
            if self.on_stored is not None and outcome.study_uid:
                self.on_stored(outcome.study_uid)
            return SUCCESS
        rec.refused += 1
        rec.refusals[outcome.reason] = rec.refusals.get(outcome.reason, 0) + 1
        self.metrics.instances_refused.labels(outcome.reason).inc()
        log.warning(
            "C-STORE from %s refused (%s): %s", rec.calling_ae, outcome.reason, outcome.message
        )
        status = Dataset()
        status.Status = outcome.status
        status.ErrorComment = f"{outcome.reason}: {outcome.message}"[:64]
        return status

    def _tls_failed(self, address: tuple[str, int], exc: Exception) -> None:
        """A caller that never completed the TLS handshake: audited like any refusal."""
        rec = AssociationRecord(
            association_id=f"tls-{address[0]}-{address[1]}-{time.time():.6f}",
            calling_ae="",
            called_ae="",
            peer_host=str(address[0]),
            peer_port=int(address[1]),
            tls=True,
            ended_at=time.time(),
            outcome="rejected",
            reason=f"tls_handshake_failed: {exc}"[:200],
        )
        self.audit.write(rec)
        self.metrics.associations.labels("rejected").inc()
        log.warning("TLS handshake with %s:%d failed: %s", address[0], address[1], exc)

    def _defer_tls_handshake(self, server: ThreadedAssociationServer) -> None:
        """pynetdicom wraps accepted sockets with the handshake done in its accept loop and no
        timeout, so one caller that connects and stays silent blocks every other caller. Accept
        without the handshake and run it, bounded by the network timeout, in the
        association's own thread."""
        context = server.ssl_context
        assert context is not None
        listener = server.socket
        assert listener is not None  # bound by start_server
        timeout_s = float(self.ae.network_timeout or 60)
        process = server.process_request_thread

        def get_request() -> tuple[socket.socket, tuple[str, int]]:
            client, address = listener.accept()
            client.settimeout(timeout_s)
            wrapped = context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
            return wrapped, address

        def process_request_thread(request: Any, client_address: Any) -> None:
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:  # includes the timeout
                self._tls_failed(client_address, exc)
                server.shutdown_request(request)
                return
            request.settimeout(None)  # as before: pynetdicom's own timeouts apply from here
            process(request, client_address)

        server.get_request = get_request  # type: ignore[method-assign]
        server.process_request_thread = process_request_thread  # type: ignore[method-assign]

    # --- server -------------------------------------------------------------------------------
    def start(self) -> ThreadedAssociationServer:
        listen = self.config.listen
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, lambda e: self._finish(e, "released")),
            (evt.EVT_ABORTED, lambda e: self._finish(e, "aborted")),
            (evt.EVT_REJECTED, lambda e: self._finish(e, "rejected")),
            (evt.EVT_CONN_CLOSE, lambda e: self._finish(e, "closed")),
        ]
        server = self.ae.start_server(
            (listen.bind_address, listen.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=server_context(listen.tls),
        )
        assert server is not None  # block=False returns the server
        if server.ssl_context is not None:
            self._defer_tls_handshake(server)
        self.server = server
        log.info(
            "listening as %s on %s:%d%s",
            listen.ae_title,
            listen.bind_address,
            server.server_address[1],
            " (TLS)" if listen.tls.enabled else "",
        )
        return server

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("server not started")
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
