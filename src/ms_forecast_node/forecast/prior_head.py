"""Fit the prior-activity head: past activity, counted from the prior visit, moves the log rate.

In MS the best-known predictor of new lesions is recent lesion activity. When a study comes with
a prior visit, the number ``n`` of new and enlarging lesions between the two lesion masks over
``w`` weeks estimates the patient's rate, hidden activity included (which no single image
shows). The network has the prior visit's channels, but learning to count lesions across the
whole brain from a few hundred patients' outcomes is slow (a 468-step fine-tune did not learn
it: docs/forecaster.md). The head is the explicit form: for a study with a prior visit it adds
``a + b·log((n + 0.5) / (w / 48))`` to every cell's logit, after the network's last layer.

``a`` and ``b`` are fitted by maximum likelihood on training studies that have a prior visit:
the realised NET2 count under the factual therapy is Poisson with mean ``Σ sigmoid(logit_c +
a + b·f)`` over the network's first-step cell logits (a Poisson regression stacked on the
frozen network, with its forecast as the offset). Because the shift enters after the last
layer, the fit needs one network pass per study and no other; a study without a prior visit is
forecast exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy import optimize
from tqdm import tqdm

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.anchoring import factual_cell_logits
from ms_forecast_node.forecast.config import INTERVAL_FLAG, PRIOR_ACTIVITY_FLAG
from ms_forecast_node.forecast.data import Example, with_prior_visit
from ms_forecast_node.forecast.model import NET2Forecaster


@dataclass(frozen=True)
class PriorHeadFit:
    """The fitted head and what it changes, for the model's metadata and card."""

    n_studies: int
    intercept: float  # a
    slope: float  # b, per unit of log interval rate
    mean_feature: float
    log_likelihood_before: float  # Poisson log-likelihood of the factual counts, head off
    log_likelihood_after: float
    mean_count_observed: float
    mean_count_before: float
    mean_count_after: float
    pseudocount: float = 0.5  # c of log((n + c) / (w / 48)); fitted with --pseudocount

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _expected(logits: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Expected count per study: rows of cell logits, one shift per study."""
    return (1.0 / (1.0 + np.exp(-(logits + shift[:, None])))).sum(axis=1)


def _log_likelihood(counts: np.ndarray, expected: np.ndarray) -> float:
    lam = np.clip(expected, 1e-12, None)
    return float(np.sum(counts * np.log(lam) - lam))


def fit_head(
    logits: np.ndarray, features: np.ndarray, counts: np.ndarray
) -> tuple[float, float, float, float]:
    """Maximum-likelihood ``(a, b)`` of ``counts ~ Poisson(Σ sigmoid(logits + a + b·f))`` and
    the log-likelihoods before (a = b = 0) and after."""
    if len(counts) < 10:
        raise ConfigurationError("fitting the prior-activity head needs at least 10 studies")
    centre = float(features.mean())

    def loss(theta: np.ndarray) -> float:
        shift = theta[0] + theta[1] * (features - centre)
        return -_log_likelihood(counts, _expected(logits, shift))

    result = optimize.minimize(loss, np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-6})
    if not result.success:
        raise ConfigurationError(f"prior-activity head fit did not converge: {result.message}")
    a_centred, b = (float(v) for v in result.x)
    before = -loss(np.zeros(2))
    # The head's own intercept applies to the raw feature: a = a_centred − b·mean.
    return a_centred - b * centre, b, before, -float(result.fun)


def fit_head_pseudocount(
    logits: np.ndarray, events: np.ndarray, w48: np.ndarray, counts: np.ndarray
) -> tuple[float, float, float, float, float]:
    """Maximum-likelihood ``(a, b, c)`` of ``counts ~ Poisson(Σ sigmoid(logits + a +
    b·log((events + c) / w48)))`` (``c`` > 0, fitted as log c), and the
    log-likelihoods before (no head) and after."""
    if len(counts) < 10:
        raise ConfigurationError("fitting the prior-activity head needs at least 10 studies")

    def shift(theta: np.ndarray) -> np.ndarray:
        return np.asarray(theta[0] + theta[1] * np.log((events + np.exp(theta[2])) / w48))

    def loss(theta: np.ndarray) -> float:
        return -_log_likelihood(counts, _expected(logits, shift(theta)))

    # a, b and c trade off along a flat ridge, and at b = 0 the likelihood does not depend on
    # c at all, so a simplex started there can drift to a huge c. Profile c on a grid with the
    # (a, b) fit first, then polish all three from the best point.
    grid = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    profile = [(fit_head(logits, np.log((events + c) / w48), counts), c) for c in grid]
    (a0, b0, _, _), c0 = max(profile, key=lambda item: item[0][3])
    start = np.array([a0, b0, np.log(c0)])
    options = {"xatol": 1e-6, "maxiter": 4000, "maxfev": 8000}
    result = optimize.minimize(loss, start, method="Nelder-Mead", options=options)
    if not result.success:
        raise ConfigurationError(f"prior-activity head fit did not converge: {result.message}")
    a, b, log_c = (float(v) for v in result.x)
    before = _log_likelihood(counts, _expected(logits, np.zeros(len(counts))))
    return a, b, float(np.exp(log_c)), before, -float(result.fun)


def fit_prior_head(
    model: NET2Forecaster,
    examples: Sequence[Example],
    version: str,
    samples: int = 2,
    seed: int = 0,
    pseudocount: bool = False,
) -> tuple[NET2Forecaster, PriorHeadFit]:
    """A copy of ``model`` (named ``version``) with the prior-activity head fitted on the
    ``examples`` that have a prior visit (their factual therapy and realised NET2 count);
    ``pseudocount`` fits the head's ``c`` as well (``ModelConfig.prior_activity_pseudocount``)."""
    if model.denoiser.therapy_offset is None or model.decoder is None:
        raise ConfigurationError(
            "the prior-activity head needs a lesion-centre model with rate offsets"
        )
    with_prior = with_prior_visit(examples)
    if not with_prior:
        raise ConfigurationError("no study with a prior visit to fit the head on")
    head = NET2Forecaster(
        replace(
            model.config,
            version=version,
            prior_activity_head=True,
            prior_activity_pseudocount=pseudocount,
        )
    )
    missing, unexpected = head.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("prior_activity")]:
        raise ConfigurationError(f"unexpected weights: {unexpected} / {missing}")
    head.eval()
    head.to(next(model.parameters()).device)
    logits, features, w48, counts = [], [], [], []
    for e in tqdm(with_prior, desc="prior head: first-step forecasts", unit="study"):
        logits.append(factual_cell_logits(model, e, samples, seed))
        features.append(float(e.study.flags[PRIOR_ACTIVITY_FLAG]))
        w48.append(float(e.study.flags[INTERVAL_FLAG]))
        counts.append(float(e.sidecar["truth"]["net2_count"][e.therapy]))
    cell_logits = np.stack(logits)
    f, w, y = np.asarray(features), np.asarray(w48), np.asarray(counts)
    c = 0.5
    if pseudocount:
        # The feature is log((n + 0.5) / w48): the interval count comes back exactly.
        events = np.maximum(np.round(np.exp(f) * w - 0.5), 0.0)
        a, b, c, before, after = fit_head_pseudocount(cell_logits, events, w, y)
        parameters = [a, b, float(np.log(c))]
        f = np.log((events + c) / w)  # the feature the fitted head reads
    else:
        a, b, before, after = fit_head(cell_logits, f, y)
        parameters = [a, b]
    assert head.denoiser.prior_activity is not None
    with torch.no_grad():
        head.denoiser.prior_activity.copy_(torch.tensor(parameters))
    fit = PriorHeadFit(
        n_studies=len(with_prior),
        intercept=a,
        slope=b,
        mean_feature=float(f.mean()),
        log_likelihood_before=before,
        log_likelihood_after=after,
        mean_count_observed=float(y.mean()),
        mean_count_before=float(_expected(cell_logits, np.zeros(len(y))).mean()),
        mean_count_after=float(_expected(cell_logits, a + b * f).mean()),
        pseudocount=c,
    )
    return head, fit


__all__ = ["PriorHeadFit", "fit_head", "fit_head_pseudocount", "fit_prior_head"]
