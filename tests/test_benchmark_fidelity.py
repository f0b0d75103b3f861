"""The resumable sampler comparison of benchmarks/forecast.py: its state and its verdict."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from ms_forecast_node.forecast.config import SamplerConfig

from .benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("forecast")


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
    # The two readings differ: Dice's wide interval covers zero but leaves ±0.02; F1's delta
    # is a steady +0.005, inside ±0.02 though its interval does not cover zero.
    assert summary["dice_ci_covers_zero"]
    assert not summary["lesion_f1_ci_covers_zero"]


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


def _plan(bench: ModuleType, state: Path, **kw: Any) -> Any:
    return bench.FidelityPlan(
        few_samples=32, ddpm_samples=2, state=state, budget_s=None, identity={}, **kw
    )


def test_shard_is_parsed_and_checked(bench: ModuleType) -> None:
    assert bench.parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "-1/2", "1", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_shard(bad)


def test_merge_takes_over_other_shards_once_and_refuses_another_run(
    bench: ModuleType, tmp_path: Path
) -> None:
    other = tmp_path / "shard1.json"
    bench._save_state(_plan(bench, other), HEADER, [_row("p1", 0.0, 0.0), _row("p0", 1.0, 1.0)])
    own = _plan(bench, tmp_path / "own.json", merge=(other, other))
    bench._save_state(own, HEADER, [_row("p0", 0.0, 0.0)])
    rows = bench._load_state(own, HEADER)
    assert [r["patient"] for r in rows] == ["p0", "p1"]
    assert rows[0]["dice_few_step"] == 0.3  # its own row of p0 wins over the other file's
    bench._save_state(_plan(bench, other), {**HEADER, "ddpm_samples": "4"}, [_row("p2", 0, 0)])
    with pytest.raises(SystemExit, match="another run"):
        bench._load_state(own, HEADER)


def test_shards_together_write_the_rows_of_one_run(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shards split the patients and keep the seeds a single run gives them; merging their
    states gives the single run's rows."""

    def fake_sample_masks(model: Any, study: Any, therapies: Any, horizon: Any, cfg: Any) -> Any:
        return np.full((1, cfg.samples, 2, 2, 2), cfg.seed % 7, dtype=bool), None

    def fake_scores(masks: Any, target: Any, min_voxels: int) -> tuple[float, float, float]:
        return float(masks.mean()), float(masks.sum()), float(masks.shape[0])

    monkeypatch.setattr(bench, "sample_masks", fake_sample_masks)
    monkeypatch.setattr(bench, "per_sample_scores", fake_scores)
    model = SimpleNamespace(config=SimpleNamespace(timesteps=1000))
    examples = [
        SimpleNamespace(
            patient_id=f"p{i}", study=None, therapy="placebo", horizon_weeks=48.0, target=None
        )
        for i in range(5)
    ]
    few = SamplerConfig(method="ancestral", steps=1)
    ref = replace(few, method="ddpm")
    cpu = torch.device("cpu")

    def run(state: Path, shard: tuple[int, int], merge: tuple[Path, ...] = ()) -> Any:
        plan = _plan(bench, state, shard=shard, merge=merge)
        return bench.sampler_fidelity(model, examples, few, ref, plan, cpu)["per_patient"]

    single = run(tmp_path / "single.json", (0, 1))
    even = run(tmp_path / "even.json", (0, 2))
    odd = run(tmp_path / "odd.json", (1, 2))
    assert [r["patient"] for r in even] == ["p0", "p2", "p4"]
    assert [r["patient"] for r in odd] == ["p1", "p3"]
    merged = run(tmp_path / "even.json", (0, 1), merge=(tmp_path / "odd.json",))
    assert [r["patient"] for r in merged] == [f"p{i}" for i in range(5)]
    key = lambda r: r["patient"]  # noqa: E731
    strip = [{k: v for k, v in r.items() if not k.endswith("_per_sample")} for r in merged]
    expect = [{k: v for k, v in r.items() if not k.endswith("_per_sample")} for r in single]
    assert sorted(strip, key=key) == sorted(expect, key=key)
    assert [r["seed"] for r in sorted(merged, key=key)] == [11 + 1000 * i for i in range(5)]
