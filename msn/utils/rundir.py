"""The files of a run directory that commands read before they train or load anything.

``RUN_DIR/checkpoints/last.pt`` (the newest checkpoint) and ``RUN_DIR/status.json`` (``running``,
``stopped`` or ``finished``). Torch-free on purpose: msn-pretrain's config check tells a finished or live run,
and msn-eval, msn-export and msn-viz a MODEL that does not exist, in about a second, before importing torch,
torchvision and timm (about ten seconds on a 2-core CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import zipfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from msn.errors import CheckpointError
from msn.utils.files import atomic_write_text

LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
STATUS_FILE = "status.json"
HF_CONFIG = "config.json"  # what makes a folder a Hugging Face export
TIMM_CONFIG = "timm_config.json"  # ... and a timm export (msn-export --format timm)

# RUN_DIR/metrics.csv: these columns, with the loss's own terms after "loss" and its diagnostics after the
# schedules (msn.train.loss: whatever terms the loss returns, ce, me_max, ... for MSN).
METRICS_HEAD = ("step", "epoch", "loss")
METRICS_SCHEDULES = ("lr", "wd", "momentum", "sharpen_T")
METRICS_TAIL = ("encoder_grad_norm", "images_per_s", "monitor", "rankme", "rankme_head", "rankme_centred",
                "skipped_images")
METRICS_FIXED_COLUMNS = (*METRICS_HEAD, *METRICS_SCHEDULES, *METRICS_TAIL)
MONITOR_COLUMNS = ("monitor", "rankme", "rankme_head", "rankme_centred")  # filled on monitor steps only (nan elsewhere)


def metrics_columns(terms: list[str] | tuple[str, ...], diagnostics: list[str] | tuple[str, ...]) -> list[str]:
    """The columns of ``metrics.csv`` for a loss with these terms and diagnostics, in order."""
    return [*METRICS_HEAD, *terms, *METRICS_SCHEDULES, *diagnostics, *METRICS_TAIL]


def loss_columns(header: list[str] | tuple[str, ...]) -> list[str]:
    """The columns of a ``metrics.csv`` header that the loss wrote (its terms and diagnostics), in order."""
    return [name for name in header if name not in METRICS_FIXED_COLUMNS]


def is_hf_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face export folder (it holds ``config.json``)."""
    return (Path(path) / HF_CONFIG).is_file()


def run_dir_of(path: str | os.PathLike) -> Path | None:
    """The run directory ``path`` names: itself when it is a folder, ``RUN_DIR`` for a checkpoint under
    ``RUN_DIR/checkpoints/``, else None (a file elsewhere, such as an original ``.pth.tar``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path
    if path.parent.name == LAST_CHECKPOINT.parent.name:
        return path.parent.parent
    return None


def last_checkpoint(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/checkpoints/last.pt`` (whether or not it exists yet)."""
    return Path(run_dir) / LAST_CHECKPOINT


def source_file(source: str | os.PathLike) -> Path:
    """The checkpoint file SOURCE names: a run directory's ``checkpoints/last.pt``, else SOURCE itself.

    A :class:`CheckpointError` naming the fix when there is no such file, so that a typo is answered
    before any heavy import.
    """
    path = Path(source)
    if path.is_dir():
        last = last_checkpoint(path)
        if not last.is_file():
            raise CheckpointError(f"{path} is a folder without {LAST_CHECKPOINT}; give a run directory that has "
                                  "written a checkpoint, a training checkpoint or an original MSN .pth.tar")
        return last
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; give a training checkpoint, a run directory or a .pth.tar")
    return path


def check_model(model: str | os.PathLike, hf: bool = True) -> None:
    """Refuse a MODEL that names nothing loadable: a Hugging Face or timm export folder (when ``hf``: exports
    hold a backbone only), a run directory with a checkpoint, or a file (what its content is, the loaders
    decide)."""
    if hf and (is_hf_export(model) or (Path(model) / TIMM_CONFIG).is_file()):
        return
    try:
        source_file(model)
    except CheckpointError as e:
        if hf and not Path(model).exists():  # say every kind of MODEL these commands take, exports included
            raise CheckpointError(f"{model} does not exist; give a training checkpoint, a run directory, an original "
                                  f"MSN .pth.tar, a Hugging Face ViTMSN folder (msn-export's, or any saved "
                                  f"ViTMSNModel: it has {HF_CONFIG}) or a timm export folder") from None
        if hf and Path(model).is_dir():
            raise CheckpointError(f"{e} (or a Hugging Face ViTMSN export, which has {HF_CONFIG}, or a timm export, "
                                  f"which has {TIMM_CONFIG})") from None
        raise


