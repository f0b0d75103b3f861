"""Structured logs: one JSON object per line, for journald, Loki, Elasticsearch and friends.

Callers attach the study and job they are working on with ``extra=``::

    log.info("job %d: forecasting", job_id, extra={"job_id": job_id, "study_uid": uid})

and the formatter lifts those keys to top-level fields, so a log system can filter one
study's whole history without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import IO, Any

#: ``extra=`` keys copied into the JSON object when a record carries them.
CONTEXT_FIELDS = (
    "study_uid",
    "job_id",
    "study_version",
    "calling_ae",
    "destination",
    "reason",
)


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", [context fields], ["exception"]}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            # UTC with milliseconds and an explicit offset: sortable, unambiguous across hosts.
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            if key in record.__dict__ and record.__dict__[key] is not None:
                entry[key] = record.__dict__[key]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a UID object or a Path in extra= must not make the log line vanish.
        return json.dumps(entry, ensure_ascii=False, default=str)


_MARK = "_msfn_json_handler"


def json_handler(stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default: stdout carries command results) with the JSON
    formatter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _MARK, True)
    return handler


def install_json_logging(
    level: str | int = "INFO", stream: IO[str] | None = None
) -> logging.Handler:
    """Put one JSON handler on the root logger, replacing a JSON handler installed before
    (so calling it twice does not double every line)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    handler = json_handler(stream)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
