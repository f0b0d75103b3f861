"""What any image-based forecaster could reach at best on a simulated cohort.

The oracle of :mod:`ms_forecast_node.forecast.evaluate` knows each patient's true NET2 rate,
including the part of it that no image shows. This module gives the tighter reference for a
forecaster that only sees the baseline study: the **image ceiling**. It knows, perfectly,
everything the simulator puts into the baseline images and nothing else:

* the image-visible activity ``z_visible`` (it drives the number of young lesions and part of
  the lesion load, see :mod:`ms_forecast_node.simulate.activity`), but not ``z_hidden`` nor the
  patient's therapy responsiveness, over which it averages exactly;
* the site of every future new lesion whose pre-lesional change shows at baseline, but not
  which of those events will happen under a therapy (the simulator thins the placebo world's
  events with a uniform draw per event) nor which old lesion will enlarge.

Its activity AUC, count Spearman and lesion F1 bound what the forecaster can reach; the issue's
targets are stated against the full oracle, so the report shows both.

The image ceiling reads ``z_visible`` itself, which no image shows directly. The **evidence
reference** (:func:`evidence_forecast`) reads instead what carries it into the images: the
number of young lesions (Poisson with mean ``exp(0.2 + 0.8·z_visible)``) and the lesion load
(log-normal, half of its log-variance from ``z_visible``), both exactly, and forecasts with the
simulator's own model from the posterior of ``z_visible`` given them. A forecaster that counts
young lesions and measures the load perfectly can reach it; the pre-lesional sites it leaves
out are barely visible at 2 mm (``benchmarks/prelesional_signal.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ms_forecast_node.forecast.metrics import LesionDetection
from ms_forecast_node.simulate.activity import REFERENCE_HORIZON_WEEKS, ActivityParameters

# Monte Carlo draws of (z_hidden, responsiveness); fixed so the reference is reproducible.
_DRAWS = 20000
_SEED = 20250811


def _hidden_draws(params: ActivityParameters) -> tuple[np.ndarray, np.ndarray]:
    """The fixed draws of ``z_hidden`` and the responsiveness ``m`` that the image-based
    references average over."""
    rng = np.random.default_rng(_SEED)
    z_h = rng.standard_normal(_DRAWS)
    return z_h, np.exp(rng.normal(0.0, params.response_sd, _DRAWS))


@dataclass(frozen=True)
class VisibleForecast:
    """Per therapy (in the order given): P(at least one NET2 lesion) and the expected count."""

    p_active: np.ndarray
    expected_count: np.ndarray


def activity_parameters(cohort_header: dict[str, Any]) -> ActivityParameters:
    """The latent-activity parameters a cohort was simulated with (defaults when absent)."""
    raw = cohort_header.get("config", {}).get("activity", {})
    known = ActivityParameters.__dataclass_fields__
    return ActivityParameters(**{k: float(v) for k, v in raw.items() if k in known})


def visible_information_forecast(
    z_visible: float,
    efficacies: Sequence[float],
    horizon_weeks: float,
    params: ActivityParameters,
) -> VisibleForecast:
    """Exact (Monte Carlo) forecast given ``z_visible``, averaging over the hidden activity
    and the responsiveness with the simulator's own distributions.

    The rate under therapy *k* is ``exp(a + v·z_v + h·z_h) · (1 − e_k)^m · horizon / 48`` and the
    count is Poisson given the rate, so ``P(active) = E[1 − exp(−rate)]``.
    """
    z_h, m = _hidden_draws(params)
    base = np.exp(params.log_rate_mean + params.visible_sd * z_visible + params.hidden_sd * z_h)
    keep = (1.0 - np.asarray(efficacies, dtype=float))[:, None] ** m[None, :]
    rate = base[None, :] * keep * (horizon_weeks / REFERENCE_HORIZON_WEEKS)
    return VisibleForecast(
        p_active=np.mean(1.0 - np.exp(-rate), axis=1), expected_count=np.mean(rate, axis=1)
    )


# How the simulator writes z_visible into the baseline (simulate/patient.py, config.py).
YOUNG_LOG_MEAN, YOUNG_SLOPE, YOUNG_CAP = 0.2, 0.8, 15
_Z_GRID = np.linspace(-5.0, 5.0, 401)


@dataclass(frozen=True)
class LoadModel:
    """Lesion load: ``log load = log(median) + log_sd · (0.5·z_visible + sqrt(0.75)·ε)``."""

    median_ml: float = 4.0
    log_sd: float = 0.9

    @classmethod
    def from_header(cls, cohort_header: dict[str, Any]) -> LoadModel:
        raw = cohort_header.get("config", {})
        return cls(
            float(raw.get("lesion_load_median_ml", cls.median_ml)),
            float(raw.get("lesion_load_log_sd", cls.log_sd)),
        )


def z_visible_posterior(young_count: int, load_ml: float, load: LoadModel) -> np.ndarray:
    """Posterior weights of ``z_visible`` on :data:`_Z_GRID` given the baseline's number of
    young lesions (capped at 15 by the simulator) and its lesion load (a standard normal
    prior)."""
    z = _Z_GRID
    log_mu = YOUNG_LOG_MEAN + YOUNG_SLOPE * z
    mu = np.exp(log_mu)
    n = min(int(young_count), YOUNG_CAP)
    if n < YOUNG_CAP:
        log_like = n * log_mu - mu - float(np.sum(np.log(np.arange(1, n + 1))))
    else:  # the cap: P(N ≥ 15)
        from scipy import stats

        log_like = np.log(np.clip(stats.poisson.sf(YOUNG_CAP - 1, mu), 1e-300, None))
    resid = np.log(max(load_ml, 1e-3)) - np.log(load.median_ml) - load.log_sd * 0.5 * z
    log_like = log_like - 0.5 * (resid / (load.log_sd * np.sqrt(0.75))) ** 2
    log_post = log_like - 0.5 * z**2
    w = np.exp(log_post - log_post.max())
    return w / w.sum()


@dataclass(frozen=True)
class EvidenceModel:
    """P(active) and expected counts per therapy on :data:`_Z_GRID`, computed once per cohort."""

    p_active: np.ndarray  # (therapies, grid)
    expected_count: np.ndarray

    @classmethod
    def build(
        cls, efficacies: Sequence[float], horizon_weeks: float, params: ActivityParameters
    ) -> EvidenceModel:
        z_h, m = _hidden_draws(params)
        keep = (1.0 - np.asarray(efficacies, dtype=float))[:, None] ** m[None, :]
        per_draw = np.exp(params.log_rate_mean + params.hidden_sd * z_h)[None, :] * keep
        scale = np.exp(params.visible_sd * _Z_GRID) * horizon_weeks / REFERENCE_HORIZON_WEEKS
        p = np.empty((len(efficacies), len(_Z_GRID)))
        for k in range(len(efficacies)):
            rate = per_draw[k][None, :] * scale[:, None]  # (grid, draws)
            p[k] = np.mean(-np.expm1(-rate), axis=1)
        expected = per_draw.mean(axis=1)[:, None] * scale[None, :]
        return cls(p, expected)

    def forecast(self, weights: np.ndarray) -> VisibleForecast:
        return VisibleForecast(self.p_active @ weights, self.expected_count @ weights)


def evidence_forecast(
    young_count: int, load_ml: float, model: EvidenceModel, load: LoadModel | None = None
) -> VisibleForecast:
    """The forecast of a reader who counts the young lesions and measures the lesion load
    exactly: the simulator's forecast averaged over the posterior of ``z_visible``."""
    return model.forecast(z_visible_posterior(young_count, load_ml, load or LoadModel()))


