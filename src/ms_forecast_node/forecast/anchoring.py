"""Anchor each therapy's average effect to the rate ratio its pivotal trial reports.

A model trained on one factual therapy per patient learns every therapy's effect from the
patients who received it: about 70 per arm in a 500-patient cohort, and a handful of NET2
events in the strong arms. The trials behind ``therapies.yaml`` measured those average
effects on hundreds of patients each. This module keeps the network's individual forecast (the
patient's own level of risk, and how the effect varies between patients through the FiLM
therapy embedding) and moves only each therapy's scalar rate offset, so that the model's
average forecast count under the therapy, over a set of studies, is the trial's rate ratio
times its average placebo forecast. This is the risk-based approach to treatment-effect
heterogeneity (Kent et al., PATH statement, Ann Intern Med 2020): individual baseline risk from
a model, relative effect from the trials.

Only images are read: no outcome of the anchoring studies enters, so they may be training
studies. The offsets enter the network after its last layer (``Denoiser.forward``), so a shift
of the offset is a shift of every cell's logit and the new expected counts are computed exactly
from the stored first-step probabilities, without another network pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.data import Example
from ms_forecast_node.forecast.model import LesionDecoder, NET2Forecaster
from ms_forecast_node.forecast.sampling import sample_masks
from ms_forecast_node.simulate.therapies import Therapy

PLACEBO = "placebo"


@dataclass(frozen=True)
class AnchoringResult:
    """What the anchoring changed, for the model's metadata and card."""

    n_studies: int
    placebo_expected_count: float  # mean expected NET2 lesions under placebo (unchanged)
    trial_rate_ratio: dict[str, float]  # 1 − trial reduction of NET2 lesions
    rate_ratio_before: dict[str, float]  # the model's mean count ratio against placebo
    rate_ratio_after: dict[str, float]
    offset_shift: dict[str, float]  # added to each therapy's logit offset

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def first_step_cell_probabilities(
    model: NET2Forecaster,
    example: Example,
    therapies: Sequence[str],
    samples: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """(n_therapies, n_cells) lesion-centre probabilities at the first (pure-noise) sampling
    step, averaged over ``samples`` draws of the starting noise: the expected lesion count under
    each therapy is the row sum, and it is what the one-step sampler draws from."""
    probe = replace(SamplerConfig(), method="ancestral", steps=1, samples=samples, seed=seed)
    density = np.zeros((len(therapies), *example.study.images.shape[1:]), dtype=np.float32)
    sample_masks(
        model, example.study, therapies, example.horizon_weeks, probe, marginal_out=density
    )
    c = LesionDecoder.CELL
    n_t, d, h, w = density.shape
    cells = density[:, : d // c * c, : h // c * c, : w // c * c]
    cells = cells.reshape(n_t, d // c, c, h // c, c, w // c, c).sum(axis=(2, 4, 6))
    return cells.reshape(n_t, -1).astype(np.float64)


def factual_cell_logits(
    model: NET2Forecaster, example: Example, samples: int = 2, seed: int = 0
) -> np.ndarray:
    """(n_cells,) first-step logits under the example's factual therapy (probabilities clipped
    away from 0 and 1): the per-study input of the head and dispersion fits."""
    p = first_step_cell_probabilities(model, example, [example.therapy], samples, seed)[0]
    p = np.clip(p, 1e-12, 1.0 - 1e-7)
    return np.asarray(np.log(p) - np.log1p(-p))


def _mean_count(logits: np.ndarray, shift: float) -> float:
    """Mean over studies of the expected count after adding ``shift`` to every logit."""
    return float((1.0 / (1.0 + np.exp(-(logits + shift)))).sum(axis=1).mean())


def solve_shift(logits: np.ndarray, target_mean_count: float, tol: float = 1e-9) -> float:
    """The logit shift that makes the mean expected count (rows: studies, columns: cells)
    equal ``target_mean_count``; bisection, as the count is increasing in the shift."""
    if target_mean_count <= 0:
        raise ConfigurationError("an anchoring target must be a positive expected count")
    lo, hi = -20.0, 20.0
    if not _mean_count(logits, lo) <= target_mean_count <= _mean_count(logits, hi):
        raise ConfigurationError(
            f"no logit shift within ±20 reaches a mean expected count of {target_mean_count:.4g}"
        )
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if _mean_count(logits, mid) < target_mean_count:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def anchor_to_trials(
    model: NET2Forecaster,
    examples: Sequence[Example],
    therapies: Sequence[Therapy],
    version: str,
    samples: int = 2,
    seed: int = 0,
) -> tuple[NET2Forecaster, AnchoringResult]:
    """A copy of ``model`` (named ``version``) whose therapy offsets give each therapy's trial
    rate ratio against placebo on average over ``examples``; placebo is left as trained."""
    if model.denoiser.therapy_offset is None or model.decoder is None:
        raise ConfigurationError(
            "anchoring needs a lesion-centre model with per-therapy rate offsets "
            "(model.diffusion_target: centres, model.rate_offsets: true)"
        )
    if not examples:
        raise ConfigurationError("anchoring needs at least one study")
    codes = list(model.config.therapies)
    trial = {t.code: 1.0 - t.efficacy_net2 for t in therapies if t.code in codes}
    if PLACEBO not in codes or set(trial) != set(codes):
        missing = sorted(set(codes) - set(trial))
        raise ConfigurationError(f"no trial effect for the model's therapies {missing}")
    probabilities = np.stack(
        [
            first_step_cell_probabilities(model, e, codes, samples, seed)
            for e in tqdm(examples, desc="anchoring: first-step forecasts", unit="study")
        ]
    )  # (studies, therapies, cells)
    p = np.clip(probabilities, 1e-12, 1.0 - 1e-7)
    logits = np.log(p) - np.log1p(-p)
    means = probabilities.sum(axis=2).mean(axis=0)
    placebo_mean = float(means[codes.index(PLACEBO)])
    shift: dict[str, float] = {}
    after: dict[str, float] = {}
    for k, code in enumerate(codes):
        if code == PLACEBO:
            shift[code], after[code] = 0.0, 1.0
            continue
        shift[code] = solve_shift(logits[:, k], trial[code] * placebo_mean)
        after[code] = _mean_count(logits[:, k], shift[code]) / placebo_mean
    anchored = NET2Forecaster(replace(model.config, version=version))
    anchored.load_state_dict(model.state_dict())
    anchored.eval()
    assert anchored.denoiser.therapy_offset is not None
    with torch.no_grad():
        weight = anchored.denoiser.therapy_offset.weight
        for k, code in enumerate(codes):
            weight[k, 0] += shift[code]
    result = AnchoringResult(
        n_studies=len(examples),
        placebo_expected_count=placebo_mean,
        trial_rate_ratio=trial,
        rate_ratio_before={c: float(means[k] / placebo_mean) for k, c in enumerate(codes)},
        rate_ratio_after=after,
        offset_shift=shift,
    )
    if not all(math.isfinite(v) for v in shift.values()):
        raise ConfigurationError(f"anchoring produced non-finite offsets: {shift}")
    return anchored.to(next(model.parameters()).device), result


__all__ = [
    "AnchoringResult",
    "anchor_to_trials",
    "factual_cell_logits",
    "first_step_cell_probabilities",
    "solve_shift",
]
