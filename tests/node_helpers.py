"""Test helpers for the node: a configuration on loopback, a results receiver, dcmtk calls."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ms_forecast_node.config.settings import NodeConfig


@dataclass
class Receiver:
    """A Storage SCP standing in for the PACS: records what arrives."""

    ae_title: str = "RESULTS"
    received: list[Dataset] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    port: int = 0
    _server: Any = None

    def start(self) -> Receiver:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        lock = threading.Lock()

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with lock:
                self.received.append(ds)
                uid = str(ds.SOPInstanceUID)
                self.counts[uid] = self.counts.get(uid, 0) + 1
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def node_config(root: Path, receiver_port: int, **overrides: Any) -> NodeConfig:
    raw: dict[str, Any] = {
        "listen": {"ae_title": "MSFORECAST", "bind_address": "127.0.0.1", "port": 0},
        "peers": [{"ae_title": "STORESCU", "quiet_period_s": 1.0, "destination": "results"}],
        "destinations": {
            "results": {"ae_title": "RESULTS", "host": "127.0.0.1", "port": receiver_port}
        },
        "storage": {"root": str(root), "min_free_bytes": 0},
        "processing": {"samples": 2, "steps": 2},
        "sending": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0, "max_attempts": 4},
        # A free port per node: tests run side by side and must not fight over 8080.
        "status_page": {"port": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return NodeConfig.model_validate(raw)


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        import pytest

        pytest.skip(f"dcmtk's {tool} is not installed")
    return path


def storescu(
    port: int, files: list[Path], *, aet: str = "STORESCU", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            aet,
            "-aec",
            "MSFORECAST",
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
