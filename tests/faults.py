"""``python tests/faults.py OVERRIDES`` (also under torchrun): ``msn-pretrain OVERRIDES`` with a fault injected, as a
cluster inflicts it on a real process.

``MSN_TEST_FAULT="RANK:CALL:SIGNAL"`` sends SIGNAL (KILL, STOP, ...) to this process itself when rank RANK starts
its CALL-th training step (counted from 1 in this process), or with ``CALL`` ``save-N`` when it starts writing its
shards of a sharded checkpoint for the N-th time (strategy=fsdp), only in torchrun's first attempt
(``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so a restarted group runs clean. ``MSN_TEST_FAULT_LOG=FILE``: append
``fault TIME`` just before the signal and ``first-step RANK TIME`` when a process starts its first step, so that a
test can say how long a job took to recover (wall-clock seconds, ``time.time()``).
"""

import os
import signal
import sys
import time

import torch.distributed.checkpoint as dcp

import msn.train.loop as loop

FAULT = os.environ.get("MSN_TEST_FAULT", "")
FIRST_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
RANK = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
real_step, calls = loop.train_step, [0]
real_save, saves = dcp.save, [0]


def note(what: str) -> None:
    path = os.environ.get("MSN_TEST_FAULT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {time.time():.3f}\n")


def faulty_save(*args, **kwargs):
    """``RANK:save-N:SIGNAL``: the signal when rank RANK starts writing its shards for the N-th time (strategy=fsdp),
    while the other ranks write theirs."""
    saves[0] += 1
    if FAULT and FIRST_ATTEMPT:
        rank, call, name = FAULT.split(":")
        if call == f"save-{saves[0]}" and RANK == rank:
            note("fault")
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return real_save(*args, **kwargs)


def faulty_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 1:
        note(f"first-step {RANK}")
    if FAULT and FIRST_ATTEMPT:
        rank, call, name = FAULT.split(":")
        if call == str(calls[0]) and RANK == rank:
            note("fault")
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return real_step(*args, **kwargs)


loop.train_step = faulty_step
dcp.save = faulty_save
sys.argv = ["msn-pretrain", *sys.argv[1:]]
from msn.cli.pretrain import main  # noqa: E402

main()
