"""The shipped default model: located through ``data/models/models.json`` and checksum-verified."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.checkpoint import ModelLoadError, load_model
from ms_forecast_node.forecast.config import SamplerConfig
from ms_forecast_node.forecast.model import NET2Forecaster

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
REGISTRY = MODELS_DIR / "models.json"
# Samples per therapy for a model whose registry entry records none (those before 0.6.2).
DEFAULT_SAMPLES = 8


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    file: Path
    sha256: str
    card: Path
    default: bool
    # The sampler settings the model was evaluated with (method, steps, threshold, minimum
    # lesion size): its card's numbers hold for these, so production uses them by default.
    sampler: dict[str, Any] = field(default_factory=dict)


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
                sampler=dict(m.get("sampler") or {}),
            )
            for m in raw["models"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"model registry {registry} is malformed: {exc}") from exc


def entry_for_weights(weights: Path, registry: Path = REGISTRY) -> ModelEntry | None:
    """The registry entry of these weights when they are a packaged model's file, else None."""
    target = weights.resolve()
    return next((m for m in registered_models(registry) if m.file.resolve() == target), None)


def default_entry(registry: Path = REGISTRY) -> ModelEntry:
    entries = [m for m in registered_models(registry) if m.default]
    if len(entries) != 1:
        raise ModelLoadError(f"{registry}: expected exactly one default model, got {len(entries)}")
    return entries[0]


def model_sampler(
    entry: ModelEntry | None,
    samples: int | None,
    seed: int,
    steps: int | None = None,
    method: str | None = None,
) -> SamplerConfig:
    """The sampler for production: the model's evaluated settings (``entry.sampler``), with the
    site's seed, and ``samples`` / ``steps`` / ``method`` only when a site sets them (None:
    the evaluated ones; a model that records no number of samples gets
    :data:`DEFAULT_SAMPLES`)."""
    known = {f.name for f in fields(SamplerConfig)} - {"samples", "seed", "chunk_size"}
    recorded = entry.sampler if entry else {}
    evaluated = {k: v for k, v in recorded.items() if k in known}
    if samples is None:
        samples = int(recorded.get("samples", DEFAULT_SAMPLES))
    try:
        config = replace(SamplerConfig(**evaluated), samples=samples, seed=seed)
        if steps is not None:
            config = replace(config, steps=steps)
        if method is not None:
            # Several draws per pass are an ancestral-sampler device; the others end on one
            # deterministic mask per trajectory.
            draws = config.draws_per_pass if method == "ancestral" else 1
            config = replace(config, method=method, draws_per_pass=draws)
    except TypeError as exc:
        raise ConfigurationError(f"model sampler settings: {exc}") from exc
    changed = [
        f"{k} {recorded[k]} -> {getattr(config, k)}"
        for k in ("method", "steps")
        if k in recorded and getattr(config, k) != recorded[k]
    ]
    if entry is not None and changed:
        # The card's numbers (calibration included) were measured with the evaluated sampler.
        # Others draw another distribution: 10 ancestral steps give 0.7.0's quiet patients
        # fewer lesions and its active ones more (benchmarks/sampler_steps.py).
        log.warning(
            "model %s %s runs with a sampler it was not evaluated with (%s): its card's "
            "numbers, calibration included, do not apply; leave the sampler settings unset",
            entry.name,
            entry.version,
            ", ".join(changed),
        )
    return config


def load_default_model(
    registry: Path = REGISTRY, device: str | torch.device = "cpu"
) -> tuple[NET2Forecaster, ModelEntry]:
    """The shipped model, verified against the sha256 recorded in the registry."""
    entry = default_entry(registry)
    return load_model(entry.file, expected_sha256=entry.sha256, device=device), entry
