"""``ms-forecast-node train``: fit the forecaster on a cohort (simulated or real).

Seeded and resumable: every ``checkpoint_every`` steps the run folder receives
``model.safetensors`` (weights + config), ``optimizer.pt`` and ``state.json`` (step, losses,
RNG states); a new call with the same folder continues from there. Loss curves go to
``loss.png``. Mixed precision (bf16 autocast) is used on CUDA.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ms_forecast_node.forecast.checkpoint import load_model, save_model
from ms_forecast_node.forecast.config import (
    SEQUENCES,
    ModelConfig,
    TrainConfig,
    config_dict,
)
from ms_forecast_node.forecast.data import Example, brain_mask, load_examples
from ms_forecast_node.forecast.device import autocast, pick_device
from ms_forecast_node.forecast.diffusion import Schedule
from ms_forecast_node.forecast.model import NET2Forecaster

log = logging.getLogger(__name__)


def _batch(
    examples: list[Example],
    config: ModelConfig,
    train: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
    augment: bool,
) -> dict[str, torch.Tensor]:
    therapy_index = {c: i for i, c in enumerate(config.therapies)}
    images = np.stack([e.study.images for e in examples]).astype(np.float32)
    flags = np.stack([e.study.flags for e in examples]).astype(np.float32)
    therapy = np.array([therapy_index[e.therapy] for e in examples])
    if augment:
        for b in range(len(examples)):
            # FLAIR (channel 0) is required; the other sequences may be missing at inference.
            for s in range(1, len(SEQUENCES)):
                if rng.random() < train.modality_dropout:
                    images[b, s] = 0.0
                    flags[b, s] = 0.0
            if rng.random() < train.condition_dropout:
                therapy[b] = len(config.therapies)  # null token
    target = np.stack([e.target for e in examples]).astype(np.float32)[:, None]
    return {
        "images": torch.from_numpy(images).to(device),
        "flags": torch.from_numpy(flags).to(device),
        "therapy": torch.from_numpy(therapy).long().to(device),
        "horizon": torch.tensor([e.horizon_weeks for e in examples], device=device),
        "target": torch.from_numpy(target).to(device),
    }


def loss_on_batch(
    model: NET2Forecaster,
    schedule: Schedule,
    batch: dict[str, torch.Tensor],
    weight_mask: torch.Tensor,
    generator: torch.Generator | None,
    positive_weight: float = 1.0,
) -> torch.Tensor:
    """BCE of the clean-mask logit at a random diffusion time (brain voxels only)."""
    target = batch["target"]
    b = target.shape[0]
    device = target.device
    encoded = model.encoder(batch["images"], batch["flags"])
    if model.config.deterministic:
        x_t = torch.zeros_like(target)
        t = torch.full((b,), schedule.timesteps - 1, dtype=torch.long, device=device)
    else:
        t = torch.randint(0, schedule.timesteps, (b,), generator=generator, device="cpu").to(device)
        noise = torch.randn(target.shape, generator=generator, device="cpu").to(device)
        x_t = schedule.q_sample(target * 2 - 1, t, noise)
    logit = model.denoiser(x_t, t, batch["therapy"], batch["horizon"], encoded)
    pos_weight = torch.tensor(positive_weight, device=device)
    loss = F.binary_cross_entropy_with_logits(
        logit.float(), target, reduction="none", pos_weight=pos_weight
    )
    return (loss * weight_mask).sum() / (weight_mask.sum() * b)


def _plot(history: dict[str, list[list[float]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, values = zip(*history["train"], strict=True)
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[: len(smooth)], smooth, label="train (moving average)")
    if history["val"]:
        steps, values = zip(*history["val"], strict=True)
        ax.plot(steps, values, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("BCE per brain voxel")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    cohort: Path,
    run_dir: Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    limit: int | None = None,
) -> Path:
    """Train (or resume) into ``run_dir``; returns the path of the final weights."""
    device = pick_device()
    if train_config.num_threads > 0:
        torch.set_num_threads(train_config.num_threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    weights = run_dir / "model.safetensors"
    examples = load_examples(cohort, model_config, limit=limit)
    rng_split = random.Random(train_config.seed)
    order = list(range(len(examples)))
    rng_split.shuffle(order)
    n_val = max(1, int(len(examples) * train_config.validation_fraction))
    val = [examples[i] for i in order[:n_val]]
    trn = [examples[i] for i in order[n_val:]]

    torch.manual_seed(train_config.seed)
    model = NET2Forecaster(model_config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_config.learning_rate, weight_decay=train_config.weight_decay
    )
    step = 0
    history: dict[str, list[list[float]]] = {"train": [], "val": []}
    rng = np.random.default_rng(train_config.seed)
    generator = torch.Generator().manual_seed(train_config.seed)
    if state_path.is_file() and weights.is_file():
        state = json.loads(state_path.read_text())
        model = load_model(weights, device=device)
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=train_config.learning_rate,
            weight_decay=train_config.weight_decay,
        )
        optimizer.load_state_dict(torch.load(run_dir / "optimizer.pt", map_location=device))
        step = int(state["step"])
        history = state["history"]
        rng = np.random.default_rng([train_config.seed, step])
        generator = torch.Generator().manual_seed(train_config.seed * 1_000_003 + step)
        log.info("resuming %s at step %d", run_dir, step)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "model": config_dict(model_config),
                "train": config_dict(train_config),
                "cohort": str(cohort),
            },
            indent=2,
        )
    )
    schedule = Schedule(model_config.timesteps)
    brain = torch.from_numpy(
        brain_mask(model_config.spacing_mm, model_config.crop_shape).astype(np.float32)
    ).to(device)[None, None]
    total = train_config.steps
    warmup = min(200, total // 10)

    def lr_at(s: int) -> float:
        if s < warmup:
            return train_config.learning_rate * (s + 1) / warmup
        progress = (s - warmup) / max(1, total - warmup)
        return train_config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def checkpoint() -> None:
        save_model(model, weights, {"step": step, "cohort": str(cohort)})
        torch.save(optimizer.state_dict(), run_dir / "optimizer.pt")
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "history": history}))
        tmp.replace(state_path)
        _plot(history, run_dir / "loss.png")

    def validate() -> float:
        model.eval()
        losses = []
        vgen = torch.Generator().manual_seed(12345)
        vrng = np.random.default_rng(12345)
        with torch.no_grad(), autocast(device):
            for i in range(0, len(val), train_config.batch_size):
                chunk = val[i : i + train_config.batch_size]
                batch = _batch(chunk, model_config, train_config, vrng, device, augment=False)
                losses.append(float(loss_on_batch(model, schedule, batch, brain, vgen)))
        model.train()
        return float(np.mean(losses))

    model.train()
    bar = tqdm(total=total, initial=step, desc="training", unit="step")
    start = time.perf_counter()
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        chunk = [trn[i] for i in rng.choice(len(trn), train_config.batch_size, replace=False)]
        batch = _batch(chunk, model_config, train_config, rng, device, augment=True)
        with autocast(device):
            loss = loss_on_batch(
                model, schedule, batch, brain, generator, train_config.positive_weight
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        history["train"].append([step, float(loss.detach())])
        bar.update()
        if step % train_config.log_every == 0:
            bar.set_postfix(loss=f"{np.mean([v for _, v in history['train'][-25:]]):.4g}")
        if step % train_config.checkpoint_every == 0 or step == total:
            history["val"].append([step, validate()])
            checkpoint()
    bar.close()
    log.info("trained %d steps in %.0f s; weights: %s", step, time.perf_counter() - start, weights)
    return weights


__all__ = ["loss_on_batch", "pick_device", "train"]
