"""Writing files so that a crash never leaves a half-written one: checkpoints, the run's status, cached
features. Torch-free."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"  # atomic_write's temporary files: .NAME.XXXX.tmp, beside the file they become


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, fsync: bool = True) -> Path:
    """Write ``path`` by ``write(file)`` into a temporary file beside it, then an atomic rename.

    A crash mid-write leaves the previous file (or none) in place, never a truncated one. The file gets the
    umask's usual mode (``mkstemp`` alone would leave it readable by its owner only). ``fsync``: flush to the
    disk before the rename (checkpoints); small files that are cheap to remake may skip it. On any failure the
    temporary file is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    return atomic_write(path, lambda f: f.write(text.encode()), fsync=fsync)
