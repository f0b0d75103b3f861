"""The resumable sampler comparison of benchmarks/forecast.py: its state and its verdict."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "forecast.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_forecast", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


HEADER = {
    "model_sha256": "ab" * 32,
    "cohort": "c",
    "patients_selected": "with NET2",
    "few_step": "ancestral, 1 steps, guidance 1.0",
    "reference": "DDPM ancestral, 1000 steps",
    "few_step_samples": "32",
    "ddpm_samples": "2",
}


def _row(patient: str, d_dice: float, d_f1: float) -> dict[str, Any]:
    return {
        "patient": patient,
        "few_step_s_per_sample": 0.1,
        "ddpm_s_per_sample": 60.0,
        "dice_few_step": 0.3 + d_dice,
        "dice_ddpm": 0.3,
        "f1_few_step": 0.4 + d_f1,
        "f1_ddpm": 0.4,
        "lesions_per_sample_few_step": 1.0,
        "lesions_per_sample_ddpm": 1.0,
    }


def test_verdict_needs_both_intervals_inside_the_tolerance(bench: ModuleType) -> None:
    close = [_row(f"p{i}", 0.01 * (-1) ** i, 0.005) for i in range(20)]
    summary = bench.fidelity_summary(HEADER, close, "cpu")
    assert summary["dice_within_tolerance"] and summary["lesion_f1_within_tolerance"]
    assert summary["speedup_vs_reference"] == pytest.approx(600.0)
    assert summary["patients"] == 20
    # One patient far off widens the Dice interval past ±0.02; F1 stays inside.
    off = [*close[:-1], _row("p19", 0.5, 0.005)]
    summary = bench.fidelity_summary(HEADER, off, "cpu")
    assert not summary["dice_within_tolerance"]
    assert summary["lesion_f1_within_tolerance"]


def test_state_resumes_and_refuses_another_run(bench: ModuleType, tmp_path: Path) -> None:
    plan = bench.FidelityPlan(
        few_samples=32,
        ddpm_samples=2,
        state=tmp_path / "state.json",
        budget_s=None,
        identity={},
    )
    assert bench._load_state(plan, HEADER) == []
    rows = [_row("p0", 0.0, 0.0)]
    bench._save_state(plan, HEADER, rows)
    assert bench._load_state(plan, HEADER) == rows
    assert not (tmp_path / "state.tmp").exists()
    with pytest.raises(SystemExit, match="another run"):
        bench._load_state(plan, {**HEADER, "ddpm_samples": "4"})
