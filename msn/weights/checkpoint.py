"""Training checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from msn.errors import CheckpointError
from msn.utils.files import TMP_SUFFIX, atomic_write
from msn.weights.sharded import is_complete, read_shards, remove_stale_shards

FORMAT = "msn-train-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename.

    A crash mid-write leaves the previous file intact, so a finished run's ``last.pt`` is never lost. The
    file gets the umask's usual mode (``mkstemp`` would leave it readable by its owner only). A failed
    write (a full disk) is a :class:`CheckpointError` naming the file, the space it needed and what is free.
    """
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError ("enforce fail ...")
        free = shutil.disk_usage(path.parent).free
        needed = _state_bytes(state)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        if free < needed or "No space left" in str(e) or isinstance(e, RuntimeError):
            reason = f"{reason}; it needs about {needed / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free"
        kept = " (the previous file is intact)" if path.exists() else ""
        raise CheckpointError(f"could not write checkpoint {path}{kept}: {reason}") from None
    return path


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files an interrupted :func:`save_checkpoint` left in ``folder`` (a kill -9
    mid-write); only files named like ours (``.NAME.XXXX.tmp``), and a sharded save's temporary folders
    (:func:`msn.weights.sharded.remove_stale_shards`). Returns what was removed."""
    removed = []
    if folder.is_dir():
        for tmp in folder.glob(f".*.pt.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        removed += remove_stale_shards(folder)
    return removed


def shards_referenced(folder: Path) -> set[str]:
    """The shard folders (``shards/step_XXXXXXX``) that the checkpoints of ``folder`` name."""
    names = set()
    for path in [folder / "last.pt", *folder.glob("step_*.pt")]:
        try:
            shards = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("shards")
        except Exception:  # missing, or unreadable: names nothing that must stay
            continue
        if shards:
            names.add(shards)
    return names


def periodic_name(step: int) -> str:
    """The file name of the periodic checkpoint after ``step`` steps (``checkpoint.every_steps``)."""
    return f"step_{step:07d}.pt"


_PERIODIC = re.compile(r"step_(\d+)\.pt")


def prune_periodic(folder: Path, step: int, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` periodic checkpoints of steps up to ``step``; return what was removed.

    ``checkpoint.keep``: ``experiment=msn_vits16`` on ImageNet at a global batch of 1,024 writes 100
    ``step_XXXXXXX.pt`` of 0.41 GiB each (41 GiB). Only files named :func:`periodic_name` of a step <=
    ``step`` take part: after a rewind (resuming from an earlier periodic checkpoint) the abandoned run's
    later ones stay until this run overwrites them, and ``last.pt`` and every other file are never touched.
    """
    steps = []
    for path in folder.glob("step_*.pt"):
        match = _PERIODIC.fullmatch(path.name)
        if match and int(match.group(1)) <= step:
            steps.append((int(match.group(1)), path))
    removed = [path for _, path in sorted(steps)[:-keep]] if keep > 0 else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _state_bytes(state: Any) -> int:
    """Bytes of the tensors in ``state`` (nested dicts / lists): about what ``torch.save`` writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU; any failure becomes one clear :class:`CheckpointError`.

    Never suggests ``weights_only=False``: a file holding arbitrary pickled objects is refused, because
    unpickling it can run code.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # a zip archive, or a legacy pickle
        raise CheckpointError(f"{path} is not a checkpoint (not a PyTorch file: it is empty, text, an image or "
                              "other data)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(e), re.IGNORECASE)
        if found:
            raise CheckpointError(f"{path} holds Python objects other than tensors (such as {found.group(1)}); it is "
                                  "refused, because unpickling it could run code") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupted)") from None
    except Exception as e:  # torch raises several types for truncated / foreign files
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:200]
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupted: {type(e).__name__}"
                              f"{': ' + first if first else ''})") from None


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
    state = with_shards(state, path)
    check_training_checkpoint(state, path)
    return state


def with_shards(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """A training checkpoint read from ``path`` with its tensors: a sharded save's (``strategy=fsdp``) are read from
    the folder it names (:mod:`msn.weights.sharded`); any other holds them already."""
    return read_shards(path, state) if "shards" in state else state


def newest_checkpoint(folder: Path) -> tuple[Path, int, list[str]] | None:
    """The checkpoint of ``folder`` (``RUN_DIR/checkpoints``) with the highest step, ``last.pt`` or periodic, its
    step, and what was passed over (unreadable files, with the reason); None when there is none.

    After a full disk, the periodic ``step_XXXXXXX.pt`` (written first) may be newer than ``last.pt``, or
    ``last.pt`` may be missing or cut short: a resume must not start from an older state, nor from step 0.
    """
    candidates: list[tuple[int, int, Path]] = []  # (step, last.pt first on a tie, path)
    passed_over = []
    for path in [folder / "last.pt", *sorted(folder.glob("step_*.pt"))]:
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            step = int(state["step"])
        except Exception as e:  # a truncated or foreign file: the next newest one is used
            passed_over.append(f"{path.name} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
            continue
        if "shards" in state and not is_complete(folder / state["shards"]):  # killed while it wrote
            passed_over.append(f"{path.name} (its shards, {state['shards']}, are missing or incomplete)")
            continue
        candidates.append((step, 1 if path.name == "last.pt" else 0, path))
    if not candidates:
        return None
    step, _, path = max(candidates)
    return path, step, passed_over


REQUIRED = {"model": dict, "optimizer": dict, "step": int, "config": str}


def check_training_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """A :class:`CheckpointError` unless ``state`` has every part a training checkpoint needs, of the right type."""
    missing = [k for k in REQUIRED if k not in state]
    wrong = [k for k, kind in REQUIRED.items() if k in state and not isinstance(state[k], kind)]
    if missing or wrong:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"bad {', '.join(wrong)}"] if wrong else [])
        raise CheckpointError(f"{path} is an incomplete msn training checkpoint ({'; '.join(parts)})")


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
