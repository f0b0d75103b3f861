"""``ship-model``: the card and registry entry written for a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ms_forecast_node.forecast.card import ship_model
from ms_forecast_node.forecast.checkpoint import save_model, sha256_of
from ms_forecast_node.forecast.model import NET2Forecaster
from tests.forecast_cases import CENTRES


def _method(auc: float) -> dict[str, object]:
    return {
        "activity": {"auc": auc, "ece": 0.05, "accuracy": 0.7},
        "count": {"mae": 0.8, "spearman": 0.5},
        "counterfactual": {"ranking_agreement": 0.9},
    }


def _run(tmp_path: Path, weights_step: int, last_step: int, device: str | None) -> Path:
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_model(NET2Forecaster(CENTRES), run / "best.safetensors", {"step": weights_step})
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "cohort.json").write_text(
        json.dumps({"n_patients": 1400, "seed": 3000, "horizon_weeks": 48})
    )
    train = {
        "batch_size": 16,
        "learning_rate": 1e-4,
        "condition_dropout": 0.1,
        "modality_dropout": 0.2,
        "seed": 0,
    }
    config = {"train": train, "cohort": str(cohort)}
    if device is not None:
        config["device"] = device
    (run / "config.json").write_text(json.dumps(config))
    (run / "state.json").write_text(json.dumps({"step": last_step}))
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(
        json.dumps(
            {
                "cohort": "heldout",
                "n_patients": 100,
                "sampler": {"method": "dpmpp2m", "steps": 6, "samples": 8, "threshold": 0.5},
                "methods": {
                    "diffusion": {**_method(0.75), "ci95": {"activity_auc": [0.65, 0.84]}},
                    "oracle": _method(0.85),
                },
            }
        )
    )
    return run


def test_card_names_the_early_stopped_step_the_device_and_the_checksum(tmp_path: Path) -> None:
    run = _run(tmp_path, weights_step=900, last_step=2388, device="cuda (NVIDIA H200)")
    models = tmp_path / "models"
    target = ship_model(run / "best.safetensors", run, tmp_path / "report", models_dir=models)
    card = (models / f"{target.stem}.md").read_text()
    assert "NOT FOR DIAGNOSTIC USE" in card and "simulated" in card
    assert "weights of step 900 of 2388 (lowest validation loss)" in card
    assert "on cuda (NVIDIA H200)" in card
    assert "1400 simulated patients, seed 3000" in card
    assert sha256_of(target) in card
    assert "95 % bootstrap intervals over the 100 patients: activity AUC [0.650, 0.840]" in card
    registry = json.loads((models / "models.json").read_text())
    (entry,) = registry["models"]
    assert entry["default"] and entry["sha256"] == sha256_of(target)
    assert entry["sampler"]["steps"] == 6


def test_card_of_a_last_step_model_from_an_older_run(tmp_path: Path) -> None:
    """A run recorded before runs named their device was trained on the CPU."""
    run = _run(tmp_path, weights_step=800, last_step=800, device=None)
    models = tmp_path / "models"
    target = ship_model(run / "best.safetensors", run, tmp_path / "report", models_dir=models)
    card = (models / f"{target.stem}.md").read_text()
    assert "| training | 800 steps, batch 16" in card
    assert "on cpu" in card


def test_a_card_with_post_hoc_heads_binds_its_numbers_to_its_sampler(tmp_path: Path) -> None:
    run = _run(tmp_path, weights_step=800, last_step=800, device=None)
    models = tmp_path / "models"
    plain = ship_model(run / "best.safetensors", run, tmp_path / "report", models_dir=models)
    assert "post-hoc heads" not in (models / f"{plain.stem}.md").read_text()
    dispersion = {
        "sd_first_visit": 0.9,
        "sd_prior_visit": 0.45,
        "n_studies": 300,
        "log_likelihood_first_before": -412.8,
        "log_likelihood_first_after": -366.2,
        "log_likelihood_prior_before": -329.5,
        "log_likelihood_prior_after": -325.0,
    }
    headed = tmp_path / "headed.safetensors"
    save_model(NET2Forecaster(CENTRES), headed, {"rate_dispersion": dispersion})
    target = ship_model(headed, run, tmp_path / "report", models_dir=tmp_path / "headed")
    card = (tmp_path / "headed" / f"{target.stem}.md").read_text()
    assert "## Rate dispersion" in card
    assert "The post-hoc heads were fitted on the network's first-step marginal" in card
