"""safetensors checkpoints with their configuration, and checksum-verified loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ms_forecast_node.errors import MSForecastError
from ms_forecast_node.forecast.config import ModelConfig, config_dict, model_config_from_dict
from ms_forecast_node.forecast.model import NET2Forecaster


class ModelLoadError(MSForecastError):
    """The model file is missing, corrupt or does not match its recorded checksum."""

    reason = "model_unavailable"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: NET2Forecaster, path: Path, extra: dict[str, Any] | None = None) -> str:
    """Write weights + config (as safetensors metadata) atomically; return the file's sha256."""
    metadata = {
        "format": "ms-forecast-node-model",
        "model_config": json.dumps(config_dict(model.config)),
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return sha256_of(path)


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def load_model(
    path: Path, expected_sha256: str | None = None, device: str | torch.device = "cpu"
) -> NET2Forecaster:
    """Load a model file; with ``expected_sha256`` the checksum must match."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise ModelLoadError(
                f"model file {path} is corrupt or replaced: sha256 {actual} != {expected_sha256}",
                reason="model_checksum_mismatch",
            )
    try:
        meta = read_metadata(path)
        config: ModelConfig = model_config_from_dict(json.loads(meta["model_config"]))
        state = load_file(str(path), device=str(device))
        model = NET2Forecaster(config)
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"cannot load model {path}: {exc}") from exc
    model.eval()
    return model.to(device)


def average_checkpoints(paths: list[Path], out: Path, extra: dict[str, Any] | None = None) -> str:
    """Average the weights of several checkpoints of one run (stochastic weight averaging over
    the last checkpoints of a cosine schedule: a flatter, better-calibrated solution for the
    cost of a few file reads). All must share one configuration; returns the sha256 of ``out``."""
    if not paths:
        raise ModelLoadError("no checkpoints to average")
    models = [load_model(p) for p in paths]
    config = models[0].config
    if any(m.config != config for m in models[1:]):
        raise ModelLoadError("checkpoints to average have different model configurations")
    states = [m.state_dict() for m in models]
    averaged = {
        key: torch.stack([s[key].float() for s in states]).mean(dim=0).to(states[0][key].dtype)
        for key in states[0]
    }
    model = NET2Forecaster(config)
    model.load_state_dict(averaged)
    info = {"averaged_from": [p.name for p in paths], **(extra or {})}
    return save_model(model, out, info)
