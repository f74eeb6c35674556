"""One trainer per run directory: an exclusive lock on ``RUN_DIR/.msn.lock`` held for the run's life.

``fcntl.flock`` is atomic (two launches of the same command cannot both get it) and the kernel releases it when
the process ends however it ends (a crash, kill -9, a reboot of a node), so a dead run never blocks its own
resume, and a reused process id cannot make a run look alive. The lock file names the host and process that
hold it, for the message. Torch-free: ``msn-pretrain`` takes the lock before Hydra writes into the folder.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from msn.errors import ConfigError

LOCK_FILE = ".msn.lock"
_HELD: dict[str, RunLock] = {}  # real path of the run directory -> this process's lock on it


class RunLock:
    """This process's exclusive lock on a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir, self._fd = run_dir, fd

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would let two processes lock two different files)."""
        if self._fd >= 0:
            _HELD.pop(str(self.run_dir.resolve()), None)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1


def acquire_run_lock(run_dir: str | os.PathLike) -> RunLock:
    """Lock ``run_dir`` (created if needed) for this process, or raise a :class:`ConfigError` naming the process
    that trains it. A second call in the same process returns the lock it already holds."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:
        return _HELD[key]
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"{run_dir} is being trained right now by {holder}; wait for it to stop, or pass "
                          "run_name=NEW_NAME for a separate run") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    lock = _HELD[key] = RunLock(run_dir, fd)
    return lock


def holds_run_lock(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return str(Path(run_dir).resolve()) in _HELD


def release_run_lock(run_dir: str | os.PathLike) -> None:
    """Release this process's lock on ``run_dir``, if it holds one."""
    lock = _HELD.get(str(Path(run_dir).resolve()))
    if lock is not None:
        lock.release()
