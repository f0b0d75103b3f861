"""``ms-forecast-node evaluate``: score the forecaster on a held-out simulated cohort.

Methods compared on the same patients:

* ``diffusion`` — the shipped generative model (samples aggregated as in production);
* ``unet_baseline`` — the deterministic U-Net (probability map, threshold 0.5, components);
  its activity score is the maximum voxel probability;
* ``base_rate`` — the population base rate of each therapy arm in the training cohort;
* ``image_evidence`` — counts the baseline's young lesions and measures its lesion load
  exactly, and forecasts with the simulator's own model from the posterior of the
  image-visible activity given them: what a perfect reader of those two signs can reach;
* ``image_ceiling`` — knows perfectly what the simulator puts into the baseline images and
  nothing else (:mod:`ms_forecast_node.forecast.ceilings`): the bound for any image-based
  forecaster, for activity, counts, counterfactuals and lesion detection;
* ``oracle`` — knows each patient's true expected NET2 count under every therapy
  (``P(active) = 1 − exp(−μ)``), including its part that no image shows.

Because the simulator knows every counterfactual, predicted counts are also compared with the
true expected counts under **every** therapy (ranking agreement, average effect vs placebo).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from ms_forecast_node.anatomy.locations import LocationClass
from ms_forecast_node.forecast import metrics as M
from ms_forecast_node.forecast.ceilings import (
    EvidenceModel,
    LoadModel,
    RateTable,
    activity_parameters,
    ceiling_with_prior,
    evidence_forecast,
    evidence_with_prior,
    prelesional_detection_ceiling,
    visible_information_forecast,
)
from ms_forecast_node.forecast.checkpoint import load_model, sha256_of
from ms_forecast_node.forecast.config import PRIOR_FLAG, SamplerConfig
from ms_forecast_node.forecast.data import Example, hide_prior, load_examples
from ms_forecast_node.forecast.device import autocast, pick_device
from ms_forecast_node.forecast.model import NET2Forecaster
from ms_forecast_node.forecast.sampling import (
    _components,
    forecast_study,
    template_location_maps,
)
from ms_forecast_node.simulate.cohort import read_cohort

log = logging.getLogger(__name__)


@dataclass
class MethodPredictions:
    """Per patient: activity probability and counts under the factual therapy, counts under
    every therapy, factual masks (when the method makes masks) and counts per location."""

    activity: list[float] = field(default_factory=list)
    count: list[float] = field(default_factory=list)
    counterfactual: list[list[float]] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)
    by_location: list[dict[str, float]] = field(default_factory=list)
    # Per patient, the method's order of the therapies (0 = fewest lesions) when it differs
    # from the order of ``counterfactual`` (the diffusion model breaks ties in the sample mean
    # with its marginal expected volume, as ForecastResult.ranked does).
    ranking: list[list[float]] = field(default_factory=list)


def _interval_evidence(example: Example) -> tuple[int, float] | None:
    """The prior visit's evidence the image-based references read: the number of new and
    enlarging lesions since the prior visit and the interval in weeks (None without a prior
    visit, or when the example is shown to the model without it)."""
    truth = example.sidecar["truth"]
    if "prior_interval_weeks" not in truth or example.study.flags[PRIOR_FLAG] < 0.5:
        return None
    events = int(truth["prior_interval_new_count"]) + int(truth["prior_interval_enlarging_count"])
    return events, float(truth["prior_interval_weeks"])


def _deterministic_maps(
    model: NET2Forecaster, example: Example, therapies: Sequence[str]
) -> np.ndarray:
    """(n_therapies, D, H, W) probabilities of the deterministic baseline."""
    index = {c: i for i, c in enumerate(model.config.therapies)}
    device = next(model.parameters()).device
    images = torch.from_numpy(example.study.images[None]).float().to(device)
    flags = torch.from_numpy(example.study.flags[None]).float().to(device)
    with torch.no_grad(), autocast(device):
        enc = model.encoder(images, flags)
        n = len(therapies)
        th = torch.tensor([index[t] for t in therapies], device=device)
        t = torch.full((n,), model.config.timesteps - 1, device=device)
        hz = torch.full((n,), example.horizon_weeks, device=device)
        x = torch.zeros((n, 1, *example.study.images.shape[1:]), device=device)
        logit = model.denoiser(x, t, th, hz, enc)
    return torch.sigmoid(logit[:, 0].float()).cpu().numpy()


def _truth(examples: list[Example], therapies: Sequence[str]) -> dict[str, Any]:
    return {
        "active": np.array([e.sidecar["truth"]["net2_active"][e.therapy] for e in examples]),
        "count": np.array([e.sidecar["truth"]["net2_count"][e.therapy] for e in examples]),
        "expected": np.array(
            [[e.sidecar["truth"]["expected_net2_count"][t] for t in therapies] for e in examples]
        ),
        "counterfactual_count": np.array(
            [[e.sidecar["truth"]["net2_count"][t] for t in therapies] for e in examples]
        ),
        "by_location": [e.sidecar["truth"]["net2_count_by_location"][e.therapy] for e in examples],
        "therapy": [e.therapy for e in examples],
    }


# Patient-level statistics that get bootstrap intervals: (predictions, truth) columns → value.
PATIENT_STATISTICS: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray], float]]] = {
    "activity_auc": ("activity", lambda p, y: M.rank_auc(p, y)),
    "activity_ece": ("activity", lambda p, y: M.expected_calibration_error(p, y)),
    "count_mae": ("count", lambda c, t: float(np.mean(np.abs(c - t)))),
    "count_spearman": ("count", lambda c, t: M.count_errors(c, t)["spearman"]),
    "counterfactual_mae": ("counterfactual", lambda c, t: float(np.mean(np.abs(c - t)))),
}


def statistic_columns(pred: MethodPredictions, truth: dict[str, Any], kind: str) -> tuple[Any, Any]:
    """(predictions, truth) columns of one kind of :data:`PATIENT_STATISTICS`."""
    if kind == "activity":
        return np.clip(np.asarray(pred.activity, dtype=float), 0, 1), truth["active"].astype(int)
    if kind == "count":
        return np.asarray(pred.count, dtype=float), truth["count"].astype(float)
    return np.asarray(pred.counterfactual, dtype=float), truth["expected"]


def _patient_bootstrap(pred: MethodPredictions, truth: dict[str, Any]) -> dict[str, Any]:
    """95 % percentile-bootstrap intervals over patients for the headline statistics.

    With 100 held-out patients these intervals are wide (an AUC of 0.7 spans about ±0.1), and
    two regenerations of one cohort differ by about as much: report them beside every figure.
    """
    out: dict[str, Any] = {}
    for name, (kind, fn) in PATIENT_STATISTICS.items():
        if kind == "counterfactual" and not pred.counterfactual:
            continue
        _, lo, hi = M.bootstrap_statistic(fn, *statistic_columns(pred, truth, kind))
        out[name] = [lo, hi]
    return out


def paired_differences(
    preds: dict[str, MethodPredictions], truth: dict[str, Any], of: str = "diffusion"
) -> dict[str, Any]:
    """``of`` minus each other method on the same patients, with 95 % bootstrap intervals.

    Resampling patients jointly keeps the pairing, so the interval of a difference is much
    narrower than the two methods' own intervals suggest when both err on the same patients.
    """
    out: dict[str, Any] = {}
    a = preds[of]
    for other, b in preds.items():
        if other == of:
            continue
        diffs: dict[str, Any] = {}
        for name, (kind, fn) in PATIENT_STATISTICS.items():
            if kind == "counterfactual" and not (a.counterfactual and b.counterfactual):
                continue
            pa, y = statistic_columns(a, truth, kind)
            pb, _ = statistic_columns(b, truth, kind)

            def delta(pa: Any, pb: Any, y: Any, fn: Any = fn) -> float:
                return float(fn(pa, y) - fn(pb, y))

            value, lo, hi = M.bootstrap_statistic(delta, pa, pb, y)
            diffs[name] = {"difference": value, "ci95": [lo, hi]}
        out[other] = diffs
    return out


def _patient_records(
    preds: dict[str, MethodPredictions],
    truth: dict[str, Any],
    examples: list[Example],
) -> list[dict[str, Any]]:
    """Per patient: the truth and each method's predictions, so that two reports on the same
    cohort can be compared patient by patient later without forecasting again."""
    rows = []
    for i, e in enumerate(examples):
        row: dict[str, Any] = {
            "patient_id": e.patient_id,
            "factual_therapy": e.therapy,
            "active": int(truth["active"][i]),
            "count": float(truth["count"][i]),
            "expected_counts": [float(v) for v in truth["expected"][i]],
        }
        for name, p in preds.items():
            row[name] = {
                "activity": float(p.activity[i]),
                "count": float(p.count[i]),
                "counterfactual": [float(v) for v in p.counterfactual[i]]
                if p.counterfactual
                else None,
            }
        rows.append(row)
    return rows


def _score(
    name: str,
    pred: MethodPredictions,
    truth: dict[str, Any],
    examples: list[Example],
    therapies: Sequence[str],
    figures: Path,
) -> dict[str, Any]:
    active = truth["active"].astype(int)
    prob = np.clip(np.asarray(pred.activity, dtype=float), 0.0, 1.0)
    counts = np.asarray(pred.count, dtype=float)
    out: dict[str, Any] = {"activity": M.activity_metrics(prob, active)}
    out["count"] = M.count_errors(counts, truth["count"])
    out["ci95"] = _patient_bootstrap(pred, truth)
    curve = M.reliability_curve(prob, active)
    M.plot_reliability(curve, figures / f"reliability_{name}.png", f"Activity calibration: {name}")
    if all(m is not None for m in pred.masks) and pred.masks:
        dices = [
            M.dice(m, e.target)
            for m, e, a in zip(pred.masks, examples, active, strict=True)
            if a and m is not None
        ]
        det = M.pooled_detection(
            M.lesion_detection(m, e.target)
            for m, e in zip(pred.masks, examples, strict=True)
            if m is not None
        )
        out["voxel_dice_active_mean"] = float(np.mean(dices)) if dices else float("nan")
        out["lesion_detection"] = {
            "precision": det.precision,
            "recall": det.recall,
            "f1": det.f1,
            "n_truth": det.n_truth,
            "n_pred": det.n_pred,
        }
    if pred.by_location:
        per_class = {}
        for c in LocationClass:
            p = np.array([d.get(c.value, 0.0) for d in pred.by_location])
            t = np.array([d.get(c.value, 0) for d in truth["by_location"]])
            per_class[c.value] = float(np.mean(np.abs(p - t)))
        out["location_count_mae"] = per_class
    cf = np.asarray(pred.counterfactual, dtype=float)
    if cf.size:
        expected = truth["expected"]
        out["counterfactual"] = {
            "count_mae_vs_expected": float(np.mean(np.abs(cf - expected))),
            "spearman_vs_expected_pooled": M.count_errors(cf.ravel(), expected.ravel())["spearman"],
            "ranking_agreement": M.ranking_agreement(
                np.asarray(pred.ranking, dtype=float) if pred.ranking else cf, expected
            ),
            "average_effect_predicted": M.average_effect(cf, list(therapies)),
            "average_effect_true": M.average_effect(expected, list(therapies)),
        }
    strata: dict[str, Any] = {}
    for code in therapies:
        sel = np.array([th == code for th in truth["therapy"]])
        if sel.sum() == 0:
            continue
        strata[code] = {
            "n": int(sel.sum()),
            "active_share": float(active[sel].mean()),
            "auc": M.rank_auc(prob[sel], active[sel]),
            "count_mae": float(np.mean(np.abs(counts[sel] - truth["count"][sel]))),
            "mean_predicted_activity": float(prob[sel].mean()),
        }
    out["by_factual_therapy"] = strata
    return out


def evaluate(
    cohort: Path,
    model_path: Path,
    out: Path,
    sampler: SamplerConfig,
    baseline_path: Path | None = None,
    train_cohort: Path | None = None,
    limit: int | None = None,
    device: str = "auto",
    without_prior: bool = False,
) -> dict[str, Any]:
    """Score the diffusion model and the references on ``cohort``; write the report to ``out``.

    ``device``: ``auto`` runs the networks on CUDA when present (bf16 autocast), else the CPU.
    ``without_prior``: every method sees each patient as a first visit (the prior visit's
    channels and flags zeroed, and the references ignore the interval's events).
    """
    out.mkdir(parents=True, exist_ok=True)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    dev = pick_device(device)
    model = load_model(model_path, device=dev)
    therapies = list(model.config.therapies)
    examples = load_examples(cohort, model.config, limit=limit)
    if without_prior:
        examples = [hide_prior(e) for e in examples]
    truth = _truth(examples, therapies)
    preds: dict[str, MethodPredictions] = {"diffusion": MethodPredictions()}
    start = time.perf_counter()
    for e in tqdm(examples, desc="forecasting held-out patients", unit="patient"):
        result = forecast_study(model, e.study, therapies, e.horizon_weeks, sampler)
        f = result.therapies[e.therapy]
        p = preds["diffusion"]
        p.activity.append(f.probability_of_activity)
        p.count.append(f.expected_count)
        p.counterfactual.append([result.therapies[t].expected_count for t in therapies])
        order = [f.therapy for f in result.ranked()]
        p.ranking.append([float(order.index(t)) for t in therapies])
        p.masks.append(f.mask)
        p.by_location.append({k.value: v for k, v in f.expected_counts_by_location().items()})
    diffusion_s = time.perf_counter() - start
    if baseline_path is not None:
        baseline = load_model(baseline_path, device=dev)
        maps = template_location_maps(baseline.config.spacing_mm, baseline.config.crop_shape)
        from ms_forecast_node.anatomy.locations import classify_lesions

        b = preds["unet_baseline"] = MethodPredictions()
        for e in tqdm(examples, desc="baseline U-Net", unit="patient"):
            probs = _deterministic_maps(baseline, e, therapies)
            cf = []
            for i, t in enumerate(therapies):
                labels, n = _components(probs[i] >= sampler.threshold, sampler.min_lesion_voxels)
                cf.append(float(n))
                if t == e.therapy:
                    b.activity.append(float(probs[i].max()))
                    b.count.append(float(n))
                    b.masks.append(labels > 0)
                    classes = classify_lesions(labels, maps) if n else {}
                    b.by_location.append(
                        {
                            c.value: float(sum(v is c for v in classes.values()))
                            for c in LocationClass
                        }
                    )
            b.counterfactual.append(cf)
    if train_cohort is not None:
        header, _ = read_cohort(train_cohort)
        rows = header["patients"]
        rate = {
            t: [r["net2_count_factual"] for r in rows if r["factual_therapy"] == t]
            for t in therapies
        }
        share = {t: float(np.mean(np.asarray(v) > 0)) if v else 0.0 for t, v in rate.items()}
        mean = {t: float(np.mean(v)) if v else 0.0 for t, v in rate.items()}
        br = preds["base_rate"] = MethodPredictions()
        for e in examples:
            br.activity.append(share[e.therapy])
            br.count.append(mean[e.therapy])
            br.counterfactual.append([mean[t] for t in therapies])
    cohort_header, _ = read_cohort(cohort)
    params = activity_parameters(cohort_header)
    efficacy = {t["code"]: float(t["efficacy_net2"]) for t in cohort_header.get("therapies", [])}
    ceiling_ok = all(t in efficacy for t in therapies) and all(
        "z_visible" in e.sidecar["truth"] for e in examples
    )
    tables: dict[float, RateTable] = {}

    def rate_table(horizon: float) -> RateTable:
        if horizon not in tables:
            tables[horizon] = RateTable.build([efficacy[t] for t in therapies], horizon, params)
        return tables[horizon]

    if ceiling_ok:
        ceiling = preds["image_ceiling"] = MethodPredictions()
        for e in examples:
            interval = _interval_evidence(e)
            if interval is None:
                vis = visible_information_forecast(
                    float(e.sidecar["truth"]["z_visible"]),
                    [efficacy[t] for t in therapies],
                    e.horizon_weeks,
                    params,
                )
            else:
                vis = ceiling_with_prior(
                    float(e.sidecar["truth"]["z_visible"]), *interval, rate_table(e.horizon_weeks)
                )
            k = therapies.index(e.therapy)
            ceiling.activity.append(float(vis.p_active[k]))
            ceiling.count.append(float(vis.expected_count[k]))
            ceiling.counterfactual.append([float(v) for v in vis.expected_count])
    evidence_ok = ceiling_ok and all(
        "young_lesion_count" in e.sidecar["truth"]
        and "baseline_lesion_volume_ml" in e.sidecar["truth"]
        for e in examples
    )
    if evidence_ok:
        horizons = sorted({e.horizon_weeks for e in examples})
        models = {
            h: EvidenceModel.build([efficacy[t] for t in therapies], h, params) for h in horizons
        }
        load = LoadModel.from_header(cohort_header)
        reader = preds["image_evidence"] = MethodPredictions()
        for e in examples:
            young = int(e.sidecar["truth"]["young_lesion_count"])
            load_ml = float(e.sidecar["truth"]["baseline_lesion_volume_ml"])
            interval = _interval_evidence(e)
            if interval is None:
                ev = evidence_forecast(young, load_ml, models[e.horizon_weeks], load)
            else:
                ev = evidence_with_prior(
                    young, load_ml, *interval, rate_table(e.horizon_weeks), load
                )
            k = therapies.index(e.therapy)
            reader.activity.append(float(ev.p_active[k]))
            reader.count.append(float(ev.expected_count[k]))
            reader.counterfactual.append([float(v) for v in ev.expected_count])
    # References from weakest to strongest information, after the forecasters.
    order = ["diffusion", "unet_baseline", "base_rate", "image_evidence", "image_ceiling"]
    preds = {k: preds[k] for k in order if k in preds}
    oracle = preds["oracle"] = MethodPredictions()
    for row, e in zip(truth["expected"], examples, strict=True):
        mu = dict(zip(therapies, row, strict=True))[e.therapy]
        oracle.activity.append(float(1.0 - np.exp(-mu)))
        oracle.count.append(float(mu))
        oracle.counterfactual.append([float(v) for v in row])
    scores = {
        name: _score(name, p, truth, examples, therapies, figures) for name, p in preds.items()
    }
    report: dict[str, Any] = {
        "cohort": str(cohort),
        "n_patients": len(examples),
        "model": {
            "path": str(model_path),
            "sha256": sha256_of(model_path),
            "name": model.config.name,
            "version": model.config.version,
        },
        "sampler": asdict(sampler),
        "diffusion_forecast_seconds_per_patient": diffusion_s / max(1, len(examples)),
        "methods": scores,
        "paired_differences_of_diffusion": paired_differences(preds, truth),
        "therapies": therapies,
        "patients": _patient_records(preds, truth, examples),
    }
    if ceiling_ok:
        sidecars = [e.sidecar for e in examples]
        sweep = {
            f"{th:g}": prelesional_detection_ceiling(sidecars, efficacy, params, th)
            for th in (0.0, 0.25, 0.5, 0.75)
        }
        det = sweep["0.5"]
        scores["image_ceiling"]["lesion_detection"] = {
            "precision": det.precision,
            "recall": det.recall,
            "f1": det.f1,
            "n_truth": det.n_truth,
            "n_pred": det.n_pred,
            "counted_from": "simulator lesion records (patient.json), not masks",
            "f1_by_survival_threshold": {k: d.f1 for k, d in sweep.items()},
        }
    _counterfactual_figure(preds, truth, therapies, figures / "counterfactual_counts.png")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return report


def _counterfactual_figure(
    preds: dict[str, MethodPredictions],
    truth: dict[str, Any],
    therapies: Sequence[str],
    path: Path,
) -> None:
    names = [n for n in preds if preds[n].counterfactual]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        cf = np.asarray(preds[name].counterfactual)
        for i, t in enumerate(therapies):
            ax.scatter(truth["expected"][:, i], cf[:, i], s=6, label=t)
        hi = max(1.0, float(truth["expected"].max()))
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("true expected NET2 count")
        ax.set_ylabel("predicted count")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def summary_table(methods: dict[str, Any]) -> list[str]:
    """Markdown table of the headline metrics, one row per method."""
    lines = [
        "| method | activity AUC | ECE | accuracy | count MAE | count Spearman | Dice (active) "
        "| lesion F1 | ranking agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        cells = [
            name,
            m["activity"]["auc"],
            m["activity"]["ece"],
            m["activity"]["accuracy"],
            m["count"]["mae"],
            m["count"]["spearman"],
            m.get("voxel_dice_active_mean", float("nan")),
            m.get("lesion_detection", {}).get("f1", float("nan")),
            m.get("counterfactual", {}).get("ranking_agreement", float("nan")),
        ]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return lines


_CI_COLUMNS = (
    ("activity_auc", "activity AUC", ("activity", "auc")),
    ("activity_ece", "ECE", ("activity", "ece")),
    ("count_mae", "count MAE", ("count", "mae")),
    ("count_spearman", "count Spearman", ("count", "spearman")),
    ("counterfactual_mae", "counterfactual MAE", ("counterfactual", "count_mae_vs_expected")),
)


def _with_ci(value: Any, ci: Any) -> str:
    if ci is None or any(not np.isfinite(v) for v in ci):
        return _fmt(value)
    return f"{_fmt(value)} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _uncertainty_section(report: dict[str, Any]) -> list[str]:
    """Bootstrap intervals per method and the paired differences of the diffusion model."""
    methods = report["methods"]
    if not all("ci95" in m for m in methods.values()):
        return []  # a report written before the intervals existed
    lines = [
        "",
        f"## Uncertainty: 95 % bootstrap intervals over the {report['n_patients']} patients",
        "",
        "| method | " + " | ".join(label for _, label, _ in _CI_COLUMNS) + " |",
        "|---|" + "---|" * len(_CI_COLUMNS),
    ]
    for name, m in methods.items():
        cells = []
        for key, _, (group, field_) in _CI_COLUMNS:
            value = m.get(group, {}).get(field_, float("nan"))
            cells.append(_with_ci(value, m["ci95"].get(key)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ECE grows when a resample repeats patients (fewer distinct forecasts per bin), so its "
        "interval can sit above the value itself: read it as the spread, not as a correction.",
    ]
    paired = report.get("paired_differences_of_diffusion", {})
    if paired:
        lines += [
            "",
            "Diffusion model minus each reference on the same patients (paired bootstrap; an "
            "interval that excludes 0 is a difference these patients resolve):",
            "",
            "| reference | " + " | ".join(label for _, label, _ in _CI_COLUMNS) + " |",
            "|---|" + "---|" * len(_CI_COLUMNS),
        ]
        for other, d in paired.items():
            cells = [
                _with_ci(d[key]["difference"], d[key]["ci95"]) if key in d else "n/a"
                for key, _, _ in _CI_COLUMNS
            ]
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    methods = report["methods"]
    lines = [
        "# Held-out evaluation — RESEARCH FORECAST, NOT FOR DIAGNOSTIC USE",
        "",
        f"Cohort `{report['cohort']}` ({report['n_patients']} simulated patients); model "
        f"`{report['model']['name']}` {report['model']['version']} "
        f"(sha256 `{report['model']['sha256'][:16]}…`); sampler {report['sampler']['method']} "
        f"{report['sampler']['steps']} steps × {report['sampler']['samples']} samples.",
        "",
        *summary_table(methods),
    ]
    ceiling = methods.get("image_ceiling")
    if ceiling is not None:
        det = ceiling.get("lesion_detection", {})
        sweep = ", ".join(
            f"{k}: {_fmt(v)}" for k, v in det.get("f1_by_survival_threshold", {}).items()
        )
        lines += [
            "",
            "`image_ceiling` knows perfectly what the simulator puts into the baseline images "
            "(the image-visible activity and the site of every visible pre-lesional change) and "
            "nothing else. Its activity and count forecasts read only the visible activity, not "
            "the pre-lesional sites (each one a future lesion under placebo), so a forecaster "
            "that finds the sites can beat it there; on lesion F1 no image-based forecaster can "
            "beat it on average. `oracle` also knows "
            "the hidden activity and the patient's therapy response. The ceiling's lesion F1 marks "
            "every visible pre-lesional site when its event survives the factual therapy with a "
            f"population probability of at least 0.5 (F1 by that threshold: {sweep}); it is "
            "counted from the simulator's lesion records. For a patient shown with a prior "
            "visit, both image-based references also count the interval's new and enlarging "
            "lesions exactly (they carry the hidden activity too).",
        ]
    if "image_evidence" in methods:
        lines += [
            "",
            "`image_evidence` reads what carries the visible activity into the images: it "
            "counts the young lesions and measures the lesion load exactly, and forecasts with "
            "the simulator's own model from the posterior of the visible activity given them "
            "(no pre-lesional sites). A forecaster that read those two signs perfectly would "
            "reach it; `image_ceiling` reads the visible activity itself, which no image shows "
            "directly.",
        ]
    lines += _uncertainty_section(report)
    lines += ["", "## Average effect against placebo (relative reduction of NET2 count)", ""]
    header = "| therapy | true | " + " | ".join(methods) + " |"
    lines += [header, "|" + "---|" * (len(methods) + 2)]
    some = next(iter(methods.values()))
    true_eff = some.get("counterfactual", {}).get("average_effect_true", {})
    for t in true_eff:
        row = [t, _fmt(true_eff[t]["relative_reduction"])]
        for m in methods.values():
            pe = m.get("counterfactual", {}).get("average_effect_predicted", {}).get(t)
            row.append(_fmt(pe["relative_reduction"]) if pe else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Stratified by factual therapy (diffusion)", ""]
    lines += ["| therapy | n | active share | AUC | count MAE |", "|---|---|---|---|---|"]
    for t, s in methods["diffusion"]["by_factual_therapy"].items():
        lines.append(
            f"| {t} | {s['n']} | {_fmt(s['active_share'])} | {_fmt(s['auc'])} "
            f"| {_fmt(s['count_mae'])} |"
        )
    lines += [
        "",
        "Figures: `figures/reliability_<method>.png`, `figures/counterfactual_counts.png`.",
        "",
    ]
    return "\n".join(lines)
