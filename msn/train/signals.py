"""Preemption, time-limit and Ctrl-C signals turned into flags the training loop checks after each step."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class SecondCtrlC(KeyboardInterrupt):
    """A second Ctrl-C while a run stops after its step: stop at once. Told apart from Python's own
    KeyboardInterrupt (a Ctrl-C before the handlers were installed: nothing was trained yet), so that the
    command says which of the two stopped it."""


class StopRequest:
    """Turns preemption and time-limit signals into flags the loop checks after each step.

    SIGTERM, SIGUSR1 and SIGUSR2 (submitit's preemption / time-limit signal) stop the run after the
    current step with a checkpoint. Under submitit, which ignores SIGTERM and acts on SIGUSR2, a
    SIGTERM only saves ``last.pt`` and training goes on, so submitit's own flow stays intact. A
    Python handler that was installed before ours (submitit's) is called once the checkpoint is
    written (:meth:`forward`): that is how a submitit job requeues itself and then resumes.

    SIGINT (Ctrl-C) is the same for the first press: finish the step, write ``last.pt``, exit 0. A
    second press stops at once (:class:`SecondCtrlC`, a KeyboardInterrupt), keeping only what was already saved.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

    def __init__(self, install: bool = True, report: Callable[[str], Any] | None = None) -> None:
        """``install``: take over the signals (the command line does); False: flags that nothing sets.
        ``report``: how :meth:`abort` says why the process ends (the command's one error line; default: the log)."""
        self.report = report
        self.signal: str | None = None
        self.save_only = False
        self._received: int | None = None
        self._previous: dict[int, Any] = {}
        self._submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
        if not install or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in self.SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        if self._submitit and number == signal.SIGTERM:
            self.save_only = True
            return
        if number == signal.SIGINT and self.signal is not None:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise SecondCtrlC
        if number == signal.SIGINT:
            log.warning("\nCtrl-C: stopping after this step with a checkpoint (press again to stop at once)")
        self.signal, self._received = signal.Signals(number).name, number

    def abort(self, line: str | None) -> None:
        """End this process now with exit code 1, after saying ``line`` (None: another process says why).

        For a job that cannot go on (a stuck rank, :mod:`msn.utils.watchdog`): callable from any thread, while the
        main thread waits in a collective that would never return. Nothing is cleaned up; the kernel releases the
        run's lock, loader workers leave when they notice, and the last checkpoint is where it was."""
        if line is not None:
            (self.report or log.error)(line)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def forward(self) -> None:
        """Call the handler that was in place before ours for the signal received, if it is Python code."""
        handler = self._previous.get(self._received) if self._received is not None else None
        if callable(handler) and self._received != signal.SIGINT:  # Python's own SIGINT handler would raise
            handler(self._received, None)
