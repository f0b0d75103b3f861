"""Rate dispersion: the maximum-likelihood fit, the Poisson–lognormal activity probability, and
the per-sample log-rate shifts in the samplers."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special

from ms_forecast_node.forecast.checkpoint import load_model, save_model
from ms_forecast_node.forecast.config import PRIOR_FLAG, SamplerConfig
from ms_forecast_node.forecast.diffusion import Schedule, ancestral_sample
from ms_forecast_node.forecast.model import NET2Forecaster
from ms_forecast_node.forecast.rate_dispersion import (
    activity_probability,
    fit_rate_sd,
    mixture_log_likelihood,
)
from ms_forecast_node.forecast.sampling import forecast_study, sample_masks
from tests.forecast_cases import CENTRES
from tests.test_forecast_centres import _model, _study


def _cohort(true_sd: float, seed: int, n: int = 300, cells: int = 400) -> tuple[np.ndarray, ...]:
    """Cell logits of ``n`` studies and counts drawn Poisson–lognormal with ``true_sd``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-6.0, 0.5, size=(n, 1)) + rng.normal(0.0, 0.5, size=(n, cells))
    epsilon = rng.standard_normal(n)
    shift = true_sd * epsilon - 0.5 * true_sd**2
    counts = rng.poisson(special.expit(logits + shift[:, None]).sum(axis=1))
    return logits, counts.astype(float)


@pytest.mark.parametrize("true_sd", [0.0, 0.9])
def test_the_fit_recovers_the_dispersion_that_made_the_counts(true_sd: float) -> None:
    logits, counts = _cohort(true_sd, seed=1)
    sd, before, after = fit_rate_sd(logits, counts)
    assert abs(sd - true_sd) < 0.25
    assert after >= before - 1e-6
    if true_sd > 0:
        # Over-dispersed counts: the Poisson forecast (sd = 0) is clearly the worse model.
        assert after - before > 10.0


def test_the_mixture_likelihood_is_the_poisson_one_at_zero_dispersion() -> None:
    logits, counts = _cohort(0.5, seed=2, n=20)
    mean = special.expit(logits).sum(axis=1)
    poisson = float(np.sum(counts * np.log(mean) - mean - special.gammaln(counts + 1)))
    assert mixture_log_likelihood(logits, counts, 0.0) == pytest.approx(poisson, rel=1e-9)


def test_dispersion_lowers_the_activity_of_a_patient_expected_to_be_active() -> None:
    """Same expected count, spread over rates: more patients stay quiet (Jensen), so a Poisson
    forecast over-states the probability of activity."""
    logits = np.full((1, 400), math.log(2.0 / 400))  # about 2 lesions expected
    poisson = activity_probability(logits, 0.0)[0]
    assert poisson == pytest.approx(1.0 - np.prod(1.0 - special.expit(logits)), rel=1e-9)
    assert activity_probability(logits, 1.0)[0] < poisson - 0.1


def test_ancestral_shifts_move_each_draw_and_zero_shifts_change_nothing() -> None:
    schedule = Schedule(1000)
    q = 0.05

    def constant_logit(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, math.log(q / (1 - q)))

    noise = torch.randn((2, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))

    def run(shifts: torch.Tensor | None) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        return ancestral_sample(constant_logit, schedule, noise, 2, gens, 3, shifts=shifts)

    plain = run(None)
    assert torch.equal(plain, run(torch.zeros(2, 3)))
    moved = run(torch.tensor([[0.0, -30.0, 2.0], [0.0, 0.0, 0.0]])) > 0
    assert torch.equal(moved[0], plain[0] > 0)  # draw 0 of row 0: unshifted
    assert not moved[1].any()  # a huge negative shift leaves a draw empty
    assert moved[2].float().mean() > 2.5 * q  # e² times the odds
    with pytest.raises(ValueError, match="shifts"):
        run(torch.zeros(2, 2))


def _dispersed(sd_first: float, sd_prior: float, base_logit: float) -> NET2Forecaster:
    model = _model(base_logit=base_logit)
    dispersed = NET2Forecaster(replace(CENTRES, rate_dispersion=True))
    dispersed.load_state_dict(model.state_dict(), strict=False)
    assert dispersed.denoiser.rate_sd is not None
    with torch.no_grad():
        dispersed.denoiser.rate_sd.copy_(torch.tensor([sd_first, sd_prior]))
    return dispersed.eval()


