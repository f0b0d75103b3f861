"""Centre models (0.3.x): lesion-centre targets, the lesion decoder, rate offsets, sampling,
training from another model's weights."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.checkpoint import load_model, save_model
from ms_forecast_node.forecast.config import ModelConfig, SamplerConfig, TrainConfig
from ms_forecast_node.forecast.data import lesion_centres, prepare_study
from ms_forecast_node.forecast.diffusion import Schedule
from ms_forecast_node.forecast.model import LesionDecoder, NET2Forecaster
from ms_forecast_node.forecast.sampling import forecast_study, sample_masks
from tests.forecast_cases import CENTRES

STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def _study(config: ModelConfig = CENTRES, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = config.crop_shape
    seqs = {name: rng.uniform(50, 150, shape).astype(np.float32) for name in ("FLAIR", "T1")}
    seqs.update({"T2": None, "PD": None})
    return prepare_study(seqs, np.zeros(shape, bool), config)


def _model(seed: int = 0, base_logit: float = -2.0) -> NET2Forecaster:
    torch.manual_seed(seed)
    model = NET2Forecaster(CENTRES)
    for name, p in model.named_parameters():
        if "film" in name:  # FiLM starts at zero; give the condition pathway weights to act on
            torch.nn.init.normal_(p, std=0.5)
    torch.nn.init.constant_(model.denoiser.out.bias, base_logit)
    return model.eval()


def test_lesion_centres_mark_the_cell_of_each_lesion_centroid() -> None:
    mask = np.zeros((16, 24, 16), bool)
    mask[2:4, 3:5, 5:7] = True  # centroid (2.5, 3.5, 5.5) -> rounds to (2, 4, 6) -> cell (0, 1, 1)
    mask[10, 20, 12] = True  # a single voxel -> cell (2, 5, 3)
    mask[13:16, 0:2, 0:2] = True  # touches the grid edge; centroid (14, 0.5, 0.5) -> (3, 0, 0)
    centres = lesion_centres(mask)
    assert centres.shape == (4, 6, 4)
    assert sorted(map(tuple, np.argwhere(centres))) == [(0, 1, 1), (2, 5, 3), (3, 0, 0)]
    assert not lesion_centres(np.zeros((16, 24, 16), bool)).any()


def test_decoder_draws_one_lesion_per_centre_and_nothing_far_from_them() -> None:
    decoder = LesionDecoder()
    centres = torch.zeros(1, 1, 4, 6, 4)
    centres[0, 0, 0, 1, 1] = 1.0
    centres[0, 0, 3, 4, 2] = 1.0
    # An appearance map that says "no lesion" everywhere except near one voxel.
    appearance = torch.full((1, 1, 16, 24, 16), -20.0)
    appearance[0, 0, 13, 18, 9] = 5.0
    mask = decoder.masks(centres, appearance)[0, 0].numpy()
    labels, n = ndimage.label(mask, STRUCTURE)
    assert n == 2
    # Every voxel lies within one cell (4 voxels) of a centre's cell.
    near = decoder.support(centres)[0, 0].numpy()
    assert not np.any(mask & ~near)
    # The cell whose appearance favours one voxel keeps exactly that voxel.
    assert mask[12:16, 16:20, 8:12].sum() == 1 and mask[13, 18, 9]
    assert not decoder.masks(torch.zeros_like(centres), appearance).any()


def test_therapy_rate_offset_shifts_every_logit_by_the_same_amount() -> None:
    model = _model()
    study = _study()
    images = torch.from_numpy(study.images[None]).float()
    flags = torch.from_numpy(study.flags[None]).float()
    with torch.no_grad():
        encoded = model.encoder(images, flags)
        x = torch.randn(1, 1, 4, 6, 4)
        t = torch.tensor([30])
        therapy = torch.tensor([1])
        before = model.denoiser(x, t, therapy, torch.tensor([48.0]), encoded)
        assert model.denoiser.therapy_offset is not None
        model.denoiser.therapy_offset.weight[1] += 1.5
        after = model.denoiser(x, t, therapy, torch.tensor([48.0]), encoded)
    torch.testing.assert_close(after - before, torch.full_like(before, 1.5), atol=1e-4, rtol=0)


def test_centre_model_samples_voxel_masks_deterministically_and_by_therapy() -> None:
    model, study = _model(), _study()
    cfg = SamplerConfig(method="dpmpp2m", steps=4, samples=3, seed=5)
    a, _ = sample_masks(model, study, ["placebo", "ocrelizumab"], 48.0, cfg)
    b, _ = sample_masks(model, study, ["placebo", "ocrelizumab"], 48.0, cfg)
    assert a.shape == (2, 3, *CENTRES.crop_shape) and a.dtype == bool
    np.testing.assert_array_equal(a, b)
    assert a.any()
    assert not np.array_equal(a[0], a[1])


def test_centre_model_marginal_sums_to_the_expected_number_of_centres() -> None:
    model, study = _model(base_logit=-3.0), _study()
    result = forecast_study(
        model, study, ["placebo"], 48.0, SamplerConfig(method="dpmpp2m", steps=4, samples=2)
    )
    f = result.therapies["placebo"]
    assert f.marginal_probability is not None
    # Cell probabilities spread over 64 voxels each: every voxel of a cell has the same value
    # and the total is a count of centres, at most one per cell.
    cells = f.marginal_probability.reshape(4, 4, 6, 4, 4, 4).transpose(0, 2, 4, 1, 3, 5)
    assert np.allclose(cells.max(axis=(3, 4, 5)), cells.min(axis=(3, 4, 5)))
    assert 0 < f.expected_volume_voxels_marginal < 4 * 6 * 4


def test_centre_sampling_is_calibrated_on_independent_cells() -> None:
    """When the network's prior logit is the same q for every cell (exact for independent
    cells), the number of sampled lesions per sample is about q × cells: the faithful solver
    does not lose rare centres (as the 4-step DDIM did with rare voxels)."""
    config = replace(CENTRES, crop_shape=(64, 64, 64), timesteps=1000)
    torch.manual_seed(0)
    model = NET2Forecaster(config).eval()
    q = 0.01
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.zero_()
        model.denoiser.out.bias.fill_(math.log(q / (1 - q)))
    study = _study(config)
    cfg = SamplerConfig(method="dpmpp2m", steps=8, samples=4, seed=0)
    result = forecast_study(model, study, ["placebo"], 48.0, cfg)
    cells = 16**3
    per_sample = np.mean(result.therapies["placebo"].sample_counts)
    # Adjacent centres can merge into one component; at q = 0.01 that is rare.
    assert 0.8 * q * cells < per_sample < 1.1 * q * cells, per_sample / (q * cells)


def test_unknown_diffusion_target_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        ModelConfig(diffusion_target="voxels")


def test_centre_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "centres.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.config == CENTRES and loaded.decoder is not None
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)


def test_centre_loss_trains_the_decoder_on_true_centres() -> None:
    from ms_forecast_node.forecast.train import centre_loss_on_batch

    model = _model().train()
    study = _study()
    mask = np.zeros(CENTRES.crop_shape, bool)
    mask[5:8, 9:12, 5:7] = True
    centres = lesion_centres(mask)
    batch = {
        "images": torch.from_numpy(study.images[None]).float(),
        "flags": torch.from_numpy(study.flags[None]).float(),
        "therapy": torch.tensor([0]),
        "horizon": torch.tensor([48.0]),
        "target": torch.from_numpy(mask[None, None].astype(np.float32)),
        "brain": torch.ones(1, 1, *CENTRES.crop_shape),
        "centres": torch.from_numpy(centres[None, None].astype(np.float32)),
    }
    gen = torch.Generator().manual_seed(0)
    with_decoder = centre_loss_on_batch(model, Schedule(50), batch, gen, decoder_weight=1.0)
    gen = torch.Generator().manual_seed(0)
    without = centre_loss_on_batch(model, Schedule(50), batch, gen, decoder_weight=0.0)
    assert float(with_decoder.detach()) > float(without.detach()) > 0
    with_decoder.backward()
    assert model.decoder is not None and model.decoder.kernel.weight.grad is not None
    assert float(model.decoder.kernel.weight.grad.abs().sum()) > 0


@pytest.mark.slow
def test_training_a_centre_model_from_a_mask_model(small_cohort: Path, tmp_path: Path) -> None:
    """init_from copies what matches (the study encoder, the denoiser's blocks) from a mask
    model and leaves the rest (stem, output, decoder, rate offsets) to training."""
    from ms_forecast_node.forecast.train import initialise_from, train

    mask_config = replace(CENTRES, diffusion_target="mask", rate_offsets=False)
    torch.manual_seed(3)
    source = NET2Forecaster(mask_config)
    source_path = tmp_path / "mask.safetensors"
    save_model(source, source_path)
    fresh = NET2Forecaster(CENTRES)
    copied = initialise_from(fresh, source_path)
    assert copied > 10
    assert torch.equal(fresh.encoder.block0.net[0].weight, source.encoder.block0.net[0].weight)
    cfg = TrainConfig(
        steps=2,
        batch_size=2,
        checkpoint_every=2,
        validation_fraction=0.25,
        init_from=str(source_path),
        positive_weight=20.0,
    )
    weights = train(small_cohort, tmp_path / "run", CENTRES, cfg)
    trained = load_model(weights)
    assert trained.config.centres and trained.decoder is not None


@pytest.mark.parametrize("q", [1e-3, 1e-4])
def test_six_step_solver_keeps_rare_independent_events(q: float) -> None:
    """A lesion centre under a strong therapy has a cell probability near 1e-4. DPM-Solver++(2M)
    with the 6 steps centre models are evaluated with keeps such events within 15 % of their
    true frequency; with 4 steps it loses most of those at 1e-4."""
    from ms_forecast_node.forecast.diffusion import dpmpp2m_sample

    schedule = Schedule(1000)

    def exact_logit(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.ab(t).view(-1, *([1] * (x.dim() - 1)))
        return math.log(q / (1 - q)) + 2 * ab.sqrt() * x / (1 - ab)

    noise = torch.randn((8, 1, 64, 64, 64), generator=torch.Generator().manual_seed(1))
    six = (dpmpp2m_sample(exact_logit, schedule, noise, steps=6) > 0).float().mean().item()
    assert abs(six / q - 1.0) < 0.15, six / q
    if q == 1e-4:
        four = (dpmpp2m_sample(exact_logit, schedule, noise, steps=4) > 0).float().mean().item()
        assert four / q < 0.5, four / q


@pytest.mark.parametrize("q", [1e-2, 1e-3])
def test_ancestral_sampler_keeps_rare_events_at_any_step_count(q: float) -> None:
    """The ODE solvers plug the mean E[x0] into each update, and their last jump rounds every
    undecided rare event to "absent": with 3 steps DPM-Solver++(2M) keeps under half of the
    events at q = 1e-3. The ancestral sampler draws x0 from the network's probability at every
    step, which is exact for independent cells: it keeps their frequency within 12 % with 1
    (a draw from the first-step marginal), 2, 4 or 8 steps."""
    from ms_forecast_node.forecast.diffusion import ancestral_sample, dpmpp2m_sample

    schedule = Schedule(1000)

    def exact_logit(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.ab(t).view(-1, *([1] * (x.dim() - 1)))
        return math.log(q / (1 - q)) + 2 * ab.sqrt() * x / (1 - ab)

    noise = torch.randn((8, 1, 64, 64, 64), generator=torch.Generator().manual_seed(2))
    for steps in (1, 2, 4, 8):
        gens = [torch.Generator().manual_seed(100 * steps + i) for i in range(8)]
        drawn = (ancestral_sample(exact_logit, schedule, noise, steps, gens) > 0).float()
        assert abs(drawn.mean().item() / q - 1.0) < 0.12, (steps, drawn.mean().item() / q)
    if q == 1e-3:
        rounded = (dpmpp2m_sample(exact_logit, schedule, noise, 3) > 0).float().mean().item()
        assert rounded / q < 0.5, rounded / q


def test_ancestral_sampling_is_seeded_and_couples_therapies_sample_by_sample() -> None:
    """Common random numbers: sample s uses the same draws under every therapy, so where one
    therapy's cell probabilities are all lower, its lesions are a subset of the other's."""
    model = _model(base_logit=-1.0)
    study = _study()
    cfg = SamplerConfig(method="ancestral", steps=4, samples=3, seed=5, chunk_size=4)
    a, _ = sample_masks(model, study, ["placebo", "natalizumab"], 48.0, cfg)
    b, _ = sample_masks(model, study, ["placebo", "natalizumab"], 48.0, cfg)
    assert np.array_equal(a, b) and a.any()
    other, _ = sample_masks(model, study, ["placebo", "natalizumab"], 48.0, replace(cfg, seed=6))
    assert not np.array_equal(a, other)
    # The same therapy twice in one call: identical samples (shared random numbers), even
    # though the two rows fall into different network batches (chunk_size 4, 6 rows).
    twice, _ = sample_masks(model, study, ["placebo", "placebo"], 48.0, cfg)
    assert np.array_equal(twice[0], twice[1])


def test_several_draws_per_pass_are_exact_draws_of_each_trajectory() -> None:
    """``final_draws`` = k: k masks from each row's last-step probabilities. With k = 1 it is
    the single-draw sampler bit for bit; the draws of a row are distinct masks whose frequency
    is the network's probability; rows of equal seed share their draws."""
    from ms_forecast_node.forecast.diffusion import ancestral_sample

    schedule = Schedule(1000)
    q = 0.05

    def constant_logit(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, math.log(q / (1 - q)))

    noise = torch.randn((3, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))

    def gens(seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    one = ancestral_sample(constant_logit, schedule, noise, 2, gens([1, 2, 1]))
    same = ancestral_sample(constant_logit, schedule, noise, 2, gens([1, 2, 1]), final_draws=1)
    assert torch.equal(one, same)
    many = ancestral_sample(constant_logit, schedule, noise, 2, gens([1, 2, 1]), final_draws=6)
    assert many.shape == (18, 1, 16, 16, 16)
    drawn = many > 0
    assert not torch.equal(drawn[0], drawn[1])  # draws of one row differ
    assert torch.equal(drawn[0:6], drawn[12:18])  # rows 0 and 2 share their seed
    assert abs(drawn.float().mean().item() / q - 1.0) < 0.1
    with pytest.raises(ValueError):
        ancestral_sample(constant_logit, schedule, noise, 1, None, final_draws=0)


def test_sample_masks_with_draws_per_pass_fills_every_sample_and_keeps_the_coupling() -> None:
    """10 samples at 4 draws per pass: 3 network passes per therapy, every sample filled, the
    same therapy twice gives the same samples, and the mean count tracks the 1-draw sampler's
    (both estimate the same expected count)."""
    model = _model(base_logit=-2.0)  # about 14 lesions per sample: none is empty
    study = _study()
    cfg = SamplerConfig(method="ancestral", steps=1, samples=10, seed=3, draws_per_pass=4)
    masks, _ = sample_masks(model, study, ["placebo", "placebo", "ocrelizumab"], 48.0, cfg)
    assert masks.shape == (3, 10, *CENTRES.crop_shape)
    assert all(masks[0, s].any() for s in range(10))
    assert np.array_equal(masks[0], masks[1])
    assert len({masks[0, s].tobytes() for s in range(10)}) == 10
    single = replace(cfg, samples=40, draws_per_pass=1)
    several = replace(cfg, samples=40, draws_per_pass=8)
    a = forecast_study(model, study, ["placebo"], 48.0, single).therapies["placebo"]
    b = forecast_study(model, study, ["placebo"], 48.0, several).therapies["placebo"]
    assert abs(a.expected_count - b.expected_count) < 0.15 * a.expected_count
