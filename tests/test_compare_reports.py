"""``compare-reports``: two evaluations of one cohort, compared patient by patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ms_forecast_node.cli import app
from ms_forecast_node.errors import ReportComparisonError
from ms_forecast_node.forecast.compare import compare_reports, render_comparison
from ms_forecast_node.simulate.activity import rank_auc

THERAPIES = ["placebo", "ocrelizumab"]


def _report(path: Path, activity: np.ndarray, active: np.ndarray, version: str) -> Path:
    rows = []
    for i, (p, a) in enumerate(zip(activity, active, strict=True)):
        rows.append(
            {
                "patient_id": f"P{i:03d}",
                "factual_therapy": "placebo",
                "active": int(a),
                "count": float(2 * a),
                "expected_counts": [1.5, 0.2],
                "diffusion": {
                    "activity": float(p),
                    "count": float(2 * p),
                    "counterfactual": [float(2 * p), float(0.2 * p)],
                },
            }
        )
    report = {
        "model": {"version": version},
        "sampler": {"method": "dpmpp2m", "steps": 6, "samples": 8},
        "therapies": THERAPIES,
        "patients": rows,
    }
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps(report))
    return path


@pytest.fixture
def two_reports(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    active = rng.integers(0, 2, 120)
    good = np.clip(0.35 * active + rng.uniform(0.2, 0.6, 120), 0, 1)
    poor = np.clip(good + rng.normal(0, 0.25, 120), 0, 1)  # the same forecasts, degraded
    a = _report(tmp_path / "a", good, active, "0.5.0")
    b = _report(tmp_path / "b", poor, active, "0.3.0")
    return a, b, good, poor, active


def test_differences_are_first_minus_second_with_intervals(two_reports: tuple) -> None:
    a, b, good, poor, active = two_reports
    result = compare_reports(a, b, n_boot=400)
    auc = result["statistics"]["activity_auc"]
    assert auc["first"] == pytest.approx(rank_auc(good, active))
    assert auc["second"] == pytest.approx(rank_auc(poor, active))
    assert auc["difference"] == pytest.approx(auc["first"] - auc["second"])
    assert 0 < auc["ci95"][0] < auc["difference"] < auc["ci95"][1]  # resolved: > 0
    assert result["n_patients"] == 120
    assert set(result["statistics"]) == {
        "activity_auc",
        "activity_ece",
        "count_mae",
        "count_spearman",
        "counterfactual_mae",
    }
    text = render_comparison(result)
    assert "0.5.0 (dpmpp2m 6 steps × 8)" in text and "| activity_auc |" in text


def test_reports_of_other_realisations_are_refused(tmp_path: Path, two_reports: tuple) -> None:
    a, _, good, _, active = two_reports
    other = _report(tmp_path / "other", good, 1 - active, "0.3.0")
    with pytest.raises(ReportComparisonError, match="different truth"):
        compare_reports(a, other)
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"methods": {}}))
    with pytest.raises(ReportComparisonError, match="no per-patient records"):
        compare_reports(a, old)


def test_cli_prints_the_table_and_fails_clearly(tmp_path: Path, two_reports: tuple) -> None:
    a, b, *_ = two_reports
    runner = CliRunner()
    ok = runner.invoke(app, ["compare-reports", str(a), str(b), "--out", str(tmp_path / "c.json")])
    assert ok.exit_code == 0, ok.output
    assert "first − second" in ok.output
    assert json.loads((tmp_path / "c.json").read_text())["n_patients"] == 120
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "report.json").write_text("{}")
    bad = runner.invoke(app, ["compare-reports", str(a), str(tmp_path / "empty")])
    assert bad.exit_code == 2
    assert "report_comparison_invalid" in bad.output
