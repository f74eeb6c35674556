"""Run a function in several real gloo processes and collect what each returns."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def clean_env() -> dict[str, str]:
    """This environment without any variable that describes a multi-process job (for a launcher's children)."""
    prefixes = ("SLURM_", "SUBMITIT_", "TORCHELASTIC_", "MSN_START_TIME")
    names = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_TIMEOUT = timedelta(seconds=60)  # a group of 2-4 local processes forms in well under a second
JOINED = "joined-{rank}"  # marker a child leaves once its group formed, before the function under test runs


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=RENDEZVOUS_TIMEOUT)
    open(os.path.join(out_dir, JOINED.format(rank=rank)), "w").close()
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = ()) -> list[Any]:
    """Fork ``world_size`` processes running ``fn(rank, world_size, *args)`` in a gloo group.

    Forked, not spawned: a spawned child imports torch, timm and msn again (about 10 s on a 2-core CI
    machine, per call); a forked one starts with them. Each child runs one intra-op thread (as
    DataLoader workers do), which keeps OpenMP safe after the fork.

    A group that never forms (a child that did not reach the rendezvous within RENDEZVOUS_TIMEOUT: seen once
    in CI, where the default 30-minute timeout then held the whole suite) is launched once more on a fresh
    port. Anything that fails after every child joined is the test's failure and is raised as it is.
    """
    import torch

    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                mp.start_processes(_entry, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size,
                                   join=True, start_method="fork")
            except ProcessException:
                joined = [os.path.exists(os.path.join(out_dir, JOINED.format(rank=r))) for r in range(world_size)]
                if all(joined) or attempt == 2:
                    raise
                print(f"run_distributed: ranks {[r for r, j in enumerate(joined) if not j]} never joined the group; "
                      "launching it again", file=sys.stderr)
                continue
            return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=True) for r in range(world_size)]
    raise AssertionError("unreachable")