def event_survival(efficacy: float, params: ActivityParameters) -> float:
    """Population probability that a placebo-world NET2 event still happens under a therapy of
    this efficacy: ``E[(1 − e)^m]`` over the responsiveness ``m``."""
    rng = np.random.default_rng(_SEED)
    m = np.exp(rng.normal(0.0, params.response_sd, _DRAWS))
    return float(np.mean((1.0 - efficacy) ** m))


def prelesional_detection_ceiling(
    sidecars: Sequence[dict[str, Any]],
    efficacy: dict[str, float],
    params: ActivityParameters,
    threshold: float = 0.5,
) -> LesionDetection:
    """Lesion detection (pooled over patients) of the forecaster that marks every visible
    pre-lesional site, under the factual therapy, when the event's population probability of
    happening under that therapy is at least ``threshold`` (the forecast mask's voxel threshold).

    Counts come from the simulator's lesion records (``patient.json``): a marked site is a true
    positive when its event happens under the factual therapy; the truth lesions are the
    factual NET2 count.
    """
    # One survival per therapy (the same draws for every patient).
    marks = {t: event_survival(e, params) >= threshold for t, e in efficacy.items()}
    tp = n_pred = n_truth = 0
    for sidecar in sidecars:
        therapy = str(sidecar["factual_therapy"])
        n_truth += int(sidecar["truth"]["net2_count"][therapy])
        if not marks[therapy]:
            continue
        for lesion in sidecar.get("lesions", []):
            if lesion.get("kind") == "new" and lesion.get("prodrome_visible"):
                n_pred += 1
                tp += therapy in lesion.get("occurs_under", [])
    return LesionDetection(
        tp_truth=tp, fn=n_truth - tp, tp_pred=tp, fp=n_pred - tp, n_truth=n_truth, n_pred=n_pred
    )


