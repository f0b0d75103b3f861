"""The forecaster: shapes, determinism, checkpoints, samplers, training, conditioning."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.checkpoint import ModelLoadError, load_model, save_model, sha256_of
from ms_forecast_node.forecast.config import SamplerConfig, TrainConfig
from ms_forecast_node.forecast.data import prepare_study
from ms_forecast_node.forecast.diffusion import (
    Schedule,
    ddim_sample,
    ddpm_sample,
    dpm_timesteps,
    dpmpp2m_sample,
)
from ms_forecast_node.forecast.model import NET2Forecaster, depth_to_space, space_to_depth
from ms_forecast_node.forecast.registry import (
    ModelEntry,
    default_entry,
    entry_for_weights,
    model_sampler,
)
from ms_forecast_node.forecast.sampling import forecast_study, sample_masks
from tests.forecast_cases import TINY


def _tiny_study(seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = TINY.crop_shape
    seqs = {name: rng.uniform(50, 150, shape).astype(np.float32) for name in ("FLAIR", "T1")}
    seqs.update({"T2": None, "PD": None})
    lesions = np.zeros(shape, bool)
    lesions[8, 10:12, 6:8] = True
    return prepare_study(seqs, lesions, TINY)


def _model(seed: int = 0, randomize_film: bool = True) -> NET2Forecaster:
    torch.manual_seed(seed)
    model = NET2Forecaster(TINY)
    if randomize_film:  # FiLM starts at zero; give the condition pathway weights to act on
        for name, p in model.named_parameters():
            if "film" in name:
                torch.nn.init.normal_(p, std=0.5)
        torch.nn.init.constant_(model.denoiser.out.bias, 0.0)
    return model.eval()


def test_space_to_depth_round_trip() -> None:
    x = torch.randn(2, 3, 8, 16, 8)
    assert space_to_depth(x, 4).shape == (2, 192, 2, 4, 2)
    assert torch.equal(depth_to_space(space_to_depth(x, 4), 4), x)


def test_study_flags_mark_missing_sequences() -> None:
    study = _tiny_study()
    assert study.images.shape == (TINY.n_image_channels, *TINY.crop_shape)
    assert study.flags.tolist()[:4] == [1.0, 1.0, 0.0, 0.0]
    assert np.all(study.images[2] == 0)


def test_sampling_shapes_and_seed_determinism() -> None:
    model, study = _model(), _tiny_study()
    cfg = SamplerConfig(steps=3, samples=3, chunk_size=4, seed=7)
    a, timings = sample_masks(model, study, ["placebo", "natalizumab"], 48.0, cfg)
    b, _ = sample_masks(model, study, ["placebo", "natalizumab"], 48.0, cfg)
    assert a.shape == (2, 3, *TINY.crop_shape) and a.dtype == bool
    np.testing.assert_array_equal(a, b)
    c, _ = sample_masks(model, study, ["placebo", "natalizumab"], 48.0, replace(cfg, seed=8))
    assert not np.array_equal(a, c)
    assert timings["sample_s"] > 0


def test_therapy_condition_changes_the_sample_with_the_same_noise() -> None:
    model, study = _model(), _tiny_study()
    cfg = SamplerConfig(steps=3, samples=2, seed=1)
    masks, _ = sample_masks(model, study, ["placebo", "ocrelizumab"], 48.0, cfg)
    assert not np.array_equal(masks[0], masks[1])


def test_forecast_result_aggregates_per_therapy() -> None:
    model, study = _model(), _tiny_study()
    cfg = SamplerConfig(steps=2, samples=4, seed=3)
    result = forecast_study(model, study, ["placebo", "fingolimod"], 48.0, cfg)
    f = result.therapies["placebo"]
    assert f.probability.shape == TINY.crop_shape
    assert set(np.unique(f.probability * 4).round()) <= {0, 1, 2, 3, 4}
    assert len(f.sample_counts) == 4
    assert 0.0 <= f.probability_of_activity <= 1.0
    lo, hi = f.count_interval_90
    assert lo <= f.count_median <= hi
    assert not np.any(f.mask & (f.probability < 0.5))
    from scipy import ndimage

    labels, n = ndimage.label(f.probability >= 0.5, np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())
    big = np.flatnonzero(sizes >= cfg.min_lesion_voxels)
    np.testing.assert_array_equal(f.mask, np.isin(labels, big[big > 0]))
    assert sum(le.volume_mm3 for le in f.lesions) == pytest.approx(f.mask.sum() * 8.0)
    assert f.marginal_probability is not None
    assert f.marginal_probability.shape == TINY.crop_shape
    assert np.all((f.marginal_probability >= 0) & (f.marginal_probability <= 1))
    assert f.expected_volume_voxels_marginal == pytest.approx(f.marginal_probability.sum(), 1e-5)
    key = {
        t: (v.expected_count, v.expected_volume_voxels_marginal, t)
        for t, v in result.therapies.items()
    }
    assert [t.therapy for t in result.ranked()] == sorted(result.therapies, key=key.__getitem__)


def test_ranking_breaks_sample_ties_with_the_marginal_volume() -> None:
    model, study = _model(), _tiny_study()
    cfg = SamplerConfig(steps=2, samples=2, seed=3)
    result = forecast_study(model, study, ["placebo", "fingolimod"], 48.0, cfg)
    tied = {
        name: replace(
            f,
            sample_counts=(0, 0),
            marginal_probability=np.full(TINY.crop_shape, mass, np.float32),
        )
        for (name, f), mass in zip(result.therapies.items(), (0.02, 0.01), strict=True)
    }
    ranked = replace(result, therapies=tied).ranked()
    assert [f.therapy for f in ranked] == ["fingolimod", "placebo"]


def test_checkpoint_round_trip_and_checksum_failure(tmp_path: Path) -> None:
    model = _model(3)
    path = tmp_path / "m.safetensors"
    digest = save_model(model, path, {"note": "test"})
    assert digest == sha256_of(path)
    loaded = load_model(path, expected_sha256=digest)
    assert loaded.config == model.config
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as err:
        load_model(path, expected_sha256=digest)
    assert err.value.reason == "model_checksum_mismatch"
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("q", [0.1, 0.4])
def test_samplers_recover_an_analytic_distribution(q: float) -> None:
    """Independent voxels with P(+1) = q: the exact posterior-mean logit is known in closed
    form, so both samplers must reproduce the frequency q."""
    schedule = Schedule(200)

    def exact_logit(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.ab(t).view(-1, *([1] * (x.dim() - 1)))
        return math.log(q / (1 - q)) + 2 * ab.sqrt() * x / (1 - ab)

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 1, 40, 40, 40), generator=gen)
    ddpm = (ddpm_sample(exact_logit, schedule, noise, generator=gen) > 0).float().mean().item()
    ddim = (ddim_sample(exact_logit, schedule, noise, steps=50) > 0).float().mean().item()
    assert abs(ddpm - q) < 0.02, ddpm
    assert abs(ddim - q) < 0.03, ddim


def _independent_voxels_logit(schedule: Schedule, q: float):
    def exact_logit(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.ab(t).view(-1, *([1] * (x.dim() - 1)))
        return math.log(q / (1 - q)) + 2 * ab.sqrt() * x / (1 - ab)

    return exact_logit


@pytest.mark.parametrize("q", [0.01, 0.1])
def test_second_order_solver_keeps_rare_voxels_with_few_steps(q: float) -> None:
    """NET2 voxels are rare. With 8 steps DPM-Solver++(2M) reproduces the frequency of rare
    independent voxels within 12 %. DDIM with 4 steps, the first-order solver at the step
    count the shipped model was evaluated with, loses at least 40 % of them at q = 0.01."""
    schedule = Schedule(1000)
    fn = _independent_voxels_logit(schedule, q)
    noise = torch.randn((1, 1, 64, 64, 64), generator=torch.Generator().manual_seed(1))
    dpm = (dpmpp2m_sample(fn, schedule, noise, steps=8) > 0).float().mean().item()
    assert abs(dpm / q - 1.0) < 0.12, dpm / q
    if q == 0.01:
        ddim = (ddim_sample(fn, schedule, noise, steps=4) > 0).float().mean().item()
        assert ddim / q < 0.6, ddim / q


def test_dpm_timesteps_descend_from_the_last_step_to_zero() -> None:
    seq = dpm_timesteps(1000, 8)
    assert seq[0] == 999 and seq[-1] == 0 and len(seq) == 8
    assert all(a > b for a, b in itertools.pairwise(seq))
    gaps = np.diff(seq[::-1])
    assert gaps[0] > gaps[-1]  # packed towards the high-noise end


def test_unknown_sampler_method_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="sampler method"):
        SamplerConfig(method="euler")
    with pytest.raises(ConfigurationError):
        SamplerConfig(steps=0)


def _entry(tmp_path: Path, sampler: dict[str, Any]) -> ModelEntry:
    return ModelEntry(
        name="m",
        version="1",
        file=tmp_path / "m.safetensors",
        sha256="0" * 64,
        card=tmp_path / "m.md",
        default=True,
        sampler=sampler,
    )


def test_production_sampler_is_the_one_the_model_was_evaluated_with(tmp_path: Path) -> None:
    entry = _entry(tmp_path, {"method": "ddim", "steps": 4, "min_lesion_voxels": 2, "samples": 99})
    cfg = model_sampler(entry, samples=8, seed=3)
    assert (cfg.method, cfg.steps, cfg.min_lesion_voxels, cfg.samples, cfg.seed) == (
        "ddim",
        4,
        2,
        8,
        3,
    )
    site = model_sampler(entry, samples=16, seed=0, steps=12, method="dpmpp2m")
    assert (site.method, site.steps, site.samples, site.min_lesion_voxels) == ("dpmpp2m", 12, 16, 2)
    assert model_sampler(None, samples=8, seed=0) == SamplerConfig(samples=8, seed=0)
    # No site number: the evaluated one (99 here); a model that records none gets 8.
    assert model_sampler(entry, samples=None, seed=0).samples == 99
    assert model_sampler(None, samples=None, seed=0).samples == 8
    # Draws per pass belong to the ancestral sampler: a site's ODE solver drops them.
    several = replace(entry, sampler={"method": "ancestral", "steps": 1, "draws_per_pass": 8})
    assert model_sampler(several, samples=None, seed=0).draws_per_pass == 8
    assert model_sampler(several, samples=None, seed=0, method="ddim").draws_per_pass == 1
    with pytest.raises(ConfigurationError, match="draws_per_pass"):
        SamplerConfig(method="ddim", draws_per_pass=2)
    # The evaluate command finds a packaged model's entry (and so its sampler) by its file.
    shipped = default_entry()
    assert entry_for_weights(shipped.file) == shipped
    assert entry_for_weights(tmp_path / "other.safetensors") is None
    bad = replace(entry, sampler={"method": "euler"})
    with pytest.raises(ConfigurationError):
        model_sampler(bad, samples=8, seed=0)


def test_a_sampler_other_than_the_evaluated_one_is_logged_as_uncalibrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = _entry(
        tmp_path, {"method": "ancestral", "steps": 1, "samples": 64, "draws_per_pass": 8}
    )
    with caplog.at_level(logging.WARNING, logger="ms_forecast_node.forecast.registry"):
        model_sampler(entry, samples=None, seed=0)
        model_sampler(entry, samples=16, seed=5, steps=1, method="ancestral")
        assert not caplog.records  # the evaluated sampler, other samples and seed: calibrated
        model_sampler(entry, samples=None, seed=0, steps=10)
        model_sampler(entry, samples=None, seed=0, method="ddpm")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "steps 1 -> 10" in messages[0] and "do not apply" in messages[0]
    assert "method ancestral -> ddpm" in messages[1]


def test_evaluate_scores_unregistered_weights_with_the_sampler_it_is_told(tmp_path: Path) -> None:
    from ms_forecast_node.cli import evaluation_sampler

    shipped = default_entry()
    # A packaged model without options: exactly the node's sampler.
    assert evaluation_sampler(shipped.file, None) == model_sampler(shipped, None, seed=0)
    # Unregistered weights (a candidate under evaluation) can be scored as the shipped model
    # runs, draws per pass included.
    candidate = tmp_path / "candidate.safetensors"
    like_shipped = evaluation_sampler(
        candidate, None, samples=64, steps=1, method="ancestral", draws_per_pass=8
    )
    assert (like_shipped.method, like_shipped.steps, like_shipped.samples) == ("ancestral", 1, 64)
    assert like_shipped.draws_per_pass == 8
    # An ODE solver cannot take several draws per pass: a clear configuration error.
    with pytest.raises(ConfigurationError, match="draws_per_pass"):
        evaluation_sampler(candidate, None, method="ddim", draws_per_pass=8)
    # Switching a multi-draw model to an ODE solver drops its draws, as the node does.
    assert evaluation_sampler(shipped.file, None, method="ddim").draws_per_pass == 1


@pytest.mark.slow
def test_training_runs_resumes_and_writes_curves(small_cohort: Path, tmp_path: Path) -> None:
    from ms_forecast_node.forecast.train import train

    cfg = TrainConfig(steps=2, batch_size=2, checkpoint_every=2, validation_fraction=0.25)
    run = tmp_path / "run"
    weights = train(small_cohort, run, TINY, cfg)
    assert weights.is_file() and (run / "loss.png").stat().st_size > 1000
    train(small_cohort, run, TINY, replace(cfg, steps=4))
    import json

    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 4
    assert all(math.isfinite(v) for _, v in state["history"]["train"])
    assert len(state["history"]["val"]) == 2
    # Early stopping: best.safetensors holds the step with the lowest validation loss.
    vals = dict((int(s), v) for s, v in state["history"]["val"])
    best_step, best_val = state["best_validation"]
    assert best_val == min(vals.values()) and vals[best_step] == best_val
    assert (run / "best.safetensors").is_file()


def test_weighted_bce_keeps_the_trained_logit_calibrated() -> None:
    """Fit one logit to Bernoulli(p) labels under positive weight 30: it converges to logit(p)
    (plain weighted BCE would converge to logit(p) + log 30)."""
    from ms_forecast_node.forecast.train import calibrated_weighted_bce

    p = 0.02
    target = torch.zeros(10_000)
    target[: int(p * 10_000)] = 1.0
    logit = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([logit], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = calibrated_weighted_bce(logit.expand_as(target), target, 30.0).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert float(logit.detach()) == pytest.approx(math.log(p / (1 - p)), abs=1e-3)


def test_high_noise_share_of_training_times() -> None:
    from ms_forecast_node.forecast.train import sample_timesteps

    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(20_000, 1000, 0.5, gen)
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    # half of the draws from [800, 1000) plus a fifth of the uniform half
    assert float((t >= 800).float().mean()) == pytest.approx(0.6, abs=0.015)
    assert float((sample_timesteps(20_000, 1000, 0.0, gen) >= 800).float().mean()) == (
        pytest.approx(0.2, abs=0.015)
    )


def test_random_crops_cut_inputs_target_and_brain_alike() -> None:
    from ms_forecast_node.forecast.batches import random_crops as _random_crops

    rng = np.random.default_rng(0)
    shape = (16, 24, 16)
    coords = np.indices(shape).sum(axis=0).astype(np.float32)  # a unique value per position
    images = np.stack([np.stack([coords, coords * 2])] * 3)
    target = np.stack([coords[None] * 3] * 3)
    brain = np.stack([coords[None] * 4] * 3)
    ci, ct, cb = _random_crops(images, target, brain, (8, 16, 8), rng)
    assert ci.shape == (3, 2, 8, 16, 8) and ct.shape == cb.shape == (3, 1, 8, 16, 8)
    np.testing.assert_array_equal(ci[:, 1], ci[:, 0] * 2)
    np.testing.assert_array_equal(ct[:, 0] * 4, cb[:, 0] * 3)
    np.testing.assert_array_equal(ct[:, 0], ci[:, 0] * 3)
    with pytest.raises(ValueError, match="multiples of 8"):
        _random_crops(images, target, brain, (12, 16, 8), rng)


@pytest.mark.slow
def test_training_on_random_crops(small_cohort: Path, tmp_path: Path) -> None:
    from ms_forecast_node.forecast.train import train

    cfg = TrainConfig(
        steps=2,
        batch_size=2,
        checkpoint_every=1,
        keep_last_checkpoints=1,
        validation_fraction=0.25,
        train_crop=(8, 16, 8),
        positive_weight=30.0,
        high_noise_share=0.5,
    )
    from ms_forecast_node.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="global_summary"):
        train(small_cohort, tmp_path / "refused", TINY, cfg)
    fully_convolutional = replace(TINY, global_summary=False)
    weights = train(small_cohort, tmp_path / "run", fully_convolutional, cfg)
    snapshots = sorted((tmp_path / "run" / "snapshots").iterdir())
    assert [p.name for p in snapshots] == ["step-0000002.safetensors"]
    model = load_model(weights)
    result = forecast_study(
        model, _tiny_study(), ["placebo"], 48.0, SamplerConfig(steps=2, samples=2)
    )
    assert result.therapies["placebo"].probability.shape == TINY.crop_shape


def test_average_checkpoints_is_the_mean_of_the_weights(tmp_path: Path) -> None:
    from ms_forecast_node.forecast.checkpoint import average_checkpoints

    a, b = _model(seed=1), _model(seed=2)
    save_model(a, tmp_path / "a.safetensors")
    save_model(b, tmp_path / "b.safetensors")
    average_checkpoints([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m.st")
    merged = load_model(tmp_path / "m.st")
    for key, value in merged.state_dict().items():
        expected = (a.state_dict()[key] + b.state_dict()[key]) / 2
        torch.testing.assert_close(value, expected.to(value.dtype))
    save_model(NET2Forecaster(replace(TINY, embed_dim=16)), tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="different model configurations"):
        average_checkpoints(
            [tmp_path / "a.safetensors", tmp_path / "other.safetensors"], tmp_path / "x"
        )


def test_every_shipped_configuration_file_loads() -> None:
    """configs/*.yaml are read with unknown keys rejected: a typo there fails here, not an
    hour into a run (or on a lent GPU)."""
    from ms_forecast_node.forecast.config import load_configs

    folder = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(folder.glob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        model, train, sampler = load_configs(path)
        assert model.crop_shape and train.steps > 0 and sampler.samples > 0, path
