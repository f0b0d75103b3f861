"""Shared fixtures: one simulated DICOM study and one small cohort per test session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ms_forecast_node", *args],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="session")
def simulated_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """`ms-forecast-node simulate study --seed 1 --out DIR`, exactly as the issue states it."""
    out = tmp_path_factory.mktemp("study")
    result = run_cli("simulate", "study", "--seed", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "study.json").read_text())
    return out, manifest


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    result = run_cli("simulate", "cohort", "--n", "4", "--out", str(out), "--seed", "3")
    assert result.returncode == 0, result.stderr
    return out
