"""Process groups and collectives: helpers that degrade to single-process no-ops.

A job describes its processes in one of three ways, read in this order by :func:`init_from_env`:

* ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* SLURM (``srun``, or the submitit launcher on a cluster): ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID`` and the node list, whose first host is the master;
* submitit's local executor (the launcher's local test mode): ``SUBMITIT_LOCAL_*`` on this host.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


# ----------------------------------------------------------------------------------------------------
# Finding the job's processes in the environment
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the job, and how to reach the rendezvous (rank 0's host)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | submitit-local


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order.

    ``"gpu[001-003,7],login1"`` -> ``["gpu001", "gpu002", "gpu003", "gpu7", "login1"]``; ranges keep
    their zero padding, and several bracket groups in one name multiply out
    (``"r[1-2]n[1-2]"`` -> ``r1n1, r1n2, r2n1, r2n2``).
    """
    hosts: list[str] = []
    for name in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", nodelist.strip()):
        expanded = [""]
        for literal, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            options = [literal]
            if group:
                options = [literal + item for item in _expand_ranges(group)]
            expanded = [head + tail for head in expanded for tail in options]
        hosts.extend(h for h in expanded if h)
    if not hosts:
        raise ValueError(f"cannot read a host name from the SLURM node list {nodelist!r}")
    return hosts


def _expand_ranges(group: str) -> list[str]:
    """``"001-003,7"`` -> ``["001", "002", "003", "7"]``."""
    items: list[str] = []
    for part in group.split(","):
        lo, _, hi = part.partition("-")
        if not hi:
            items.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        items.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return items


def _port_for_job(job_id: str) -> int:
    """A port every task of a job derives alike (MASTER_PORT wins when set): 20000 + job id mod 20000."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


def process_info(env: Mapping[str, str] | None = None) -> ProcessInfo | None:
    """This process's place in a multi-process job, from the environment; None in a single process."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun (or anything that sets the env:// variables)
        info = ProcessInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                           env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), "torchrun")
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # SLURM_STEP_NUM_TASKS describes the srun step this process belongs to; SLURM_NTASKS the allocation.
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        port = env.get("MASTER_PORT") or _port_for_job(env.get("SLURM_JOB_ID", "0"))
        info = ProcessInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
                           int(env.get("SLURM_LOCALID", "0")),
                           env.get("MASTER_ADDR") or (expand_nodelist(nodes)[0] if nodes else "127.0.0.1"),
                           int(port), "slurm")
    elif "SUBMITIT_LOCAL_GLOBALID" in env and "SUBMITIT_LOCAL_NTASKS" in env:
        port = env.get("MASTER_PORT") or _port_for_job(env.get("SUBMITIT_LOCAL_JOB_ID", "0"))
        info = ProcessInfo(int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env["SUBMITIT_LOCAL_NTASKS"]),
                           int(env.get("SUBMITIT_LOCAL_LOCALID", "0")), "127.0.0.1", int(port), "submitit-local")
    else:
        return None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"{info.source} environment gives rank {info.rank} of {info.world_size} processes")
    return info if info.world_size > 1 else None


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
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(minutes=timeout_min))
    return info.local_rank
