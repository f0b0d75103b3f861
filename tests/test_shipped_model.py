"""The shipped default model: present, small, checksum-verified, and therapy-sensitive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ms_forecast_node.forecast.anchoring import first_step_cell_probabilities
from ms_forecast_node.forecast.checkpoint import ModelLoadError, sha256_of
from ms_forecast_node.forecast.data import brain_mask, load_examples
from ms_forecast_node.forecast.model import LesionDecoder
from ms_forecast_node.forecast.registry import (
    REGISTRY,
    default_entry,
    load_default_model,
    model_sampler,
)
from ms_forecast_node.forecast.sampling import forecast_study, sample_masks
from ms_forecast_node.forecast.site_head import site_labels


def test_default_model_is_shipped_small_and_verified() -> None:
    model, entry = load_default_model()
    assert entry.file.stat().st_size <= 25 * 1024 * 1024
    assert sha256_of(entry.file) == entry.sha256
    assert model.config.name == entry.name and model.config.version == entry.version
    card = entry.card.read_text()
    assert "simulated" in card and entry.sha256 in card
    assert "NOT FOR DIAGNOSTIC USE" in card


def _copy_registry(tmp_path: Path) -> Path:
    entry = default_entry()
    shutil.copy(REGISTRY, tmp_path / "models.json")
    shutil.copy(entry.file, tmp_path / entry.file.name)
    shutil.copy(entry.card, tmp_path / entry.card.name)
    return tmp_path / "models.json"


def test_corrupt_default_model_is_refused(tmp_path: Path) -> None:
    registry = _copy_registry(tmp_path)
    weights = tmp_path / default_entry().file.name
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as err:
        load_default_model(registry)
    assert err.value.reason == "model_checksum_mismatch"


def test_missing_default_model_is_a_clear_error(tmp_path: Path) -> None:
    registry = _copy_registry(tmp_path)
    (tmp_path / default_entry().file.name).unlink()
    with pytest.raises(ModelLoadError, match="not found"):
        load_default_model(registry)
    registry.write_text(json.dumps({"models": [{"name": "x"}]}))
    with pytest.raises(ModelLoadError, match="malformed"):
        load_default_model(registry)


@pytest.mark.slow
def test_stronger_therapies_give_fewer_expected_lesions(small_cohort: Path) -> None:
    """On held-out simulated patients (seed 3; training used 1000), the shipped model expects
    fewer NET2 lesions under ocrelizumab than under placebo, and the therapy changes the
    samples drawn from the same noise."""
    model, entry = load_default_model()
    examples = load_examples(small_cohort, model.config, cache=False)
    # The sampler the model was evaluated with (models.json), as production uses it.
    cfg = model_sampler(entry, samples=8, seed=5)
    therapies = ["placebo", "glatiramer_acetate", "ocrelizumab"]
    totals = dict.fromkeys(therapies, 0.0)
    differs = False
    for e in examples:
        result = forecast_study(model, e.study, therapies, e.horizon_weeks, cfg, entry.sha256)
        for t in therapies:
            totals[t] += result.therapies[t].expected_count
        masks, _ = sample_masks(model, e.study, ["placebo", "ocrelizumab"], 48.0, cfg)
        differs |= not np.array_equal(masks[0], masks[1])
    assert totals["placebo"] > totals["ocrelizumab"], totals
    assert totals["glatiramer_acetate"] >= totals["ocrelizumab"], totals
    assert differs


@pytest.mark.slow
def test_the_shipped_model_forecasts_lesions_at_visible_pre_lesional_sites(
    small_cohort: Path,
) -> None:
    """Under placebo every visible pre-lesional site becomes a lesion. The shipped model's site
    head must concentrate its first-step lesion-centre probability there: on the held-out
    seed-3 patients the cells of the sites get on average far more than the other brain cells,
    and some site cell is more likely than not (models before the site head: 0.003 against
    0.0004, nothing above 0.01)."""
    model, _ = load_default_model()
    config = model.config
    cell = LesionDecoder.CELL
    cells = tuple(n // cell for n in config.crop_shape)

    def to_cells(volume: np.ndarray) -> np.ndarray:
        blocks = volume.reshape(cells[0], cell, cells[1], cell, cells[2], cell)
        return blocks.any(axis=(1, 3, 5)).ravel()

    brain = to_cells(brain_mask(config.spacing_mm, config.crop_shape))
    at_sites, elsewhere = [], []
    for e in load_examples(small_cohort, config, cache=False):
        p = first_step_cell_probabilities(model, e, ["placebo"], samples=2)[0]
        sites = to_cells(site_labels(e.sidecar, config))
        at_sites += list(p[sites])
        elsewhere += list(p[brain & ~sites])
    assert at_sites, "the seed-3 cohort has visible pre-lesional sites"
    assert max(at_sites) >= 0.5
    assert np.mean(at_sites) >= 100.0 * np.mean(elsewhere)
