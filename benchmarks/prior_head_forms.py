"""Which form should the prior-activity head take? Fit on training studies, score on others.

The shipped head (0.6.2) adds ``a + b·log((n + 0.5) / (w / 48))`` to every cell logit, where
``n`` counts the new and enlarging lesions since the prior visit over ``w`` weeks. Its held-out
reliability diagram shows patients without interval lesions forecast too quiet. This probe
fits that form and one with a fitted pseudo-count ``c`` in place of 0.5 (a gamma–Poisson
posterior of the rate has this shape) by Poisson maximum likelihood on the first
``--fit`` studies of a training cohort, on the frozen base network's first-step cell logits
under the factual therapy, and scores both on the next ``--validate`` studies (never the
held-out cohort): Poisson log-likelihood of the realised counts, and the mean probability of
activity against the observed share, for patients with and without interval lesions. The
reference is the base network without a head, in the same run.

    .venv/bin/python benchmarks/prior_head_forms.py \
        --model var/runs/anchored-0.6.1/model.safetensors \
        --cohort var/cohorts/train-s1000-prior [--fit 300 --validate 200] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ms_forecast_node.forecast.anchoring import first_step_cell_probabilities
from ms_forecast_node.forecast.checkpoint import load_model
from ms_forecast_node.forecast.config import INTERVAL_FLAG, PRIOR_ACTIVITY_FLAG, PRIOR_FLAG
from ms_forecast_node.forecast.data import load_examples
from ms_forecast_node.forecast.prior_head import fit_head, fit_head_pseudocount


def probabilities(logits: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(logits + shift[:, None])))


def log_likelihood(counts: np.ndarray, expected: np.ndarray) -> float:
    lam = np.clip(expected, 1e-12, None)
    return float(np.sum(counts * np.log(lam) - lam))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the base, without a head")
    parser.add_argument("--cohort", type=Path, required=True, help="a training cohort")
    parser.add_argument("--fit", type=int, default=300)
    parser.add_argument("--validate", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model)
    examples = load_examples(args.cohort, model.config, limit=args.fit + args.validate)
    examples = [e for e in examples if e.study.flags[PRIOR_FLAG]]
    logits, n, w48, counts = [], [], [], []
    for e in tqdm(examples, desc="first-step forecasts", unit="study"):
        p = np.clip(first_step_cell_probabilities(model, e, [e.therapy], 2, 0)[0], 1e-12, 1 - 1e-7)
        logits.append(np.log(p) - np.log1p(-p))
        w = float(e.study.flags[INTERVAL_FLAG])
        # The feature is log((n + 0.5) / w): the interval count comes back exactly.
        n.append(round(float(np.exp(e.study.flags[PRIOR_ACTIVITY_FLAG])) * w - 0.5))
        w48.append(w)
        counts.append(float(e.sidecar["truth"]["net2_count"][e.therapy]))
    cells, events, weeks, y = np.stack(logits), np.array(n), np.array(w48), np.array(counts)
    fit, val = slice(0, args.fit), slice(args.fit, len(y))
    quiet = events[val] == 0
    active = y[val] > 0

    def summary(shift: np.ndarray) -> dict[str, float]:
        p = probabilities(cells[val], shift)
        activity = 1.0 - np.exp(np.log1p(-p).sum(axis=1))
        return {
            "validation_log_likelihood": round(log_likelihood(y[val], p.sum(axis=1)), 2),
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
    a, b, _, shipped_ll = fit_head(cells[fit], np.log((events[fit] + 0.5) / weeks[fit]), y[fit])
    pa, pb, pc, _, pseudo_ll = fit_head_pseudocount(cells[fit], events[fit], weeks[fit], y[fit])
    fitted = {
        "shipped: a + b·log((n + 0.5)/w)": ([a, b], shipped_ll, 0.5),
        "pseudo-count: a + b·log((n + c)/w)": ([pa, pb, pc], pseudo_ll, pc),
    }
    for name, (parameters, fit_ll, c) in fitted.items():
        row: dict[str, object] = {
            "parameters": [round(float(v), 3) for v in parameters],
            "fit_log_likelihood": round(fit_ll, 2),
        }
        row.update(summary(parameters[0] + parameters[1] * np.log((events[val] + c) / weeks[val])))
        report[name] = row
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
