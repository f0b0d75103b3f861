"""Rate dispersion: the part of a patient's NET2 rate that neither the images nor the interval show.

At one sampler step the trajectory starts from pure noise, which the network all but ignores, so
every sample of a study is drawn from (nearly) the same cell probabilities: the forecast count
is Poisson given the study. The truth is not. Part of each patient's activity is hidden from any
image (in the simulator, ``z_hidden``; in MS, the reason MRI-based predictors stop near an AUC of
0.8), and the interval count before a follow-up study narrows it without removing it. Over
patients who look alike, the count is then Poisson–lognormal: over-dispersed, with more quiet
patients *and* more very active ones than a Poisson of the same mean. A Poisson forecast with the
right mean therefore over-states the probability of activity of patients who look active, and
the forecast count distribution is too narrow.

The dispersion head gives each sample its own log-rate shift ``s·ε − s²/2`` (``ε ~ N(0, 1)``),
added to every cell logit of that sample: the samples then spread over the plausible rates, so
the share of samples with a lesion is the Poisson–lognormal probability of activity, and the
count interval widens. The ``− s²/2`` keeps the expected count where the head put it (exactly so
while cell probabilities are small, as lesion centres are). ``s`` is fitted by maximum
likelihood on training studies (Gauss–Hermite quadrature over ε), separately for studies with a
prior visit and first visits, because the interval count removes part of the hidden spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy import optimize, special
from tqdm import tqdm

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.anchoring import factual_cell_logits
from ms_forecast_node.forecast.data import Example, hide_prior, with_prior_visit
from ms_forecast_node.forecast.model import NET2Forecaster, log_rate_shift

QUADRATURE_NODES = 24
MAX_RATE_SD = 3.0


def _nodes() -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Hermite nodes and weights for E[f(ε)], ε ~ N(0, 1)."""
    x, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
    return x, w / w.sum()


def mixture_log_likelihood(logits: np.ndarray, counts: np.ndarray, sd: float) -> float:
    """Poisson–lognormal log-likelihood of ``counts`` (one per row of cell ``logits``): the
    count is Poisson with mean ``Σ sigmoid(logit + sd·ε − sd²/2)``, ε ~ N(0, 1)."""
    x, w = _nodes()
    shift = log_rate_shift(sd, x)  # (Q,)
    # (N, Q) expected counts; the cells are summed one node at a time to bound memory.
    expected = np.stack([special.expit(logits + s).sum(axis=1) for s in shift], axis=1).clip(
        1e-12, None
    )
    log_poisson = (
        counts[:, None] * np.log(expected) - expected - special.gammaln(counts + 1)[:, None]
    )
    return float(special.logsumexp(log_poisson, axis=1, b=w[None, :]).sum())


def fit_rate_sd(logits: np.ndarray, counts: np.ndarray) -> tuple[float, float, float]:
    """Maximum-likelihood dispersion ``sd`` (0 … :data:`MAX_RATE_SD`) for rows of cell
    ``logits`` (head included) and realised ``counts``, with the log-likelihoods at ``sd = 0``
    (the Poisson forecast) and at the fit."""
    if len(counts) < 10:
        raise ConfigurationError("fitting the rate dispersion needs at least 10 studies")
    logits = np.asarray(logits, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    result = optimize.minimize_scalar(
        lambda sd: -mixture_log_likelihood(logits, counts, sd),
        bounds=(0.0, MAX_RATE_SD),
        method="bounded",
        options={"xatol": 1e-4},
    )
    if not result.success:
        raise ConfigurationError(f"rate dispersion fit did not converge: {result.message}")
    sd = float(result.x)
    before = mixture_log_likelihood(logits, counts, 0.0)
    return sd, before, -float(result.fun)


def activity_probability(logits: np.ndarray, sd: float) -> np.ndarray:
    """P(at least one lesion) per row of cell ``logits`` under the dispersion ``sd`` (cells
    independent given the shift, as the sampler draws them)."""
    x, w = _nodes()
    quiet = np.stack(
        [np.log1p(-special.expit(logits + s)).sum(axis=1) for s in log_rate_shift(sd, x)],
        axis=1,
    )
    return np.asarray(1.0 - (np.exp(quiet) * w[None, :]).sum(axis=1))


@dataclass(frozen=True)
class DispersionFit:
    """The fitted log-rate sds and what they change, for the model's metadata and card."""

    n_studies: int
    sd_first_visit: float
    sd_prior_visit: float
    log_likelihood_first_before: float  # Poisson (sd = 0) log-likelihood, first visits
    log_likelihood_first_after: float
    log_likelihood_prior_before: float
    log_likelihood_prior_after: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fit_dispersion(
    model: NET2Forecaster,
    examples: Sequence[Example],
    version: str,
    samples: int = 2,
    seed: int = 0,
) -> tuple[NET2Forecaster, DispersionFit]:
    """A copy of ``model`` (named ``version``) with the log-rate sds fitted on the factual
    counts of the ``examples`` that have a prior visit: once as they are (with the model's
    prior-activity head, if it has one) and once with the prior visit hidden (first visits)."""
    if model.decoder is None:
        raise ConfigurationError("rate dispersion needs a lesion-centre model")
    with_prior = with_prior_visit(examples)
    if len(with_prior) < 10:
        raise ConfigurationError("fitting the rate dispersion needs 10 studies with a prior visit")
    counts = np.array([float(e.sidecar["truth"]["net2_count"][e.therapy]) for e in with_prior])
    prior_logits, first_logits = [], []
    for e in tqdm(with_prior, desc="dispersion: first-step forecasts", unit="study"):
        prior_logits.append(factual_cell_logits(model, e, samples, seed))
        first_logits.append(factual_cell_logits(model, hide_prior(e), samples, seed))
    sd_prior, prior_before, prior_after = fit_rate_sd(np.stack(prior_logits), counts)
    sd_first, first_before, first_after = fit_rate_sd(np.stack(first_logits), counts)
    dispersed = NET2Forecaster(replace(model.config, version=version, rate_dispersion=True))
    missing, unexpected = dispersed.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("rate_sd")]:
        raise ConfigurationError(f"unexpected weights: {unexpected} / {missing}")
    assert dispersed.denoiser.rate_sd is not None
    with torch.no_grad():
        dispersed.denoiser.rate_sd.copy_(torch.tensor([sd_first, sd_prior]))
    dispersed.eval()
    dispersed.to(next(model.parameters()).device)
    fit = DispersionFit(
        n_studies=len(with_prior),
        sd_first_visit=sd_first,
        sd_prior_visit=sd_prior,
        log_likelihood_first_before=first_before,
        log_likelihood_first_after=first_after,
        log_likelihood_prior_before=prior_before,
        log_likelihood_prior_after=prior_after,
    )
    return dispersed, fit


__all__ = [
    "MAX_RATE_SD",
    "DispersionFit",
    "activity_probability",
    "fit_dispersion",
    "fit_rate_sd",
    "mixture_log_likelihood",
]
