"""Compare two evaluation reports of the same held-out cohort patient by patient.

Two models' headline figures on 100 patients differ by sampling noise as much as by merit (an
AUC interval spans about ±0.1), but both models err on many of the same patients, so the
paired difference is resolved far better than the two intervals suggest. ``evaluate`` stores
every patient's truth and predictions in ``report.json``; this module matches the patients of
two such reports and bootstraps the difference of each statistic over them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ms_forecast_node.errors import ReportComparisonError
from ms_forecast_node.forecast import metrics as M
from ms_forecast_node.forecast.evaluate import (
    PATIENT_STATISTICS,
    MethodPredictions,
    statistic_columns,
)


def _load(path: Path) -> dict[str, Any]:
    report_path = path / "report.json" if path.is_dir() else path
    report = json.loads(report_path.read_text())
    if "patients" not in report:
        raise ReportComparisonError(
            f"{report_path} has no per-patient records (written before they existed): "
            "evaluate again to compare patient by patient"
        )
    return report


def _method_and_truth(
    rows: list[dict[str, Any]], method: str
) -> tuple[MethodPredictions, dict[str, Any]]:
    """The records of ``method`` as the evaluation's own predictions and truth."""
    pred = MethodPredictions(
        activity=[r[method]["activity"] for r in rows],
        count=[r[method]["count"] for r in rows],
        counterfactual=[r[method]["counterfactual"] for r in rows]
        if all(r[method]["counterfactual"] is not None for r in rows)
        else [],
    )
    truth = {
        "active": np.array([r["active"] for r in rows], dtype=int),
        "count": np.array([r["count"] for r in rows], dtype=float),
        "expected": np.array([r["expected_counts"] for r in rows], dtype=float),
    }
    return pred, truth


def compare_reports(
    first: Path, second: Path, method: str = "diffusion", n_boot: int = 2000
) -> dict[str, Any]:
    """``method`` of ``first`` minus that of ``second`` on their common patients.

    The truth must agree patient by patient (same cohort files); otherwise the comparison would
    mix the difference between the models with the difference between two cohort realisations.
    """
    a, b = _load(first), _load(second)
    if a.get("therapies") != b.get("therapies"):
        raise ReportComparisonError("the reports list different therapies")
    by_id = {r["patient_id"]: r for r in b["patients"]}
    pairs = [(r, by_id[r["patient_id"]]) for r in a["patients"] if r["patient_id"] in by_id]
    if len(pairs) < 2:
        raise ReportComparisonError(f"only {len(pairs)} patients in common")
    for ra, rb in pairs:
        if (ra["active"], ra["count"], ra["expected_counts"]) != (
            rb["active"],
            rb["count"],
            rb["expected_counts"],
        ):
            raise ReportComparisonError(
                f"patient {ra['patient_id']} has different truth in the two reports: they were "
                "evaluated on different realisations of the cohort"
            )
    pred_a, truth = _method_and_truth([ra for ra, _ in pairs], method)
    pred_b, _ = _method_and_truth([rb for _, rb in pairs], method)
    statistics: dict[str, Any] = {}
    for name, (kind, fn) in PATIENT_STATISTICS.items():
        if kind == "counterfactual" and not (pred_a.counterfactual and pred_b.counterfactual):
            continue
        pa, y = statistic_columns(pred_a, truth, kind)
        pb, _ = statistic_columns(pred_b, truth, kind)

        def delta(pa: Any, pb: Any, y: Any, fn: Any = fn) -> float:
            return float(fn(pa, y) - fn(pb, y))

        value, lo, hi = M.bootstrap_statistic(delta, pa, pb, y, n_boot=n_boot)
        statistics[name] = {
            "first": float(fn(pa, y)),
            "second": float(fn(pb, y)),
            "difference": value,
            "ci95": [lo, hi],
        }
    return {
        "first": {"report": str(first), "model": a.get("model"), "sampler": a.get("sampler")},
        "second": {"report": str(second), "model": b.get("model"), "sampler": b.get("sampler")},
        "method": method,
        "n_patients": len(pairs),
        "statistics": statistics,
    }


def render_comparison(result: dict[str, Any]) -> str:
    """A Markdown table of :func:`compare_reports`."""

    def label(side: dict[str, Any]) -> str:
        model = side.get("model") or {}
        sampler = side.get("sampler") or {}
        return (
            f"{model.get('version', '?')} ({sampler.get('method', '?')} "
            f"{sampler.get('steps', '?')} steps × {sampler.get('samples', '?')})"
        )

    lines = [
        f"First: {label(result['first'])}, `{result['first']['report']}`; second: "
        f"{label(result['second'])}, `{result['second']['report']}`; "
        f"{result['n_patients']} patients in common; 95 % paired bootstrap intervals.",
        "",
        "| statistic | first | second | first − second | 95 % interval |",
        "|---|---|---|---|---|",
    ]
    for name, s in result["statistics"].items():
        lo, hi = s["ci95"]
        lines.append(
            f"| {name} | {s['first']:.3f} | {s['second']:.3f} | {s['difference']:+.3f} "
            f"| [{lo:+.3f}, {hi:+.3f}] |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["ReportComparisonError", "compare_reports", "render_comparison"]