def test_sampled_counts_spread_over_rates_and_keep_their_mean() -> None:
    """With a log-rate sd the per-sample counts are over-dispersed (variance well above the
    mean) while the mean count stays the Poisson forecast's; the shifts are common random
    numbers, so one therapy twice gives the same samples."""
    study = _study()
    cfg = SamplerConfig(method="ancestral", steps=1, samples=640, seed=4, draws_per_pass=16)
    plain = forecast_study(_model(base_logit=-4.0), study, ["placebo"], 48.0, cfg)
    spread = forecast_study(_dispersed(0.8, 0.0, -4.0), study, ["placebo"], 48.0, cfg)
    a = np.array(plain.therapies["placebo"].sample_counts, dtype=float)
    b = np.array(spread.therapies["placebo"].sample_counts, dtype=float)
    assert a.var() < 1.6 * a.mean()  # Poisson: variance ≈ mean
    assert b.var() > 2.0 * b.mean()
    # Within 3 standard errors; without the −s²/2 the mean would rise by e^0.32 = 1.38×.
    assert abs(b.mean() - a.mean()) < 3.0 * math.sqrt((a.var() + b.var()) / len(a))
    twice, _ = sample_masks(_dispersed(0.8, 0.0, -4.0), study, ["placebo", "placebo"], 48.0, cfg)
    assert np.array_equal(twice[0], twice[1])


def test_the_dispersion_follows_the_prior_visit_and_survives_a_checkpoint(tmp_path: Path) -> None:
    model = _dispersed(0.7, 0.3, -5.0)
    flags = torch.zeros(1, CENTRES.n_flags)
    assert model.denoiser.sample_rate_sd(flags) == pytest.approx(0.7)
    flags[0, PRIOR_FLAG] = 1.0
    assert model.denoiser.sample_rate_sd(flags) == pytest.approx(0.3)
    save_model(model, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors")
    assert back.denoiser.rate_sd is not None
    assert torch.equal(back.denoiser.rate_sd, model.denoiser.rate_sd)
    # A model without dispersion samples exactly as before the feature existed.
    assert _model().denoiser.sample_rate_sd(flags) == 0.0


def test_fit_dispersion_fits_both_visit_kinds_on_over_dispersed_counts() -> None:
    """End to end on a small model: counts far more spread than Poisson (half the studies
    quiet, half four times the forecast) give a clearly positive sd for studies with a prior
    visit and for the same studies as first visits, stored in a renamed copy."""
    from ms_forecast_node.forecast.config import INTERVAL_FLAG, PRIOR_ACTIVITY_FLAG
    from ms_forecast_node.forecast.data import Example, StudyTensors
    from ms_forecast_node.forecast.rate_dispersion import fit_dispersion

    model = _model(base_logit=-4.0)
    study = _study()
    flags = study.flags.copy()
    flags[PRIOR_FLAG], flags[INTERVAL_FLAG], flags[PRIOR_ACTIVITY_FLAG] = 1.0, 1.0, math.log(0.5)
    with_prior = StudyTensors(study.images, flags, study.grid)
    examples = [
        Example(
            patient_id=f"p{i}",
            study=with_prior,
            therapy="placebo",
            horizon_weeks=48.0,
            target=np.zeros(CENTRES.crop_shape, dtype=bool),
            sidecar={"truth": {"net2_count": {"placebo": 0 if i % 2 else 4 * (1 + i % 3)}}},
            patient=None,  # type: ignore[arg-type]  # the fit reads the sidecar only
        )
        for i in range(12)
    ]
    dispersed, fit = fit_dispersion(model, examples, "9.9.9", samples=1)
    assert fit.n_studies == 12
    assert fit.sd_prior_visit > 0.5 and fit.sd_first_visit > 0.5
    assert fit.log_likelihood_prior_after > fit.log_likelihood_prior_before
    assert dispersed.config.version == "9.9.9" and dispersed.config.rate_dispersion
    assert dispersed.denoiser.rate_sd is not None
    torch.testing.assert_close(
        dispersed.denoiser.rate_sd.detach(),
        torch.tensor([fit.sd_first_visit, fit.sd_prior_visit]),
    )
