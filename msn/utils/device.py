"""The compute device and precision: one place that says what runs where."""

from __future__ import annotations

import contextlib

import torch

from msn.config import ConfigError


def resolve_device(name: str, option: str = "device") -> torch.device:
    """``auto`` picks CUDA when available; asking for ``cuda`` without a GPU is an error naming ``option``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}=cuda but no CUDA device is available; use {option}=cpu or {option}=auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"{option}={name!r} is not allowed; choose one of auto, cpu, cuda")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None for fp32). Half precision is GPU-only here."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        raise ConfigError(f"precision={precision} needs a GPU (bf16/fp16 on CPU are very slow); use precision=fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing for full precision."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def configure_matmul(device: torch.device, tf32: bool) -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores on GPUs (PyTorch's default is full fp32).

    The original code ran on PyTorch versions whose default was TF32 on Ampere; bf16 autocast is unaffected.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
