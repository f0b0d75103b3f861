"""Audit log: one JSON line per association — who, when, what, outcome."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class AssociationRecord:
    association_id: str
    calling_ae: str
    called_ae: str
    peer_host: str
    peer_port: int
    tls: bool
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    outcome: str = "open"  # released, aborted, rejected, closed
    reason: str | None = None
    echoes: int = 0
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes_received: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    studies: list[str] = field(default_factory=list)


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: AssociationRecord) -> None:
        line = json.dumps(asdict(record), sort_keys=True, ensure_ascii=False)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def records(self) -> list[dict[str, object]]:
        if not self.path.is_file():
            return []
        return [
            json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line
        ]
