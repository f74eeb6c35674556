"""Where this process sits in a multi-process job, read from what its launcher put in the environment.

Three launchers describe a job, read in this order:

* ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* SLURM (``srun``, or the submitit launcher on a cluster): ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID`` and the node list, whose first host is the master;
* submitit's local executor (the launcher's local test mode): ``SUBMITIT_LOCAL_*`` on this host.

Plain Python without torch: ``msn-pretrain`` reads it before deciding whether to import torch and join a
process group (:func:`msn.utils.distributed.init_from_env`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


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
