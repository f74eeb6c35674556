"""Ending a multi-process job whose rank stopped making progress, instead of letting the others wait forever.

Every rank runs a :class:`Watchdog` thread. The training loop marks its progress (:meth:`Watchdog.beat`: "loading
the batch of step s", "computing step s"); the thread publishes, every ``period`` seconds, a record of this rank in
the job's key-value store (the one ``torchrun`` or rank 0 serves at ``MASTER_ADDR:MASTER_PORT``, reached through a
client of its own, so a frozen store host is a timeout and not a hang): its host, process, phase, step, how long it
has been idle, and a tick that counts the thread's own beats.

A healthy rank that waits for a stuck one makes no progress either. When this rank has been idle for
``timeout_s / 2``, its thread starts reading the others' records; once it has been idle ``timeout_s`` it looks for
the culprit:

* a rank whose tick stood still for the whole time it was observed: the process is frozen (SIGSTOP, a dead host, a
  network partition); no sign of life, so nothing it says can be trusted;
* a rank that has waited longer than ``timeout_s`` for its next batch: its data loading hangs (a file system that
  stopped answering).

A rank that is alive and busy (a long monitor evaluation on rank 0, a checkpoint on a slow disk, the first step's
compilation) is never a culprit, however long the others wait for it. With a culprit found, one line says which
(:func:`describe_stuck`): a rank stuck on its data says it itself, a frozen rank is named by the lowest healthy
rank, which also kills it when it runs on its own host (a stopped process waits for nobody's SIGTERM); every
waiting rank ends its process (``on_stuck``), and the launcher (torchrun, srun with ``--kill-on-bad-exit=1``) ends
the job. Clocks are never compared across hosts:
every age is measured by the observer's own monotonic clock.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class _Seen:
    """What this rank saw of another rank's records: its last tick, since when (monotonic) and the record."""

    tick: int
    since: float
    record: dict[str, Any] = field(default_factory=dict)


