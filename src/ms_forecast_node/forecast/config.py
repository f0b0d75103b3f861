"""Model, training and sampling configuration (YAML-loadable, stored inside every checkpoint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.simulate.therapies import therapy_codes

SEQUENCES = ("FLAIR", "T1", "T2", "PD")

# The layout of a study's tensors, written by ``data.prepare_study`` and read by name
# everywhere else.
# Image channels: the sequences, the current lesion mask, then the prior visit's lesion mask
# and FLAIR.
LESION_CHANNEL = len(SEQUENCES)
PRIOR_CHANNELS = slice(LESION_CHANNEL + 1, None)
# Flags: each sequence's availability, then the prior visit's availability, its interval
# (weeks / 48) and the prior-activity feature. The network reads the flags before the
# feature (``ModelConfig.n_flags``); only the prior-activity head reads the feature.
PRIOR_FLAG = len(SEQUENCES)
INTERVAL_FLAG = PRIOR_FLAG + 1
PRIOR_ACTIVITY_FLAG = INTERVAL_FLAG + 1
PRIOR_FLAGS = slice(PRIOR_FLAG, None)
SAMPLER_METHODS = ("dpmpp2m", "ddim", "ancestral", "ddpm")
# What the diffusion generates: the NET2 voxel mask itself (0.1.x), or the map of NET2 lesion
# centres on cells of 4×4×4 model-grid voxels, from which a deterministic decoder draws each
# lesion's voxels (0.3.x; see docs/forecaster.md).
DIFFUSION_TARGETS = ("mask", "centres")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "msfn-net2-diffusion"
    version: str = "0.1.0"
    spacing_mm: float = 2.0  # template grid spacing (CPU default); 1.0 for the GPU configuration
    crop_shape: tuple[int, int, int] = (72, 88, 72)  # k, j, i around the template brain centre
    therapies: tuple[str, ...] = field(default_factory=therapy_codes)
    encoder_channels: tuple[int, int, int] = (32, 64, 128)  # at 1/2, 1/4, 1/8 of the grid
    denoiser_channels: tuple[int, int, int] = (0, 64, 128)  # at 1/4 and 1/8 (first unused)
    embed_dim: int = 128
    timesteps: int = 1000
    deterministic: bool = False  # the non-generative baseline: same network, no noise input
    # A pooled whole-study summary vector in the condition (version 0.1.0, the shipped model).
    # Crop training (train_crop) needs it off: a crop's summary is not the whole study's.
    global_summary: bool = True
    horizon_range_weeks: tuple[float, float] = (24.0, 96.0)
    diffusion_target: str = "mask"  # one of DIFFUSION_TARGETS
    # Add a learned per-therapy scalar and log(horizon / 48 weeks) to the output logit: for rare
    # events the logit is the log rate, so a therapy then acts as one rate ratio shared by all
    # patients (as trials estimate it) and the expected count scales with the horizon.
    rate_offsets: bool = False
    # A prior-activity head: for a study with a prior visit, add ``a + b·log((n + 0.5) / (w/48))``
    # to the output logit, where ``n`` is the number of new and enlarging lesions between the
    # prior lesion mask and the current one and ``w`` the interval in weeks. Past activity is a
    # rate, so it acts on the log rate; ``a, b`` are fitted by maximum likelihood on a training
    # cohort (``ms-forecast-node fit-prior-head``).
    prior_activity_head: bool = False
    # The head's pseudo-count: ``a + b·log((n + c) / (w/48))`` with ``c`` fitted too (stored as
    # log c) instead of 0.5. A gamma–Poisson posterior of the rate has this shape; it shrinks
    # patients without interval lesions less (benchmarks/prior_head_forms.py).
    prior_activity_pseudocount: bool = False
    # Rate dispersion (forecast/rate_dispersion.py): each sample's cell logits get their own
    # log-rate shift ``s·ε − s²/2``, ε ~ N(0, 1), so the samples spread over the rates a patient
    # who looks like this one may have; ``s`` (first visits, studies with a prior visit) is
    # fitted by maximum likelihood (``fit-prior-head --dispersion``).
    rate_dispersion: bool = False
    # The site head (forecast/site_head.py): a learned per-voxel reader of pre-lesional change
    # moves each centre cell's logit by ``α + β·(its best site score)`` and the decoder's
    # appearance by ``γ·score``, so forecast lesions are drawn where the images announce them
    # (``ms-forecast-node fit-site-head``).
    site_head: bool = False

    def __post_init__(self) -> None:
        if self.diffusion_target not in DIFFUSION_TARGETS:
            raise ConfigurationError(
                f"model diffusion_target {self.diffusion_target!r} is not one of "
                f"{', '.join(DIFFUSION_TARGETS)}"
            )

    @property
    def centres(self) -> bool:
        return self.diffusion_target == "centres"

    @property
    def n_image_channels(self) -> int:
        # four sequences, current lesion mask, prior-visit lesion mask and prior FLAIR
        return LESION_CHANNEL + 3

    @property
    def n_flags(self) -> int:
        # the flags the network reads: every one before the prior-activity feature
        return PRIOR_ACTIVITY_FLAG


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 2
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    condition_dropout: float = 0.1  # therapy -> null token, for classifier-free guidance
    modality_dropout: float = 0.2  # per optional sequence
    # Share of training studies with a prior visit that are shown without it (channels and flags
    # zeroed), so the model also forecasts well for a first visit.
    prior_dropout: float = 0.0
    # BCE weight of NET2 voxels. Training adds log(positive_weight) to the logit inside the loss,
    # so the network's own output stays a calibrated logit at any weight (see train.py).
    positive_weight: float = 1.0
    # Train on random crops of the model grid (k, j, i; multiples of 8); None = whole grid.
    train_crop: tuple[int, int, int] | None = None
    # Share of training draws of the diffusion time taken from the noisiest 20 % of steps,
    # where the network (not the built-in evidence term) carries the forecast; the rest uniform.
    high_noise_share: float = 0.0
    validation_fraction: float = 0.1
    checkpoint_every: int = 250
    keep_last_checkpoints: int = 0  # copies in <run>/snapshots for average_checkpoints
    log_every: int = 25
    num_threads: int = 0  # 0: torch default
    # Weights to start from: every tensor whose name and shape match is copied (e.g. the study
    # encoder of a model trained on the same cohort); the rest keeps its initialisation.
    init_from: str | None = None
    decoder_weight: float = 1.0  # centre models: weight of the lesion-extent decoder's BCE
    # Wall-clock budget in seconds (0: none). After 25 steps the run measures its step rate and
    # lowers ``steps`` to what fits, so the learning-rate schedule still completes; a hard stop
    # at the budget keeps the weights learnt so far (state.json says so).
    time_budget_s: float = 0.0


@dataclass(frozen=True)
class SamplerConfig:
    # "dpmpp2m" or "ddim" (few-step ODE solvers), "ancestral" (few-step, draws the clean mask at
    # every step: keeps rare events at any step count, see diffusion.ancestral_sample) or
    # "ddpm" (the reference: ancestral over all training steps with the posterior mean)
    method: str = "ddim"
    steps: int = 8
    samples: int = 8
    guidance_scale: float = 1.0  # 1.0: conditional only (no extra unconditional pass)
    threshold: float = 0.5  # probability threshold of the binary forecast mask
    # Smallest component counted as a lesion (at 2 mm one voxel is 8 mm³, a 2.5 mm sphere).
    # 2 (16 mm³, the usual "at least 3 mm" rule) removes the single-voxel speckle of the 0.2.0
    # experiment; 1 is what the shipped 0.1.0 model was evaluated with.
    min_lesion_voxels: int = 1
    chunk_size: int = 8  # trajectories (network passes) per network call (bounds peak memory)
    seed: int = 0
    # Ancestral sampler only: masks drawn from each trajectory's last-step probabilities. Each
    # draw is an exact sample given its trajectory, so ``samples`` masks cost
    # ``ceil(samples / draws_per_pass)`` network passes. At one step the trajectory is pure
    # noise, which an x0-predicting network all but ignores, so the draws are nearly
    # independent: more samples (less Monte Carlo noise in counts and probability of
    # activity) for the same network time.
    draws_per_pass: int = 1

    def __post_init__(self) -> None:
        if self.method not in SAMPLER_METHODS:
            raise ConfigurationError(
                f"sampler method {self.method!r} is not one of {', '.join(SAMPLER_METHODS)}"
            )
        if self.steps < 1 or self.samples < 1:
            raise ConfigurationError("sampler steps and samples must be at least 1")
        if self.draws_per_pass < 1:
            raise ConfigurationError("sampler draws_per_pass must be at least 1")
        if self.draws_per_pass > 1 and self.method != "ancestral":
            raise ConfigurationError(
                "sampler draws_per_pass > 1 needs the ancestral sampler (the others end on a "
                "deterministic mask, so every draw would be the same)"
            )


def _coerce(cls: type, raw: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigurationError(f"{where}: unknown keys {unknown}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        values[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc


def load_configs(path: Path | None) -> tuple[ModelConfig, TrainConfig, SamplerConfig]:
    """Read ``model:``, ``train:`` and ``sampler:`` sections of a YAML file (all optional)."""
    if path is None:
        return ModelConfig(), TrainConfig(), SamplerConfig()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{path}: expected a mapping")
    unknown = sorted(set(raw) - {"model", "train", "sampler"})
    if unknown:
        raise ConfigurationError(f"{path}: unknown sections {unknown}")
    return (
        _coerce(ModelConfig, raw.get("model") or {}, f"{path} model"),
        _coerce(TrainConfig, raw.get("train") or {}, f"{path} train"),
        _coerce(SamplerConfig, raw.get("sampler") or {}, f"{path} sampler"),
    )


def config_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    return _coerce(ModelConfig, raw, "checkpoint model config")


__all__ = [
    "DIFFUSION_TARGETS",
    "SEQUENCES",
    "ModelConfig",
    "SamplerConfig",
    "TrainConfig",
    "config_dict",
    "load_configs",
    "model_config_from_dict",
]
