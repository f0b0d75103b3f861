"""Which form should the prior-activity head take? Fit on training studies, score on others.

The shipped head (0.6.2) adds ``a + b·log((n + 0.5) / (w / 48))`` to every cell logit, where
``n`` counts the new and enlarging lesions since the prior visit over ``w`` weeks. Its held-out
reliability diagram shows patients without interval lesions forecast too quiet. This probe
fits that form and one with a fitted pseudo-count ``c`` in place of 0.5 (a gamma–Poisson
posterior of the rate has this shape) by Poisson maximum likelihood on the first
``--fit`` studies of a training cohort, on the frozen base network's first-step cell logits
under the factual therapy, and scores both on the next ``--validate`` studies (never the
held-out cohort): log-likelihood of the realised counts, the ECE of the probability of activity,
and the mean probability of activity against the observed share, for patients with and without
interval lesions. A third row adds the rate dispersion (forecast/rate_dispersion.py) fitted after
the pseudo-count head: its likelihood is Poisson–lognormal, the others' Poisson (all include
log y!, so they compare). The reference is the base network without a head, in the same run.

    .venv/bin/python benchmarks/prior_head_forms.py \
        --model var/runs/anchored-0.6.1/model.safetensors \
        --cohort var/cohorts/train-s1000-prior [--fit 300 --validate 200] [--out FILE.json] \
        [--cache FILE.npz]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ms_forecast_node.forecast.anchoring import factual_cell_logits
from ms_forecast_node.forecast.checkpoint import load_model
from ms_forecast_node.forecast.config import INTERVAL_FLAG, PRIOR_ACTIVITY_FLAG
from ms_forecast_node.forecast.data import load_examples, with_prior_visit
from ms_forecast_node.forecast.metrics import expected_calibration_error
from ms_forecast_node.forecast.prior_head import fit_head, fit_head_pseudocount
from ms_forecast_node.forecast.rate_dispersion import (
    activity_probability,
    fit_rate_sd,
    mixture_log_likelihood,
)


def probabilities(logits: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(logits + shift[:, None])))


def first_step_forecasts(
    model_path: Path, cohort: Path, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cell logits under the factual therapy, interval events, interval length (w / 48) and
    realised counts of the cohort's first ``limit`` studies that have a prior visit."""
    model = load_model(model_path)
    examples = load_examples(cohort, model.config, limit=limit)
    examples = with_prior_visit(examples)
    logits, n, w48, counts = [], [], [], []
    for e in tqdm(examples, desc="first-step forecasts", unit="study"):
        logits.append(factual_cell_logits(model, e, 2, 0))
        w = float(e.study.flags[INTERVAL_FLAG])
        # The feature is log((n + 0.5) / w): the interval count comes back exactly.
        n.append(round(float(np.exp(e.study.flags[PRIOR_ACTIVITY_FLAG])) * w - 0.5))
        w48.append(w)
        counts.append(float(e.sidecar["truth"]["net2_count"][e.therapy]))
    return np.stack(logits), np.array(n), np.array(w48), np.array(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the base, without a head")
    parser.add_argument("--cohort", type=Path, required=True, help="a training cohort")
    parser.add_argument("--fit", type=int, default=300)
    parser.add_argument("--validate", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="npz of the first-step forecasts: read when it exists, else written (the network "
        "passes are most of the run; the fits take seconds)",
    )
    args = parser.parse_args()
    if args.cache is not None and args.cache.exists():
        cached = np.load(args.cache)
        cells, events, weeks, y = (cached[k] for k in ("cells", "events", "weeks", "counts"))
    else:
        cells, events, weeks, y = first_step_forecasts(
            args.model, args.cohort, args.fit + args.validate
        )
        if args.cache is not None:
            np.savez_compressed(args.cache, cells=cells, events=events, weeks=weeks, counts=y)
    fit, val = slice(0, args.fit), slice(args.fit, len(y))
    quiet = events[val] == 0
    active = y[val] > 0

    def summary(shift: np.ndarray, sd: float = 0.0) -> dict[str, float]:
        p = probabilities(cells[val], shift)
        shifted = cells[val] + shift[:, None]
        activity = activity_probability(shifted, sd)
        return {
            # Poisson–lognormal; at sd = 0 the Poisson log-likelihood with its log(y!) term.
            "validation_log_likelihood": round(mixture_log_likelihood(shifted, y[val], sd), 2),
            "validation_activity_ece": round(expected_calibration_error(activity, active), 3),
            "count_no_interval_lesion_predicted": round(float(p[quiet].sum(axis=1).mean()), 3),
            "count_no_interval_lesion_observed": round(float(y[val][quiet].mean()), 3),
            "activity_no_interval_lesion_predicted": round(float(activity[quiet].mean()), 3),
            "activity_no_interval_lesion_observed": round(float(active[quiet].mean()), 3),
            "activity_with_interval_lesions_predicted": round(float(activity[~quiet].mean()), 3),
            "activity_with_interval_lesions_observed": round(float(active[~quiet].mean()), 3),
        }

    report: dict[str, object] = {
        "fit_studies": args.fit,
        "validation_studies": len(y) - args.fit,
        "validation_without_interval_lesions": int(quiet.sum()),
        "no head (reference)": summary(np.zeros(len(y) - args.fit)),
    }
    # The package's own fits, so the probe scores exactly what fit-prior-head would ship.
    a, b, _, _ = fit_head(cells[fit], np.log((events[fit] + 0.5) / weeks[fit]), y[fit])
    pa, pb, pc, _, _ = fit_head_pseudocount(cells[fit], events[fit], weeks[fit], y[fit])

    def shift(a: float, b: float, c: float, rows: slice) -> np.ndarray:
        return np.asarray(a + b * np.log((events[rows] + c) / weeks[rows]))

    # The pseudo-count head with the rate dispersion fitted on the same studies after it.
    sd, _, _ = fit_rate_sd(cells[fit] + shift(pa, pb, pc, fit)[:, None], y[fit])
    fitted = {
        "shipped: a + b·log((n + 0.5)/w)": (a, b, 0.5, 0.0),
        "pseudo-count: a + b·log((n + c)/w)": (pa, pb, pc, 0.0),
        "pseudo-count + rate dispersion s": (pa, pb, pc, sd),
    }
    for name, (a_, b_, c_, sd_) in fitted.items():
        fit_ll = mixture_log_likelihood(cells[fit] + shift(a_, b_, c_, fit)[:, None], y[fit], sd_)
        row: dict[str, object] = {
            "a, b, c, s": [round(float(v), 3) for v in (a_, b_, c_, sd_)],
            "fit_log_likelihood": round(fit_ll, 2),
        }
        row.update(summary(shift(a_, b_, c_, val), sd_))
        report[name] = row
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
