"""``ms-forecast-node train``: fit the forecaster on a cohort (simulated or real).

Seeded and resumable: every ``checkpoint_every`` steps the run folder receives
``model.safetensors`` (weights + config), ``optimizer.pt`` and ``state.json`` (step, losses,
RNG states); a new call with the same folder continues from there. Loss curves go to
``loss.png``. Mixed precision (bf16 autocast) is used on CUDA. ``best.safetensors`` keeps the
checkpoint with the lowest validation loss (early stopping), and ``train.time_budget_s`` fits
the run to a wall-clock budget.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ms_forecast_node.errors import ConfigurationError
from ms_forecast_node.forecast.batches import ExampleBank
from ms_forecast_node.forecast.checkpoint import load_model, save_model
from ms_forecast_node.forecast.config import ModelConfig, TrainConfig, config_dict
from ms_forecast_node.forecast.data import load_examples
from ms_forecast_node.forecast.device import autocast, describe, pick_device, synchronize
from ms_forecast_node.forecast.diffusion import Schedule
from ms_forecast_node.forecast.model import NET2Forecaster

log = logging.getLogger(__name__)


def sample_timesteps(
    b: int, timesteps: int, high_noise_share: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Diffusion times for a batch: uniform, with ``high_noise_share`` of the draws from the
    noisiest 20 % of steps. There the evidence term of x_t is weak and the network's own
    estimate of each voxel's probability decides the forecast (calibration, counts), so those
    steps get more of the training budget. Each t is its own x0-regression problem, so this
    reweighting changes where capacity goes, not what the optimum is."""
    uniform = torch.randint(0, timesteps, (b,), generator=generator)
    high = torch.randint(int(0.8 * timesteps), timesteps, (b,), generator=generator)
    pick = torch.rand((b,), generator=generator) < high_noise_share
    return torch.where(pick, high, uniform)


def loss_on_batch(
    model: NET2Forecaster,
    schedule: Schedule,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator | None,
    positive_weight: float = 1.0,
    high_noise_share: float = 0.0,
    decoder_weight: float = 1.0,
) -> torch.Tensor:
    """BCE of the clean-mask logit at a random diffusion time (brain voxels only).

    NET2 voxels are rare (about 1e-4 of the brain), so their gradient is weighted by
    ``positive_weight``. For BCE with positive weight *w* the optimal logit is
    ``logit(p) + log w``; adding ``log w`` to the network's logit inside the loss therefore
    keeps the network's own output calibrated (``logit(p)``) while the rare voxels weigh more.
    """
    if model.config.centres:
        return centre_loss_on_batch(
            model, schedule, batch, generator, positive_weight, high_noise_share, decoder_weight
        )
    target = batch["target"]
    weight_mask = batch["brain"]
    b = target.shape[0]
    device = target.device
    encoded = model.encoder(batch["images"], batch["flags"])
    if model.config.deterministic:
        x_t = torch.zeros_like(target)
        t = torch.full((b,), schedule.timesteps - 1, dtype=torch.long, device=device)
    else:
        t = sample_timesteps(b, schedule.timesteps, high_noise_share, generator).to(device)
        noise = torch.randn(target.shape, generator=generator, device="cpu").to(device)
        x_t = schedule.q_sample(target * 2 - 1, t, noise)
    logit = model.denoiser(x_t, t, batch["therapy"], batch["horizon"], encoded)
    loss = calibrated_weighted_bce(logit.float(), target, positive_weight)
    return (loss * weight_mask).sum() / weight_mask.sum()


def centre_loss_on_batch(
    model: NET2Forecaster,
    schedule: Schedule,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator | None,
    positive_weight: float = 1.0,
    high_noise_share: float = 0.0,
    decoder_weight: float = 1.0,
) -> torch.Tensor:
    """Centre models: diffusion BCE of the lesion-centre map over brain cells, plus the
    decoder's BCE over the voxels near the true centres (teacher forcing: the decoder learns
    the extent of a lesion given where it arises)."""
    assert model.decoder is not None
    centres = batch["centres"]
    cell = model.decoder.CELL
    brain_cells = F.max_pool3d(batch["brain"], cell, stride=cell)
    b = centres.shape[0]
    encoded = model.encoder(batch["images"], batch["flags"])
    t = sample_timesteps(b, schedule.timesteps, high_noise_share, generator).to(centres.device)
    noise = torch.randn(centres.shape, generator=generator, device="cpu").to(centres.device)
    x_t = schedule.q_sample(centres * 2 - 1, t, noise)
    logit = model.denoiser(x_t, t, batch["therapy"], batch["horizon"], encoded)
    loss = calibrated_weighted_bce(logit.float(), centres, positive_weight)
    loss = (loss * brain_cells).sum() / brain_cells.sum()
    assert encoded.appearance is not None
    near = model.decoder.support(centres).float()
    if decoder_weight > 0 and float(near.sum()) > 0:
        voxel_logit = model.decoder.logits(centres, encoded.appearance).float()
        voxel_loss = F.binary_cross_entropy_with_logits(
            voxel_logit, batch["target"], reduction="none"
        )
        loss = loss + decoder_weight * (voxel_loss * near).sum() / near.sum()
    return loss


