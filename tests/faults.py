"""``python tests/faults.py OVERRIDES`` (also under torchrun): ``msn-pretrain OVERRIDES`` with a fault injected, as a
cluster inflicts it on a real process. ``MSN_TEST_FAULT="RANK:CALL:SIGNAL"`` sends SIGNAL (KILL, STOP, ...) to this
process itself when rank RANK starts its CALL-th training step (counted from 1 in this process), and only in
torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so a restarted group runs clean."""

import os
import signal
import sys

import msn.train.loop as loop

fault = os.environ.get("MSN_TEST_FAULT")
if fault and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    rank, call, name = fault.split(":")
    real_step, calls = loop.train_step, [0]

    def faulty_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(call) and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == rank:
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        return real_step(*args, **kwargs)

    loop.train_step = faulty_step

sys.argv = ["msn-pretrain", *sys.argv[1:]]
from msn.cli.pretrain import main  # noqa: E402

main()
