"""Tiny model configurations shared by the forecaster tests (fast on a CPU)."""

from __future__ import annotations

from dataclasses import replace

from ms_forecast_node.forecast.config import ModelConfig

# A voxel-mask diffusion model on a 16×24×16 crop of the 2 mm grid.
TINY = ModelConfig(
    crop_shape=(16, 24, 16),
    encoder_channels=(8, 16, 16),
    denoiser_channels=(0, 16, 16),
    embed_dim=32,
    timesteps=50,
)
# The same network diffusing lesion centres, with per-therapy rate offsets (the 0.3.x design).
CENTRES = replace(TINY, diffusion_target="centres", rate_offsets=True)
