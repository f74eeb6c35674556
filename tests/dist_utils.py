"""Run a function in several real gloo processes and collect what each returns."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
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
JOIN_WITHIN_S = 90.0  # past torch's own rendezvous timeout: a child still not joined then never will
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


def _launch(fn: Callable, world_size: int, args: tuple, out_dir: str, join_within: float) -> bool:
    """One launch: True when every child ran ``fn`` and exited; False when the group never formed (a child that did
    not join within ``join_within`` seconds, or exited before joining), its children killed. Anything that fails
    after every child joined is the test's failure and is raised as it is."""
    context = mp.start_processes(_entry, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size,
                                 join=False, start_method="fork")
    deadline = time.monotonic() + join_within

    def late() -> list[int]:
        return [r for r in range(world_size) if not os.path.exists(os.path.join(out_dir, JOINED.format(rank=r)))]

    try:
        while not context.join(timeout=0.2):
            if time.monotonic() > deadline and late():
                break
        else:
            return True
    except ProcessException:
        if not late():
            raise
    for process in context.processes:
        if process.is_alive():
            process.kill()
        process.join()
    print(f"run_distributed: ranks {late()} never joined the group", file=sys.stderr)
    return False


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = (), *,
                    join_within: float = JOIN_WITHIN_S) -> list[Any]:
    """Fork ``world_size`` processes running ``fn(rank, world_size, *args)`` in a gloo group.

    Forked, not spawned: a spawned child imports torch, timm and msn again (about 10 s on a 2-core CI
    machine, per call); a forked one starts with them. Each child runs one intra-op thread (as
    DataLoader workers do), which keeps OpenMP safe after the fork.

    A group that never forms is killed and launched once more on a fresh port: a child that exits before joining
    (seen once in CI), or one that does not join within ``join_within`` seconds, which no timeout of torch's
    catches: a child forked while another thread of this process held one of glibc's locks (the resolver's,
    taken to name a socket's address) waits for it forever (seen in test_cluster, rank 0 stuck in getnameinfo).
    """
    import torch

    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as out_dir:
            if _launch(fn, world_size, args, out_dir, join_within):
                return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=True) for r in range(world_size)]
        if attempt == 1:
            print("run_distributed: launching the group again on a fresh port", file=sys.stderr)
    raise RuntimeError(f"a group of {world_size} processes did not form twice (within {join_within:g} s each)")
