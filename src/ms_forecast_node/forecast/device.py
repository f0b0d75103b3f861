"""Device choice and mixed precision: CUDA with bf16 autocast when present, else the CPU."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU; otherwise the named device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; nothing on the CPU (fp32 is faster there on common CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(device: torch.device) -> str:
    """The device in words for run records and model cards, e.g. ``cuda (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so host clocks time it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
