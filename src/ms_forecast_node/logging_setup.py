"""Logging is configured exactly once, by the CLI entry point."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

_CONFIGURED = False


def configure_logging(level: str | int = "INFO", log_format: str = "text") -> None:
    """Install one handler on the root logger; later calls only change the level.

    ``log_format``: "text" (human-readable, rich) or "json" (one JSON object per line with
    study and job ids, for log collectors).
    """
    global _CONFIGURED
    root = logging.getLogger()
    root.setLevel(level)
    # pynetdicom logs every PDU and DIMSE message at INFO: per-instance noise that costs
    # ingest time. Its warnings and errors still come through; DEBUG shows everything.
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    verbose = isinstance(numeric, int) and numeric <= logging.DEBUG
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if _CONFIGURED:
        return
    # Logs go to stderr so that stdout carries only a command's results (scripts parse it).
    if log_format == "json":
        from ms_forecast_node.status.jsonlog import json_handler

        root.addHandler(json_handler(sys.stderr))
    elif log_format == "text":
        handler = RichHandler(
            console=Console(stderr=True), rich_tracebacks=True, show_path=False, markup=False
        )
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
    else:
        raise ValueError(f"log format {log_format!r}: use 'text' or 'json'")
    _CONFIGURED = True
