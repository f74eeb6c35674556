"""Training checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "msn-train-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not an msn training checkpoint."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename.

    A crash mid-write leaves the previous file intact, so a finished run's ``last.pt`` is never lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU; any failure becomes one clear :class:`CheckpointError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign / pickled files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def is_training_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and state.get("format") == FORMAT


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` onto the CPU; fail with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass resume=PATH to an existing .pt file")
    state = safe_load(path)
    if not is_training_checkpoint(state):
        raise CheckpointError(f"{path} is not an msn training checkpoint (expected format {FORMAT!r})")
    return state


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``None`` (fresh run), ``auto`` or a path.

    ``auto`` means ``RUN_DIR/checkpoints/last.pt`` when it exists, else a fresh start.
    """
    if resume is None:
        return None
    if resume == "auto":
        last = Path(run_dir) / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if path.is_dir():  # a run directory
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"resume={resume}: no checkpoint found at {path}")
    return path


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU, CUDA when present, Python) as checkpoint-safe values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