def _start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22): with the pid,
    it names one process (a pid alone may be reused)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Watchdog:
    """This rank's progress, published for the others, and the check that ends a job with a stuck rank.

    Args:
        rank, world: this process's rank and the number of processes.
        timeout_s: how long a rank may wait for another before the job ends (``dist.timeout_s``).
        store: the key-value store to publish in (``torch.distributed.Store``), or None: a client of the store at
            ``MASTER_ADDR:MASTER_PORT`` is opened (with a timeout of its own).
        on_stuck: called with the report line, or None (another rank reports), when the job must end; it ends the
            process (``StopRequest.abort``).
        last_checkpoint: what the report says about the last checkpoint (``"step 40 in RUN_DIR/checkpoints"``).
        period: seconds between two records (default: ``timeout_s / 10`` within [0.2, 5]).
    """

    def __init__(self, *, rank: int, world: int, timeout_s: float, on_stuck: Callable[[str | None], None],
                 last_checkpoint: Callable[[], str], store: Any = None, period: float | None = None) -> None:
        self.rank, self.world, self.timeout = rank, world, float(timeout_s)
        self.period = period if period is not None else min(5.0, max(0.2, self.timeout / 10))
        self.on_stuck, self.last_checkpoint = on_stuck, last_checkpoint
        self._store = store
        self.phase, self.step = "start", 0
        self._last_progress = time.monotonic()
        self._seen: dict[int, _Seen] = {}
        self._store_lost_since: float | None = None
        self._stuck_call: threading.Thread | None = None
        self._tick = 0
        self.fired = False  # on_stuck was called
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "start": _start_ticks(os.getpid())}
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"msn/watchdog/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{restart}/"

    # ----------------------------------------------------------------------------------- the training loop's side
    def beat(self, phase: str, step: int | None = None) -> None:
        """Progress: this rank now does ``phase`` (``"data"``: waits for its next batch; ``"step"``) at ``step``."""
        self.phase = phase
        if step is not None:
            self.step = step
        self._last_progress = time.monotonic()

    def start(self) -> Watchdog:
        """Start the thread (a daemon: it never keeps a finished process alive), in a job of several processes with
        a timeout; otherwise :meth:`beat` is all there is. Start it after forking (the DataLoader's workers): a
        child forked while a thread runs inherits that thread's locks, never the thread."""
        if self.world < 2 or self.timeout <= 0 or self._thread is not None:
            return self
        if self._store is None:
            self._store = _store_client(self.period)
        self._thread = threading.Thread(target=self._run, name="msn-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---------------------------------------------------------------------------------------- the thread's side
    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.check(time.monotonic())
            except Exception as e:  # the watchdog must never take a healthy run down
                log.debug(f"watchdog: {e!r}")

    def idle(self, now: float) -> float:
        return now - self._last_progress

    def check(self, now: float) -> None:
        """One round: publish this rank's record; when idle long enough, observe the others and act on a culprit
        (once: ``on_stuck`` is called at most once)."""
        if self.fired:
            return
        self._tick += 1
        record = {**self._me, "tick": self._tick, "phase": self.phase, "step": self.step,
                  "idle_s": round(self.idle(now), 1)}
        self._set(self.rank, record)  # (a set may be buffered and "succeed" on a store that no longer answers)
        if self.idle(now) < self.timeout / 2:
            self._seen.clear()
            self._store_lost_since = None
            return
        if self._observe(now):
            self._store_lost_since = None
        elif self._store_lost_since is None:
            self._store_lost_since = now
        if self.idle(now) >= self.timeout:
            self._act(now)

    def _observe(self, now: float) -> bool:
        """Read every rank's record; False when the store did not answer."""
        for rank in range(self.world):
            try:
                record = self._get(rank)
            except TimeoutError:
                return False
            if record is None:
                continue
            seen = self._seen.get(rank)
            if seen is None or seen.tick != record["tick"]:
                self._seen[rank] = _Seen(record["tick"], now, record)
            else:
                seen.record = record
        return True

    def culprits(self, now: float) -> dict[int | str, str]:
        """The ranks that hold the job up (frozen or stuck loading data), with what each is doing; ``"store"`` when
        the job's store itself stopped answering."""
        window = max(self.timeout / 2, 3 * self.period)
        if self._store_lost_since is not None and now - self._store_lost_since >= window:
            return {"store": "frozen"}
        found: dict[int | str, str] = {}
        for rank in range(self.world):
            seen = self._seen.get(rank)
            if seen is None:
                continue  # not heard from yet: no verdict on a rank that never published
            if rank != self.rank and now - seen.since >= window:
                found[rank] = "frozen"
            elif seen.record.get("phase") == "data" and seen.record.get("idle_s", 0) >= self.timeout:
                found[rank] = "data"
        return found

    def _act(self, now: float) -> None:
        """End this rank when a culprit holds the job up. Who says why: a rank stuck on its data speaks for itself
        (it is alive, and the first to give up); the frozen ones, which cannot, are named by the lowest healthy rank,
        which also kills those on its own host. Every other rank leaves without a word."""
        culprits = self.culprits(now)
        if not culprits:
            return  # every rank is alive and busy: waiting for it is not a hang
        healthy = [r for r in range(self.world) if r not in culprits and r in self._seen]
        speak_for = {}
        if "store" in culprits:  # nobody can read anybody: rank 1, the lowest rank that does not serve it, says so
            speak_for = culprits if self.rank == 1 else {}
        elif self.rank in culprits:
            speak_for = {self.rank: culprits[self.rank]}
        elif healthy and healthy[0] == self.rank:
            speak_for = {r: why for r, why in culprits.items() if why == "frozen"}
        line = None
        if speak_for:
            killed = self._kill_frozen_neighbours(speak_for)
            line = describe_stuck(speak_for, self._seen, now, step=self.step + 1, waited=self.idle(now),
                                  timeout=self.timeout, killed=killed, last_checkpoint=self.last_checkpoint(),
                                  store=_store_address())
        self.fired = True
        self._stop.set()
        self.on_stuck(line)

    def _kill_frozen_neighbours(self, culprits: dict[int | str, str]) -> list[int]:
        """SIGKILL the frozen ranks that run on this host (a stopped process ignores the launcher's SIGTERM); the
        pid is checked against the process's start time, so no other process is ever hit."""
        killed = []
        for rank, why in culprits.items():
            record = self._seen[rank].record if isinstance(rank, int) and rank in self._seen else {}
            if why != "frozen" or record.get("host") != self._me["host"] or record.get("start") is None:
                continue
            pid = int(record["pid"])
            if pid != os.getpid() and _start_ticks(pid) == record["start"]:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(rank)
                except OSError:
                    pass
        return killed

    def _set(self, rank: int, record: dict[str, Any]) -> bool:
        try:
            self._call("set", self._prefix + str(rank), json.dumps(record))
            return True
        except Exception:  # a timeout: the store's host does not answer
            return False

    def _get(self, rank: int) -> dict[str, Any] | None:
        """``rank``'s record, None when it has none (yet); a TimeoutError when the store does not answer."""
        key = self._prefix + str(rank)
        try:
            if not self._call("check", [key]):
                return None
            return json.loads(self._call("get", key))
        except TimeoutError:
            raise
        except Exception:  # a refused connection, a broken record: no answer either
            raise TimeoutError(f"no record of rank {rank} could be read") from None

    def _call(self, method: str, *args: Any) -> Any:
        """``store.method(*args)``, or a TimeoutError after ``2 * period`` seconds (at least 0.5).

        A store whose host froze never answers some calls (``check`` waits forever, whatever the client's
        timeout), so each call runs in a helper thread that this one stops waiting for; while a call is still
        stuck, the next ones fail at once."""
        if self._stuck_call is not None and self._stuck_call.is_alive():
            raise TimeoutError("an earlier call to the store has not returned")
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = getattr(self._store, method)(*args)
            except Exception as e:
                box["error"] = e

        helper = threading.Thread(target=run, name="msn-watchdog-store", daemon=True)
        helper.start()
        helper.join(max(0.5, 2 * self.period))
        if helper.is_alive():
            self._stuck_call = helper
            raise TimeoutError(f"the store did not answer {method}")
        if "error" in box:
            raise box["error"]
        return box.get("value")


def describe_stuck(culprits: dict[int | str, str], seen: dict[int, _Seen], now: float, *, step: int, waited: float,
                   timeout: float, killed: list[int], last_checkpoint: str, store: str) -> str:
    """The one line that ends a job: which rank on which host, what it was doing, and how to continue.

    ``step``: the step the job stalled in (1-based); ``waited``: how long the reporter waited for it."""
    parts = []
    for rank, why in culprits.items():
        if rank == "store":
            parts.append(f"the job's store at {store} (served by rank 0 or by torchrun's agent) stopped answering "
                         f"in step {step}")
            continue
        record = seen[rank].record
        where = f"rank {rank} on {record.get('host', '?')} (process {record.get('pid', '?')})"
        if why == "frozen":
            state = "; killed" if rank in killed else ""
            parts.append(f"{where} stopped responding in step {step} (no sign of life for {now - seen[rank].since:.0f} "
                         f"s{state})")
        else:
            parts.append(f"{where} has waited {record.get('idle_s', 0):.0f} s for its batch of step {step}: its data "
                         "does not load (a file system that stopped answering?)")
    return (f"{'; '.join(parts)}, while the other ranks waited for it for {waited:.0f} s (dist.timeout_s={timeout:g}): "
            f"the job ends here; the last checkpoint is {last_checkpoint}: run the same command again to continue")


def _store_address() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _store_client(period: float) -> Any:
    """A client of the job's store (``MASTER_ADDR:MASTER_PORT``) with a timeout of a few periods, so that a frozen
    store host makes its calls fail instead of blocking the watchdog."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=max(2.0, 2 * period)), wait_for_workers=False)
