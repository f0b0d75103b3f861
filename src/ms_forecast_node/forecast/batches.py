"""Training batches drawn from examples stacked once.

Every example is stacked into one tensor bank when training starts (images in float16, as the
model-grid cache stores them, so nothing is lost) and its lesion-centre map is computed then,
not at every step. On a GPU the bank lives in device memory: a batch is an index gather, and
the step is not held up by host-side stacking and copies (about 120 MB per batch of 16).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from ms_forecast_node.forecast.config import (
    PRIOR_CHANNELS,
    PRIOR_FLAGS,
    SEQUENCES,
    ModelConfig,
    TrainConfig,
)
from ms_forecast_node.forecast.data import Example, brain_mask, lesion_centres
from ms_forecast_node.forecast.model import LesionDecoder

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


class ExampleBank:
    """Examples stacked on ``device``: images (N, C, D, H, W) float16, flags, targets (uint8),
    lesion-centre maps for centre models, therapy indices (the null token is added per batch)
    and horizons."""

    def __init__(self, examples: Sequence[Example], config: ModelConfig, device: torch.device):
        if not examples:
            raise ValueError("an example bank needs at least one example")
        self.config = config
        self.device = device
        index = {c: i for i, c in enumerate(config.therapies)}
        self.images = torch.from_numpy(
            np.stack([e.study.images.astype(np.float16) for e in examples])
        ).to(device)
        self.flags = torch.from_numpy(
            np.stack([e.study.flags for e in examples]).astype(np.float32)
        ).to(device)
        self.target = torch.from_numpy(np.stack([e.target for e in examples]).astype(np.uint8)).to(
            device
        )
        self.centres = (
            torch.from_numpy(
                np.stack([lesion_centres(e.target, LesionDecoder.CELL) for e in examples]).astype(
                    np.uint8
                )
            ).to(device)
            if config.centres
            else None
        )
        self.therapy = torch.tensor([index[e.therapy] for e in examples], dtype=torch.long)
        self.horizon = torch.tensor([e.horizon_weeks for e in examples], dtype=torch.float32)
        self.brain = torch.from_numpy(
            brain_mask(config.spacing_mm, config.crop_shape).astype(np.float32)
        ).to(device)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(
        self,
        indices: Sequence[int],
        train: TrainConfig,
        rng: np.random.Generator,
        augment: bool,
    ) -> dict[str, torch.Tensor]:
        """The batch of ``indices``. With ``augment``: modality dropout (FLAIR, channel 0, is
        required; the other sequences may be missing at inference), condition dropout to the
        null therapy token, and random crops when ``train.train_crop`` is set. The RNG is drawn
        in a fixed order, so a seeded run gives the same batches on any device."""
        n = len(indices)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        didx = idx.to(self.device)
        images = self.images.index_select(0, didx).float()
        flags = self.flags.index_select(0, didx).clone()
        therapy = self.therapy[idx].clone()
        if augment:
            keep = np.ones((n, len(SEQUENCES)), dtype=np.float32)
            for b in range(n):
                for s in range(1, len(SEQUENCES)):
                    if rng.random() < train.modality_dropout:
                        keep[b, s] = 0.0
                if rng.random() < train.condition_dropout:
                    therapy[b] = len(self.config.therapies)  # null token
            keep_t = torch.from_numpy(keep).to(self.device)
            images[:, : len(SEQUENCES)] *= keep_t[:, :, None, None, None]
            flags[:, : len(SEQUENCES)] *= keep_t
            if train.prior_dropout > 0:  # drawn only when on: older seeded runs stay identical
                drop = torch.from_numpy(rng.random(n) < train.prior_dropout).to(self.device)
                images[drop, PRIOR_CHANNELS] = 0.0
                flags[drop, PRIOR_FLAGS] = 0.0
        target = self.target.index_select(0, didx)[:, None].float()
        brain = self.brain[None, None].expand(n, 1, *self.brain.shape)
        if augment and train.train_crop is not None:
            images, target, brain = random_crops(images, target, brain, train.train_crop, rng)
        out = {
            "images": images.contiguous(),
            "flags": flags,
            "therapy": therapy.to(self.device),
            "horizon": self.horizon[idx].to(self.device),
            "target": target.contiguous(),
            "brain": brain.contiguous(),
        }
        if self.centres is not None:
            out["centres"] = self.centres.index_select(0, didx)[:, None].float()
        return out


def random_crops(
    images: ArrayT,
    target: ArrayT,
    brain: ArrayT,
    crop: tuple[int, int, int],
    rng: np.random.Generator,
) -> tuple[ArrayT, ArrayT, ArrayT]:
    """One random crop per example (numpy arrays or tensors, (B, C, D, H, W)). The crop position
    depends on nothing but the RNG, so the conditional distribution of the target given the
    inputs is the same as on the whole grid (the network is fully convolutional and sees the
    whole grid at inference)."""
    shape = tuple(images.shape[2:])
    if any(c > s or c % 8 for c, s in zip(crop, shape, strict=True)):
        raise ValueError(f"train_crop {crop} must be multiples of 8 within {shape}")
    out_i, out_t, out_b = [], [], []
    for b in range(images.shape[0]):
        st = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, crop, strict=True)]
        k, j, i = (slice(a, a + c) for a, c in zip(st, crop, strict=True))
        out_i.append(images[b, :, k, j, i])
        out_t.append(target[b, :, k, j, i])
        out_b.append(brain[b, :, k, j, i])
    if isinstance(images, np.ndarray):
        return np.stack(out_i), np.stack(out_t), np.stack(out_b)
    return torch.stack(out_i), torch.stack(out_t), torch.stack(out_b)


__all__ = ["ExampleBank", "random_crops"]
