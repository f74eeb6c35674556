"""Process groups and collectives: helpers that degrade to single-process no-ops.

:func:`init_from_env` joins the group the job's launcher describes (:mod:`msn.utils.launcher`: torchrun, SLURM or
submitit's local executor).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from msn.utils.launcher import process_info

_LOCAL_ONLY = [False]  # set by local_only(): this process computes alone, its collectives are off


def is_dist() -> bool:
    """True when a process group with more than one process is running (and :func:`local_only` is not in effect)."""
    return not _LOCAL_ONLY[0] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within it this process acts as if alone: the model's synchronised BatchNorm and the loss's all-reduces stay
    local, so one rank can run a training step (a fitted plan's memory search) while the others wait."""
    _LOCAL_ONLY[0] = True
    try:
        yield
    finally:
        _LOCAL_ONLY[0] = False


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

    Only for values that every rank then uses identically (the ME-MAX mean prediction): every rank
    holds the same upstream gradient ``g = dL/d(mean)``, so the exact adjoint ``sum_r g / W`` is
    ``g`` itself and no second all-reduce is needed. DDP's averaging of the parameter gradients then
    yields the gradient of the global objective (as in the original MSN code).
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


class _AllReduceSum(torch.autograd.Function):
    """Forward: ``y = sum_r x_r``. Backward: ``dS/dx_r = sum_r' dL_r'/dy`` (another all-reduce).

    With the per-rank losses ``L_r`` and ``S = sum_r L_r``, this is the exact adjoint for values
    that ranks use differently (batch-norm statistics), so DDP's gradient mean is ``dS/dtheta / W``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over processes; identity in a single process."""
    return _AllReduceSum.apply(x) if is_dist() else x


def any_rank(*flags: bool) -> list[bool]:
    """Each flag, true on every rank when it is true on at least one (one small all-reduce).

    Lets all ranks take the same decision (stop, save) after the same step.
    """
    if not is_dist():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def barrier() -> None:
    """Wait until every rank got here (one small all-reduce, on the device the group's collectives use); nothing in a
    single process."""
    any_rank(False)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; small values only)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled; small values only)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    """Where small control tensors go: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(timeout_min: float = 30.0) -> int:
    """Join the job's process group (see :func:`process_info`); return the local rank (0 when alone).

    Nothing happens in a single process or when a group already exists. Backend: gloo for CPU
    tensors, plus NCCL for CUDA tensors when this machine has a GPU (``"cpu:gloo,cuda:nccl"``), so
    a ``device=cpu`` run on a GPU node works too.
    """
    info = process_info()
    if info is None or not dist.is_available():
        return 0
    if not dist.is_initialized():
        # torchrun's agent already serves the rendezvous store at MASTER_ADDR:MASTER_PORT, so every
        # source goes through env:// (the SLURM / submitit values are exported for it first).
        os.environ.update(MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port), RANK=str(info.rank),
                          WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=timeout_min)
        store = _attempt_store(info.master_addr, info.master_port, timeout)
        if store is None:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout)
    return info.local_rank


def _attempt_store(host: str, port: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store seen under a prefix of this attempt (``TORCHELASTIC_RESTART_COUNT``); None
    elsewhere (env:// as usual).

    The agent keeps one store for all the attempts of ``--max-restarts``: the group a restart starts would find the
    dead group's addresses under the same keys, and a rank that reads one before its peer has overwritten it
    connects to a process that no longer exists (gloo: "connectFullMesh failed ... Connection refused"). A prefix
    per attempt gives every attempt keys of its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"msn/attempt_{attempt}/", client)
