"""Training batches from the stacked example bank, and time-budgeted training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ms_forecast_node.forecast.batches import ExampleBank
from ms_forecast_node.forecast.config import SEQUENCES, ModelConfig, TrainConfig
from ms_forecast_node.forecast.data import Example, lesion_centres, prepare_study
from ms_forecast_node.forecast.model import LesionDecoder
from tests.forecast_cases import CENTRES


def _examples(n: int, config: ModelConfig = CENTRES) -> list[Example]:
    rng = np.random.default_rng(0)
    shape = config.crop_shape
    out = []
    for i in range(n):
        seqs = {s: rng.uniform(50, 150, shape).astype(np.float32) for s in ("FLAIR", "T1", "T2")}
        seqs["PD"] = None
        study = prepare_study(seqs, np.zeros(shape, bool), config)
        target = np.zeros(shape, bool)
        target[4 + i % 4 : 6 + i % 4, 8:10, 5:7] = True
        therapy = config.therapies[i % len(config.therapies)]
        out.append(Example(f"P{i}", study, therapy, 24.0 + i, target, {}, None))  # type: ignore[arg-type]
    return out


def test_bank_batches_carry_the_examples_unchanged_without_augmentation() -> None:
    examples = _examples(5)
    bank = ExampleBank(examples, CENTRES, torch.device("cpu"))
    batch = bank.batch([3, 1], TrainConfig(), np.random.default_rng(0), augment=False)
    for row, i in enumerate([3, 1]):
        e = examples[i]
        # float16 storage, as the model-grid cache stores images
        expected = torch.from_numpy(e.study.images.astype(np.float16).astype(np.float32))
        assert torch.equal(batch["images"][row], expected)
        assert torch.equal(batch["target"][row, 0], torch.from_numpy(e.target).float())
        centres = lesion_centres(e.target, LesionDecoder.CELL)
        assert torch.equal(batch["centres"][row, 0], torch.from_numpy(centres).float())
        assert int(batch["therapy"][row]) == CENTRES.therapies.index(e.therapy)
        assert float(batch["horizon"][row]) == e.horizon_weeks
    assert batch["brain"].shape == (2, 1, *CENTRES.crop_shape)


def test_bank_augmentation_drops_optional_sequences_and_the_therapy() -> None:
    bank = ExampleBank(_examples(4), CENTRES, torch.device("cpu"))
    always = replace(TrainConfig(), modality_dropout=1.0, condition_dropout=1.0)
    batch = bank.batch([0, 1, 2], always, np.random.default_rng(0), augment=True)
    n_seq = len(SEQUENCES)
    assert torch.all(batch["images"][:, 1:n_seq] == 0)
    assert torch.all(batch["flags"][:, 1:n_seq] == 0)
    assert torch.any(batch["images"][:, 0] != 0)  # FLAIR is never dropped
    assert torch.all(batch["therapy"] == len(CENTRES.therapies))  # the null token
    never = replace(TrainConfig(), modality_dropout=0.0, condition_dropout=0.0)
    kept = bank.batch([0], never, np.random.default_rng(0), augment=True)
    assert torch.any(kept["images"][:, 1] != 0)


def test_bank_random_crops_cut_images_and_targets_alike() -> None:
    config = replace(CENTRES, diffusion_target="mask", rate_offsets=False, global_summary=False)
    bank = ExampleBank(_examples(3, config), config, torch.device("cpu"))
    train = replace(TrainConfig(), train_crop=(8, 16, 8), modality_dropout=0.0)
    batch = bank.batch([0, 1], train, np.random.default_rng(1), augment=True)
    assert batch["images"].shape[2:] == (8, 16, 8)
    assert batch["target"].shape == batch["brain"].shape == (2, 1, 8, 16, 8)
    assert "centres" not in batch


@pytest.mark.slow
def test_time_budget_fits_the_run_and_records_it(small_cohort: Path, tmp_path: Path) -> None:
    from ms_forecast_node.forecast.train import train

    cfg = TrainConfig(
        steps=100_000,
        batch_size=2,
        checkpoint_every=10_000,
        validation_fraction=0.25,
        time_budget_s=4.0,
    )
    run = tmp_path / "run"
    train(small_cohort, run, CENTRES, cfg)
    state = json.loads((run / "state.json").read_text())
    # However fast the machine: the budget ends the run long before 100 000 steps, either at the
    # step count fitted after 25 measured steps or by the hard stop (slow or loaded machine).
    assert 1 <= state["step"] < 100_000
    if state["budget_total_steps"] is None:
        assert state["stopped_by_time_limit"]
    else:
        assert state["step"] >= 25
        assert state["stopped_by_time_limit"] or state["step"] == state["budget_total_steps"]
    assert (run / "model.safetensors").is_file()
