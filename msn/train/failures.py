"""When a job of several processes fails under the training loop: the stuck-rank watchdog wired to the run
(:mod:`msn.utils.watchdog`), a lost peer as one line, and the loader's workers shut down on the way out."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import torch
from omegaconf import DictConfig

from msn.train.builder import Process
from msn.train.checkpoints import CheckpointPolicy
from msn.train.signals import StopRequest
from msn.utils.watchdog import Watchdog


def last_checkpoint_text(step: int, run_dir: Path) -> str:
    """Where a rank that gives up says the run can continue from: ``step N (RUN/checkpoints)``."""
    return f"step {step} ({run_dir}/checkpoints)" if step else "none yet (a rerun starts at step 0)"


def watchdog_for(cfg: DictConfig, proc: Process, run_dir: Path, checkpoints: CheckpointPolicy, stop: StopRequest,
                 start_step: int) -> Watchdog:
    """This rank's progress, watched by every other (its thread runs in a job of several processes with
    ``dist.timeout_s`` > 0), ending the process through ``stop.abort`` when a rank is stuck."""
    return Watchdog(rank=proc.rank, world=proc.world, timeout_s=cfg.dist.timeout_s, on_stuck=stop.abort,
                    last_checkpoint=lambda: last_checkpoint_text(checkpoints.last_saved or start_step, run_dir))


def collective_failure(error: RuntimeError) -> bool:
    """Whether ``error`` is the process group failing (gloo raises plain RuntimeErrors naming its sources)."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        mark in text for mark in ("gloo", "NCCL", "ProcessGroup", "c10d"))


def lost_peer_message(error: Exception, proc: Process, step: int, last: int, run_dir: Path) -> str:
    """What a rank says when the process group fails under it (a peer killed or cut off) at ``step`` (steps done):
    its place, the error's first line and how to continue."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0][:200]  # gloo's source position
    return (f"rank {proc.rank} of {proc.world} on {socket.gethostname()} lost the process group at step {step + 1} "
            f"({first}): another process of the job died or was cut off, and its own output says why; the last "
            f"checkpoint is {last_checkpoint_text(last, run_dir)}: run the same command again to continue "
            "(torchrun --max-restarts=N does so by itself)")


def stop_workers(batches: object) -> None:
    """Shut the loader's workers down now, as a finished loop would. After an exception its traceback keeps the
    iterator alive until the interpreter exits, and multiprocessing's exit handler would then wait forever for
    workers that ignore the SIGTERM it sends them (they leave stop signals to this process)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