# ---------------------------------------------------------------------------------------------
# With a prior visit: the interval's events are a Poisson count of the full placebo rate
# (simulate/patient.py, ``_interval_events``), so they also carry the hidden activity.
# ---------------------------------------------------------------------------------------------

_ZH_GRID = np.linspace(-5.0, 5.0, 201)
_S_GRID = np.linspace(-12.0, 12.0, 4801)  # log-rate deviation from the median placebo rate


@dataclass(frozen=True)
class RateTable:
    """P(active) per therapy as a function of the log-rate deviation ``s = v·z_v + h·z_h``.

    Given ``s`` the placebo rate is ``exp(a + s)``; the therapy keeps ``(1 − e)^m`` of it with
    the patient's unknown responsiveness ``m``, over which the table averages (fixed draws)."""

    p_active: np.ndarray  # (therapies, len(_S_GRID))
    keep_mean: np.ndarray  # (therapies,) E[(1 − e)^m]
    horizon_weeks: float
    params: ActivityParameters

    @classmethod
    def build(
        cls, efficacies: Sequence[float], horizon_weeks: float, params: ActivityParameters
    ) -> RateTable:
        _, m = _hidden_draws(params)
        keep = (1.0 - np.asarray(efficacies, dtype=float))[:, None] ** m[None, :]
        base = np.exp(params.log_rate_mean + _S_GRID) * horizon_weeks / REFERENCE_HORIZON_WEEKS
        # P(active) is smooth in m: 4 000 of the draws keep the table's Monte Carlo error
        # below 0.002 at a fifth of the cost; the mean effect uses them all.
        p = np.stack([np.mean(-np.expm1(-base[:, None] * k[None, :4000]), axis=1) for k in keep])
        return cls(p, keep.mean(axis=1), horizon_weeks, params)

    def forecast(self, s: np.ndarray, weights: np.ndarray) -> VisibleForecast:
        """The forecast averaged over values ``s`` of the log-rate deviation with ``weights``."""
        s, w = s.ravel(), weights.ravel() / weights.sum()
        p = np.array([np.interp(s, _S_GRID, row) @ w for row in self.p_active])
        rate = float(np.exp(self.params.log_rate_mean + s) @ w)
        scale = self.horizon_weeks / REFERENCE_HORIZON_WEEKS
        return VisibleForecast(p, self.keep_mean * rate * scale)


def _interval_log_likelihood(
    s: np.ndarray, interval_events: int, interval_weeks: float, params: ActivityParameters
) -> np.ndarray:
    """log P(interval count | s), Poisson with the untreated rate over the interval."""
    log_mu = params.log_rate_mean + s + np.log(interval_weeks / REFERENCE_HORIZON_WEEKS)
    return interval_events * log_mu - np.exp(log_mu)


def _normalised(log_w: np.ndarray) -> np.ndarray:
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


def ceiling_with_prior(
    z_visible: float, interval_events: int, interval_weeks: float, table: RateTable
) -> VisibleForecast:
    """The image ceiling for a patient with a prior visit: it knows ``z_visible`` and counts
    the interval's events exactly, and averages over the posterior of ``z_hidden``."""
    p = table.params
    s = p.visible_sd * z_visible + p.hidden_sd * _ZH_GRID
    log_w = -0.5 * _ZH_GRID**2 + _interval_log_likelihood(s, interval_events, interval_weeks, p)
    return table.forecast(s, _normalised(log_w))


def evidence_with_prior(
    young_count: int,
    load_ml: float,
    interval_events: int,
    interval_weeks: float,
    table: RateTable,
    load: LoadModel | None = None,
) -> VisibleForecast:
    """The evidence reference for a patient with a prior visit: young lesions, lesion load and
    the interval's events (new and enlarging lesions since the prior visit), all read exactly;
    the forecast averages over the joint posterior of ``z_visible`` and ``z_hidden``."""
    p = table.params
    w_visible = z_visible_posterior(young_count, load_ml, load or LoadModel())
    s = p.visible_sd * _Z_GRID[:, None] + p.hidden_sd * _ZH_GRID[None, :]
    log_w = (
        np.log(np.clip(w_visible, 1e-300, None))[:, None]
        - 0.5 * _ZH_GRID[None, :] ** 2
        + _interval_log_likelihood(s, interval_events, interval_weeks, p)
    )
    return table.forecast(s, _normalised(log_w))


__all__ = [
    "EvidenceModel",
    "LoadModel",
    "RateTable",
    "VisibleForecast",
    "activity_parameters",
    "ceiling_with_prior",
    "event_survival",
    "evidence_forecast",
    "evidence_with_prior",
    "prelesional_detection_ceiling",
    "visible_information_forecast",
    "z_visible_posterior",
]
