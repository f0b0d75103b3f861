"""The last C-ECHO result per destination, kept in memory.

Only for the status page: an echo is a point-in-time check an operator triggers, so it need
not survive a restart and does not belong in the node's database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ms_forecast_node.config.settings import DestinationConfig, NodeConfig

#: ``ms_forecast_node.send.outbox.echo``'s signature: (config, destination) -> (ok, message).
EchoFunction = Callable[[NodeConfig, DestinationConfig], tuple[bool, str]]


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str
    at: float  # epoch seconds
    seconds: float  # how long the echo took


class EchoBook:
    def __init__(self, config: NodeConfig, echo: EchoFunction) -> None:
        self._config = config
        self._echo = echo
        self._lock = threading.Lock()
        self._last: dict[str, EchoResult] = {}

    def last(self, name: str) -> EchoResult | None:
        with self._lock:
            return self._last.get(name)

    def run(self, name: str) -> EchoResult:
        """C-ECHO the configured destination ``name`` (KeyError when there is none)."""
        destination = self._config.destinations[name]
        started = time.monotonic()
        try:
            ok, message = self._echo(self._config, destination)
        except Exception as exc:  # socket and TLS errors are results too, not page crashes
            ok, message = False, f"{type(exc).__name__}: {exc}"
        result = EchoResult(ok, message, time.time(), time.monotonic() - started)
        with self._lock:
            self._last[name] = result
        return result