def write_status(run_dir: str | os.PathLike, status: str, step: int, total_steps: int,
                 reason: str | None = None) -> None:
    """``RUN_DIR/status.json``: ``running`` (at the start and each checkpoint), ``stopped`` (by a signal),
    ``collapsed`` (stopped by the collapse check; ``reason`` says what collapsed) or ``finished``, with the step of
    ``checkpoints/last.pt``, the run's total, and the host and process that wrote it; lets a re-run see what is
    left to do, and whether the run is live elsewhere."""
    record = {"status": status, "step": int(step), "total_steps": int(total_steps),
              "checkpoint": LAST_CHECKPOINT.as_posix(), "host": socket.gethostname(), "pid": os.getpid(),
              **({"reason": reason} if reason else {})}
    atomic_write_text(Path(run_dir) / STATUS_FILE, json.dumps(record, indent=2) + "\n")


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What :func:`write_status` wrote, or None (no run there yet, or an unreadable file)."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``None`` (fresh run), ``auto`` or a path.

    ``auto`` means ``RUN_DIR/checkpoints/last.pt`` when it exists, else a fresh start.
    """
    if resume is None:
        return None
    if resume == "auto":
        last = last_checkpoint(run_dir)
        return last if last.is_file() else None
    path = Path(resume)
    if path.is_dir():  # a run directory
        path = last_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"resume={resume}: no checkpoint found at {path}")
    return path


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """Whether ``RUN_DIR/checkpoints/`` holds ``last.pt`` or a periodic ``step_XXXXXXX.pt``."""
    folder = Path(run_dir) / LAST_CHECKPOINT.parent
    return last_checkpoint(run_dir).is_file() or any(folder.glob("step_*.pt"))


def resume_null_message(run_dir: Path) -> str:
    held = "checkpoints/last.pt" if last_checkpoint(run_dir).is_file() else "periodic checkpoints (step_*.pt)"
    return (f"{run_dir} already holds {held} from an earlier run and resume=null would overwrite it; "
            "pass resume=auto to continue that run, or run_name=NEW_NAME for a new one")


def finished_run(run_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """``RUN_DIR/status.json`` if ``run_dir`` holds a finished run as long as ``cfg`` asks for, else None."""
    status, saved = read_status(run_dir), run_dir / "config.yaml"
    if not (status and status.get("status") == "finished" and saved.is_file()):
        return None
    if not zipfile.is_zipfile(run_dir / "checkpoints" / "last.pt"):
        return None  # damaged or gone: the run itself names the checkpoint it can read (torch's format is a zip)
    try:
        old = OmegaConf.load(saved)
        same = (old.optim.epochs, old.optim.max_steps) == (cfg.optim.epochs, cfg.optim.max_steps)
    except Exception:  # an unreadable config.yaml: let the run itself decide
        return None
    return status if same else None


def complete_message(run_dir: Path, step: int, total_steps: int, checkpoint: Path | None = None) -> str:
    """What a run with nothing left to do says. ``checkpoint``: the one it was read from, named when it is not
    ``last.pt`` (an unreadable ``last.pt`` was passed over: naming it would send the user to a broken file, and
    ``msn-export RUN_DIR`` reads it)."""
    last = f"{run_dir}/checkpoints/last.pt"
    where = last if checkpoint is None or checkpoint.name == "last.pt" else (
        f"{checkpoint} ({last} is missing or unreadable and was passed over): export it with msn-export "
        f"{checkpoint} OUT")
    return (f"{run_dir} is complete (step {step} of {total_steps}): nothing to do. Its checkpoint is {where}; to "
            f"train it longer pass a larger optim.epochs with resume={run_dir}, for a new run pass run_name=NEW_NAME")


def safe_name(name: str, limit: int = 100) -> str:
    """A single folder name: path separators and unusual characters replaced, long names shortened with a hash."""
    cleaned = re.sub(r"[^A-Za-z0-9._=,+\-\[\]@]", "_", str(name)).strip("._")
    if len(cleaned) > limit:
        digest = hashlib.sha1(cleaned.encode()).hexdigest()[:8]
        cleaned = f"{cleaned[:limit - 9]}-{digest}"
    return cleaned
