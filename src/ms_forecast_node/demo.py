"""`make demo`: send a simulated study to a running node and watch the results arrive.

A local Storage SCP plays the PACS that receives the results (AE ``DEMO-VIEWER``, port 11113 in
``deploy/demo.yaml``); the study is sent with C-STORE as ``DEMO-PACS``, as a PACS auto-routing
rule would.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from ms_forecast_node.errors import MSForecastError


class DemoReceiver:
    """Stores what the node sends under ``out`` and remembers what arrived."""

    def __init__(self, out: Path, port: int, ae_title: str = "DEMO-VIEWER") -> None:
        self.out = out
        self.arrived: list[tuple[str, str]] = []  # (modality, series description)
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.out.mkdir(parents=True, exist_ok=True)
        ds.save_as(self.out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.arrived.append((str(ds.get("Modality", "")), str(ds.get("SeriesDescription", ""))))
        return 0x0000

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def send_study(
    files: list[Path], port: int, calling: str = "DEMO-PACS", called: str = "MSFORECAST"
) -> int:
    ae = AE(ae_title=calling)
    # The study's own SOP classes only: pynetdicom allows 128 requested contexts.
    for sop_class in sorted(
        {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in files}
    ):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise MSForecastError(
            f"the node at 127.0.0.1:{port} refused or is not running (start it with `make run`)",
            reason="demo_node_unreachable",
        )
    sent = 0
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            if status and int(status.Status) == 0:
                sent += 1
    finally:
        assoc.release()
    return sent


def wait_for_results(receiver: DemoReceiver, expected_min: int, timeout_s: float) -> None:
    shown = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with receiver._lock:
            new = receiver.arrived[shown:]
        for modality, description in new:
            print(f"  arrived: {modality:<3} {description}", flush=True)
        shown += len(new)
        if shown >= expected_min:
            return
        time.sleep(1.0)
    raise MSForecastError(
        f"only {shown} result objects arrived in {timeout_s:.0f} s (see `ms-forecast-node status`)",
        reason="demo_timeout",
    )
