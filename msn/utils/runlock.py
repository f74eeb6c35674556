"""One trainer per run directory: an exclusive ``flock`` on the run directory itself, held for the run's life.

Why the directory and not a file in it: a lock file can be deleted while the run trains (a clean-up of dot-files,
``rsync --delete``) and a second launch would then lock a new file and train the same folder; the directory cannot be
removed from under the lock without removing the run. ``RUN_DIR/.msn.lock`` still names the host and process that
hold the lock, for the refusal's message; it is rewritten when it goes missing.

``flock`` is atomic (two launches of the same command cannot both get it) and the kernel releases it when the process
ends however it ends (a crash, kill -9), so a dead run never blocks its own resume and a reused process id cannot make
a run look alive. A ``flock`` belongs to the open file, which a forked child (a DataLoader worker) shares: such a child
would keep the lock for the seconds it outlives a killed trainer, and the immediate rerun would be refused. Every
forked child therefore closes its copy at once (:func:`os.register_at_fork`); an exec'd child never gets one (the
descriptor is not inheritable).

A file system that cannot lock a directory (NFS emulates ``flock`` with record locks, which need a file open for
writing) gets the lock on ``.msn.lock`` instead; :meth:`RunLock.verify` (before every checkpoint) then checks that the
file on disk is still the locked one and takes the new one, or stops the run when another process holds it.
Torch-free: ``msn-pretrain`` takes the lock before Hydra writes into the folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from msn.errors import ConfigError

LOCK_FILE = ".msn.lock"
_HELD: dict[str, RunLock] = {}  # real path of the run directory -> this process's lock on it
# errors of a file system that cannot flock a directory (the file lock is used there instead)
_NO_DIRECTORY_LOCK = {errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class LockLost(ConfigError):
    """The run folder stopped being this run's while it trained (moved, replaced, or taken by another process):
    nothing may be written into it, nor removed from it."""


class RunBusy(ConfigError):
    """Another process holds the run's lock: it trains the run."""


class RunLock:
    """This process's exclusive lock on a run directory (see the module docstring).

    ``fd`` is the locked descriptor: the directory's, or ``.msn.lock``'s where directories cannot be locked
    (``on_file``)."""

    def __init__(self, run_dir: Path, fd: int, on_file: bool) -> None:
        self.run_dir, self._fd, self.on_file = run_dir, fd, on_file
        self.holder = f"process {os.getpid()} on {socket.gethostname()}"

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def verify(self) -> None:
        """Check that the lock still guards the run directory; raise :class:`LockLost` when it does not.

        The directory lock: the folder on disk must be the locked one (not removed, not replaced). The file lock:
        a removed ``.msn.lock`` is created and locked again; one that another process locked stops this run.
        The holder's note is rewritten when it went missing."""
        if not self.held:
            return
        locked = os.fstat(self._fd)
        path = self.run_dir / LOCK_FILE if self.on_file else self.run_dir
        try:
            on_disk = os.stat(path)
        except FileNotFoundError:
            on_disk = None
        replaced = on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (locked.st_dev, locked.st_ino)
        if replaced and self.on_file:
            self._relock_file()
        elif replaced:
            raise LockLost(f"{self.run_dir} was removed or replaced while this run trained it; stopped without "
                              "writing into it (its last checkpoint is wherever the folder went)")
        if not self.on_file and not (self.run_dir / LOCK_FILE).exists():
            _write_note(self.run_dir, self.holder)

    def _relock_file(self) -> None:
        """The lock file was removed or replaced: lock the one on disk now, or stop when another process holds it."""
        try:
            fd = _open_lock_file(self.run_dir)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockLost(f"{self.run_dir}/{LOCK_FILE} was removed while this run trained and {holder} has "
                              "started training the folder since; stopped without writing into it") from None
        except OSError as e:
            raise LockLost(f"{self.run_dir}/{LOCK_FILE} was removed while this run trained and cannot be locked "
                              f"again ({e.strerror or e}); stopped without writing into the folder") from None
        os.close(self._fd)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder}\n".encode(), 0)

    def release(self) -> None:
        """Give the lock up (``.msn.lock`` stays: it only names the last holder)."""
        if self.held:
            _HELD.pop(str(self.run_dir.resolve()), None)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1

    def _close_in_child(self) -> None:
        """In a forked child: drop the child's reference to the locked file (the parent keeps the lock)."""
        if self.held:
            os.close(self._fd)
            self._fd = -1


def acquire_run_lock(run_dir: str | os.PathLike, *, on_file: bool = False) -> RunLock:
    """Lock ``run_dir`` (created if needed) for this process, or raise a :class:`ConfigError` naming the process
    that trains it, or what stops the lock from being taken (a read-only file system, a missing permission). A
    second call in the same process returns the lock it already holds. ``on_file``: lock ``.msn.lock`` from the
    start, as a file system that cannot lock a folder gets it."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD and _HELD[key].held:
        return _HELD[key]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not on_file:
            fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if isinstance(e, BlockingIOError) or e.errno not in _NO_DIRECTORY_LOCK:
                    raise
                on_file = True  # this file system locks files only
        if on_file:
            fd = _open_lock_file(run_dir)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise
    except BlockingIOError:
        raise RunBusy(f"{run_dir} is being trained right now by {_holder(run_dir)}; wait for it to stop, or "
                          "pass run_name=NEW_NAME for a separate run") from None
    except OSError as e:
        raise ConfigError(f"cannot lock the run folder {run_dir} ({e.strerror or e}): train in a folder you can "
                          "write to (hydra.run.dir=DIR or run_name=NAME under a writable directory)") from None
    lock = _HELD[key] = RunLock(run_dir, fd, on_file)
    try:
        if on_file:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{lock.holder}\n".encode(), 0)
        else:
            _write_note(run_dir, lock.holder)
    except OSError as e:
        lock.release()
        raise ConfigError(f"cannot write {run_dir / LOCK_FILE} ({e.strerror or e}): train in a folder you can "
                          "write to (hydra.run.dir=DIR or run_name=NAME under a writable directory)") from None
    return lock


def _open_lock_file(run_dir: Path) -> int:
    return os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)


def _write_note(run_dir: Path, holder: str) -> None:
    """Name the lock's holder in ``.msn.lock`` (written whole, then renamed: a reader never sees half of it)."""
    tmp = run_dir / f"{LOCK_FILE}.{os.getpid()}.tmp"
    tmp.write_text(f"{holder}\n")
    os.replace(tmp, run_dir / LOCK_FILE)


def _holder(run_dir: Path) -> str:
    """Who holds ``run_dir``'s lock, as its note says ("another process" when the note is gone)."""
    try:
        return (run_dir / LOCK_FILE).read_text(errors="replace").strip()[:200] or "another process"
    except OSError:
        return "another process"


def current_run_lock(run_dir: str | os.PathLike) -> RunLock | None:
    """This process's lock on ``run_dir``, or None."""
    lock = _HELD.get(str(Path(run_dir).resolve()))
    return lock if lock is not None and lock.held else None


def holds_run_lock(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return current_run_lock(run_dir) is not None


def release_run_lock(run_dir: str | os.PathLike) -> None:
    """Release this process's lock on ``run_dir``, if it holds one."""
    lock = current_run_lock(run_dir)
    if lock is not None:
        lock.release()


def _after_fork_in_child() -> None:
    for lock in list(_HELD.values()):
        lock._close_in_child()
    _HELD.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
