"""The site head: its blob filter, its detector training, its maximum-likelihood fit, and that
it changes nothing until fitted and nothing for a study without all four sequences."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage, special

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.checkpoint import load_model, save_model
from ms_forecast_node.forecast.data import Example, model_grid, prepare_study
from ms_forecast_node.forecast.model import LesionDecoder, NET2Forecaster
from ms_forecast_node.forecast.site_head import (
    SCORE_CLIP,
    cell_shift,
    fit_cell_head,
    fit_site_head,
    gaussian_blur,
    site_labels,
    train_detector,
)
from ms_forecast_node.simulate.activity import rank_auc
from tests.forecast_cases import CENTRES
from tests.test_forecast_centres import _model

SITES = replace(CENTRES, site_head=True)


def test_gaussian_blur_is_scipys_gaussian_filter_with_nearest_edges() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(2, 12, 14, 10)).astype(np.float32)
    blurred = gaussian_blur(torch.from_numpy(volume[None]), 1.5)[0].numpy()
    for c in range(2):
        expected = ndimage.gaussian_filter(volume[c], 1.5, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(blurred[c], expected, atol=1e-5)


def test_the_cell_fit_recovers_the_intercept_and_slope_that_made_the_centres() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(-6.0, 1.0, 200_000)
    scores = rng.normal(0.0, 3.0, 200_000)
    y = rng.random(200_000) < special.expit(logits + cell_shift(scores, -0.7, 6.0, 4.0, 1.5))
    (alpha, beta, tau, width), before, after = fit_cell_head(logits, scores, y.astype(float))
    assert alpha == pytest.approx(-0.7, abs=0.15)
    assert beta == pytest.approx(6.0, abs=0.6)
    assert tau == pytest.approx(4.0, abs=0.5)
    assert width == pytest.approx(1.5, abs=0.5)
    assert after > before + 100.0


def _sites_study(
    seed: int,
    sites: list[tuple[int, int, int]],
    sequences: tuple[str, ...] = ("FLAIR", "T1", "T2", "PD"),
) -> tuple[Any, dict[str, Any]]:
    """Four noisy sequences with a faint bright ball at each site (k, j, i) and the lesion
    records that say where the sites are."""
    rng = np.random.default_rng(seed)
    shape = SITES.crop_shape
    ball = np.zeros(shape, bool)
    kk, jj, ii = np.indices(shape)
    for k, j, i in sites:
        ball |= (kk - k) ** 2 + (jj - j) ** 2 + (ii - i) ** 2 <= 2
    seqs: dict[str, np.ndarray | None] = {}
    for name in ("FLAIR", "T1", "T2", "PD"):
        image = rng.normal(100.0, 3.0, shape) + (40.0 if name != "T1" else -20.0) * ball
        seqs[name] = image.astype(np.float32) if name in sequences else None
    study = prepare_study(seqs, np.zeros(shape, bool), SITES)
    grid, _ = model_grid(SITES.spacing_mm, SITES.crop_shape)
    records = []
    for k, j, i in sites:
        centre = grid.index_to_world(np.array([[i, j, k]], float))[0]
        records.append(
            {
                "kind": "new",
                "prodrome_visible": True,
                "centroid_lps_mm": centre.tolist(),
                "volume_mm3": 60.0,
            }
        )
    records.append({"kind": "new", "prodrome_visible": False, "centroid_lps_mm": [0, 0, 0]})
    return study, {"lesions": records}


def _example(seed: int, sites: list[tuple[int, int, int]]) -> Example:
    study, sidecar = _sites_study(seed, sites)
    target = np.zeros(SITES.crop_shape, bool)
    for k, j, i in sites:
        target[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2] = True
    return Example(f"P{seed}", study, "placebo", 48.0, target, sidecar, None)  # type: ignore[arg-type]


def _random_sites(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    d, h, w = SITES.crop_shape
    return [
        (int(rng.integers(3, d - 3)), int(rng.integers(3, h - 3)), int(rng.integers(3, w - 3)))
        for _ in range(n)
    ]


def test_site_labels_mark_visible_sites_only() -> None:
    _, sidecar = _sites_study(0, [(8, 12, 8)])
    labels = site_labels(sidecar, SITES)
    assert labels[8, 12, 8]
    # a ball of 0.8 × 60 mm³ at 2 mm: a few voxels, all near the site
    assert 1 <= labels.sum() <= 27
    assert np.argwhere(labels).max(axis=0).tolist() <= [9, 13, 9]
    assert not site_labels({"lesions": sidecar["lesions"][1:]}, SITES).any()


def test_the_detector_learns_to_find_planted_sites() -> None:
    rng = np.random.default_rng(2)
    train = [_example(s, _random_sites(rng, 2)) for s in range(12)]
    model = NET2Forecaster(SITES)
    detector = model.encoder.sites
    assert detector is not None
    n_sites = train_detector(detector, train, seed=0, epochs=100)
    assert n_sites == 24
    unseen = _example(99, [(8, 12, 8)])
    images = torch.from_numpy(unseen.study.images[None])
    with torch.no_grad():
        scores = detector.scores(images)[0, 0].numpy()
    labels = site_labels(unseen.sidecar, SITES)
    candidates = scores > -SCORE_CLIP
    assert rank_auc(scores[candidates].astype(float), labels[candidates].astype(float)) > 0.95


def _encoded_shift(model: NET2Forecaster, study: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(study.images[None])
    flags = torch.from_numpy(study.flags[None])
    with torch.no_grad():
        encoded = model.encoder(images, flags)
        t = torch.full((1,), model.config.timesteps - 1)
        x = torch.randn((1, 1, *(n // LesionDecoder.CELL for n in study.images.shape[1:])))
        logit = model.denoiser(
            x, t, torch.zeros(1, dtype=torch.long), torch.full((1,), 48.0), encoded
        )
    assert encoded.appearance is not None
    return logit, encoded.appearance


def _with_head(base: NET2Forecaster) -> NET2Forecaster:
    headed = NET2Forecaster(SITES).eval()
    missing, unexpected = headed.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".sites." in k for k in missing)
    return headed


def test_an_unfitted_head_changes_nothing_and_a_fitted_one_moves_logits() -> None:
    base = _model()
    headed = _with_head(base)
    study, _ = _sites_study(3, [(8, 12, 8)])
    torch.manual_seed(0)
    plain = _encoded_shift(base, study)
    torch.manual_seed(0)
    zero = _encoded_shift(headed, study)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])
    assert headed.encoder.sites is not None
    with torch.no_grad():
        headed.encoder.sites.head.copy_(torch.tensor([0.5, 3.0, 1.0, 0.0, 0.2]))
    torch.manual_seed(0)
    moved = _encoded_shift(headed, study)
    assert not torch.equal(plain[0], moved[0]) and not torch.equal(plain[1], moved[1])


def test_a_study_without_all_four_sequences_is_forecast_as_without_the_head() -> None:
    base = _model()
    headed = _with_head(base)
    assert headed.encoder.sites is not None
    with torch.no_grad():
        headed.encoder.sites.head.copy_(torch.tensor([0.5, 3.0, 1.0, 0.0, 0.2]))
    study, _ = _sites_study(4, [(8, 12, 8)], sequences=("FLAIR", "T1", "T2"))
    torch.manual_seed(0)
    plain = _encoded_shift(base, study)
    torch.manual_seed(0)
    gated = _encoded_shift(headed, study)
    assert torch.equal(plain[0], gated[0]) and torch.equal(plain[1], gated[1])


def test_a_site_head_model_round_trips_through_its_checkpoint(tmp_path: Path) -> None:
    headed = _with_head(_model())
    detector = headed.encoder.sites
    assert detector is not None
    with torch.no_grad():
        detector.head.copy_(torch.tensor([0.5, 3.0, 1.0, 0.0, 0.2]))
        detector.feature_mean.fill_(1.5)
    save_model(headed, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config.site_head
    assert loaded.encoder.sites is not None
    assert torch.equal(loaded.encoder.sites.head, detector.head)
    assert torch.equal(loaded.encoder.sites.feature_mean, detector.feature_mean)


def test_the_fit_refuses_overlapping_detector_and_head_studies() -> None:
    rng = np.random.default_rng(5)
    examples = [_example(s, _random_sites(rng, 1)) for s in range(12)]
    with pytest.raises(ConfigurationError, match="disjoint"):
        fit_site_head(_model(), examples[:6], examples[4:], "0.0.1")
    with pytest.raises(ConfigurationError, match="at least 10"):
        fit_site_head(_model(), examples[:6], examples[6:], "0.0.1")


def test_without_heads_forecasts_as_the_network_before_its_heads_were_fitted() -> None:
    base = _model()
    headed = _with_head(base)
    assert headed.encoder.sites is not None
    with torch.no_grad():
        headed.encoder.sites.head.copy_(torch.tensor([0.5, 3.0, 1.0, 0.0, 0.2]))
    study, _ = _sites_study(3, [(8, 12, 8)])
    network = headed.without_heads()
    torch.manual_seed(0)
    plain = _encoded_shift(base, study)
    torch.manual_seed(0)
    stripped = _encoded_shift(network, study)
    assert torch.equal(plain[0], stripped[0]) and torch.equal(plain[1], stripped[1])
    # A copy: the model it came from keeps its head.
    torch.manual_seed(0)
    assert not torch.equal(_encoded_shift(headed, study)[0], plain[0])


def test_without_heads_zeroes_the_prior_activity_head_and_the_rate_dispersion() -> None:
    model = NET2Forecaster(replace(CENTRES, prior_activity_head=True, rate_dispersion=True))
    assert model.denoiser.prior_activity is not None and model.denoiser.rate_sd is not None
    with torch.no_grad():
        model.denoiser.prior_activity.fill_(0.7)
        model.denoiser.rate_sd.fill_(0.4)
    network = model.without_heads()
    assert network.denoiser.prior_activity is not None and network.denoiser.rate_sd is not None
    assert not network.denoiser.prior_activity.any() and not network.denoiser.rate_sd.any()
    flags = torch.ones((1, model.config.n_flags))
    assert network.denoiser.sample_rate_sd(flags) == 0.0
    assert model.denoiser.sample_rate_sd(flags) == pytest.approx(0.4)