def calibrated_weighted_bce(
    logit: torch.Tensor, target: torch.Tensor, positive_weight: float
) -> torch.Tensor:
    """Per-voxel BCE with positives weighted by *w*, evaluated at ``logit + log w``.

    The minimiser of weighted BCE is ``log(w·p / (1 − p))``; shifting by ``log w`` inside the
    loss makes ``logit`` itself converge to ``log(p / (1 − p))``, so the extra weight changes
    the gradient's emphasis, not the calibration of the trained network."""
    pos_weight = torch.tensor(positive_weight, device=logit.device)
    return F.binary_cross_entropy_with_logits(
        logit + math.log(positive_weight), target, reduction="none", pos_weight=pos_weight
    )


def initialise_from(model: NET2Forecaster, weights: Path) -> int:
    """Copy every tensor of ``weights`` whose name and shape match ``model``'s; return how many
    were copied (the rest keeps its initialisation)."""
    source = load_model(weights).state_dict()
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ConfigurationError(f"init_from {weights}: no tensor matches this model")
    own.update(matched)
    model.load_state_dict(own)
    return len(matched)


def _plot(
    history: dict[str, list[list[float]]], path: Path, ylabel: str = "BCE per brain voxel"
) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, values = zip(*history["train"], strict=True)
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[: len(smooth)], smooth, label="train (moving average)")
    if history["val"]:
        steps, values = zip(*history["val"], strict=True)
        ax.plot(steps, values, "o-", label="validation")
        best = int(np.argmin(values))
        ax.plot([steps[best]], [values[best]], "*", ms=14, label=f"best (step {int(steps[best])})")
    ax.set_xlabel("step")
    # The loss's description is too long for a vertical axis label: it goes in the title.
    ax.set_title(ylabel, fontsize=9)
    ax.set_ylabel("loss")
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
    if train_config.train_crop is not None and model_config.global_summary:
        raise ConfigurationError(
            "train_crop needs model.global_summary: false (a crop's pooled summary is not the "
            "whole study's, so crop training and whole-grid inference would disagree)"
        )
    device = pick_device()
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN time its 3D convolution algorithms once and keep the best.
        torch.backends.cudnn.benchmark = True
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
    val = ExampleBank([examples[i] for i in order[:n_val]], model_config, device)
    trn = ExampleBank([examples[i] for i in order[n_val:]], model_config, device)
    del examples  # the banks hold what training needs

    torch.manual_seed(train_config.seed)
    model = NET2Forecaster(model_config).to(device)
    if train_config.init_from:
        copied = initialise_from(model, Path(train_config.init_from))
        log.info("initialised %d tensors from %s", copied, train_config.init_from)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_config.learning_rate, weight_decay=train_config.weight_decay
    )
    step = 0
    planned_total: int | None = None
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
        # A schedule fitted to a time budget stays fitted when the run resumes.
        planned_total = state.get("budget_total_steps") if train_config.time_budget_s else None
        rng = np.random.default_rng([train_config.seed, step])
        generator = torch.Generator().manual_seed(train_config.seed * 1_000_003 + step)
        log.info("resuming %s at step %d", run_dir, step)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "model": config_dict(model_config),
                "train": config_dict(train_config),
                "cohort": str(cohort),
                "device": describe(device),
            },
            indent=2,
        )
    )
    schedule = Schedule(model_config.timesteps)
    total = int(planned_total) if planned_total else train_config.steps
    warmup = min(200, train_config.steps // 10)
    stopped_by_time = False

    def lr_at(s: int) -> float:
        if s < warmup:
            return train_config.learning_rate * (s + 1) / warmup
        progress = (s - warmup) / max(1, total - warmup)
        return train_config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def best_so_far() -> tuple[int, float] | None:
        if not history["val"]:
            return None
        best_step, best_val = min(history["val"], key=lambda sv: sv[1])
        return int(best_step), float(best_val)

    def checkpoint() -> None:
        save_model(model, weights, {"step": step, "cohort": str(cohort)})
        best = best_so_far()
        if best is not None and best[0] == step:
            # The weights with the lowest validation loss so far, for early stopping: on a
            # few hundred patients a long run overfits (docs/evaluation/gpu-h200).
            shutil.copyfile(weights, run_dir / "best.safetensors")
        if train_config.keep_last_checkpoints > 0:
            # Copies for weight averaging (average_checkpoints); only the newest are kept.
            snapshots = run_dir / "snapshots"
            snapshots.mkdir(exist_ok=True)
            shutil.copyfile(weights, snapshots / f"step-{step:07d}.safetensors")
            for old in sorted(snapshots.glob("step-*.safetensors"))[
                : -train_config.keep_last_checkpoints
            ]:
                old.unlink()
        torch.save(optimizer.state_dict(), run_dir / "optimizer.pt")
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "step": step,
                    "total_steps": total,
                    "budget_total_steps": planned_total,
                    "configured_steps": train_config.steps,
                    "stopped_by_time_limit": stopped_by_time,
                    "best_validation": best_so_far(),
                    "history": history,
                }
            )
        )
        tmp.replace(state_path)
        _plot(
            history,
            run_dir / "loss.png",
            "centre BCE per brain cell + decoder BCE per voxel near a centre"
            if model_config.centres
            else "BCE per brain voxel",
        )

    def validate() -> float:
        model.eval()
        losses = []
        vgen = torch.Generator().manual_seed(12345)
        vrng = np.random.default_rng(12345)
        with torch.no_grad(), autocast(device):
            for i in range(0, len(val), train_config.batch_size):
                chunk = range(i, min(len(val), i + train_config.batch_size))
                batch = val.batch(chunk, train_config, vrng, augment=False)
                losses.append(
                    float(
                        loss_on_batch(
                            model,
                            schedule,
                            batch,
                            vgen,
                            train_config.positive_weight,
                            train_config.high_noise_share,
                            train_config.decoder_weight,
                        )
                    )
                )
        model.train()
        return float(np.mean(losses))

    model.train()
    bar = tqdm(total=total, initial=step, desc="training", unit="step")
    start = time.perf_counter()
    first_step = step
    budget = train_config.time_budget_s
    calibrate_at = (first_step + 5, first_step + 25)
    calibration_start = start
    while step < total:
        if budget > 0 and step == calibrate_at[0]:
            synchronize(device)
            calibration_start = time.perf_counter()
        if budget > 0 and step == calibrate_at[1] and planned_total is None:
            # Fit the run to the wall-clock budget from the measured step rate (after a few
            # warm-up steps); 10 % is kept for validation and checkpoints. Recorded in
            # state.json, so a resumed run keeps the same schedule.
            synchronize(device)
            rate = (calibrate_at[1] - calibrate_at[0]) / (time.perf_counter() - calibration_start)
            left = budget - (time.perf_counter() - start)
            total = max(step + 1, min(train_config.steps, step + int(0.9 * rate * left)))
            planned_total = total
            bar.total = total
            log.info("time budget %.0f s: %.2f steps/s, training %d steps", budget, rate, total)
        if budget > 0 and time.perf_counter() - start > budget:
            # A hard stop in case the rate changed: keep what was learnt, say so in state.json.
            stopped_by_time = True
            log.warning("time budget of %.0f s spent at step %d of %d", budget, step, total)
            history["val"].append([step, validate()])
            checkpoint()
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        chunk = rng.choice(len(trn), train_config.batch_size, replace=False).tolist()
        batch = trn.batch(chunk, train_config, rng, augment=True)
        with autocast(device):
            loss = loss_on_batch(
                model,
                schedule,
                batch,
                generator,
                train_config.positive_weight,
                train_config.high_noise_share,
                train_config.decoder_weight,
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


__all__ = [
    "calibrated_weighted_bce",
    "centre_loss_on_batch",
    "initialise_from",
    "loss_on_batch",
    "pick_device",
    "sample_timesteps",
    "train",
]
