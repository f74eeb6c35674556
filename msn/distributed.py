"""Thin helpers over ``torch.distributed`` that degrade to single-process no-ops."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no autograd); identity in a single process."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _AllReduceMean(torch.autograd.Function):
    """Forward: mean over processes. Backward: the incoming gradient, unchanged.

    The reduced value is identical on every rank, so every rank holds the same upstream gradient
    ``g = dL/d(mean)``; the gradient w.r.t. the local input is ``g / W``. DDP then averages the
    parameter gradients over the ``W`` ranks (another ``1 / W``), so passing ``g`` through unscaled
    here yields exactly the gradient of the global objective (same as the original MSN code).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over processes; identity in a single process."""
    return _AllReduceMean.apply(x) if is_dist() else x


def init_from_env(use_cuda: bool) -> int:
    """Join the process group that ``torchrun`` describes in the environment; return the local rank.

    Nothing happens in a single process (no ``WORLD_SIZE`` > 1) or when a group already exists.
    Backend: NCCL on GPUs, gloo on CPUs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return int(os.environ.get("LOCAL_RANK", "0"))
