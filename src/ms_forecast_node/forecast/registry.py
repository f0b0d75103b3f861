"""The shipped default model: located through ``data/models/models.json`` and checksum-verified."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ms_forecast_node.forecast.checkpoint import ModelLoadError, load_model
from ms_forecast_node.forecast.model import NET2Forecaster

MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
REGISTRY = MODELS_DIR / "models.json"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    file: Path
    sha256: str
    card: Path
    default: bool


def registered_models(registry: Path = REGISTRY) -> list[ModelEntry]:
    if not registry.is_file():
        raise ModelLoadError(f"model registry not found: {registry}")
    try:
        raw = json.loads(registry.read_text(encoding="utf-8"))
        return [
            ModelEntry(
                name=str(m["name"]),
                version=str(m["version"]),
                file=registry.parent / str(m["file"]),
                sha256=str(m["sha256"]),
                card=registry.parent / str(m["card"]),
                default=bool(m.get("default", False)),
            )
            for m in raw["models"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"model registry {registry} is malformed: {exc}") from exc


def default_entry(registry: Path = REGISTRY) -> ModelEntry:
    entries = [m for m in registered_models(registry) if m.default]
    if len(entries) != 1:
        raise ModelLoadError(f"{registry}: expected exactly one default model, got {len(entries)}")
    return entries[0]


def load_default_model(
    registry: Path = REGISTRY, device: str | torch.device = "cpu"
) -> tuple[NET2Forecaster, ModelEntry]:
    """The shipped model, verified against the sha256 recorded in the registry."""
    entry = default_entry(registry)
    return load_model(entry.file, expected_sha256=entry.sha256, device=device), entry
