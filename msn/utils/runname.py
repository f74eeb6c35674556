"""The names of run folders: one stable folder per run, so that the same command continues the same run, and the
start time that every rank of a job shares. Torch-free; the resolvers of the shipped YAML
(``${msn_run_dir:...}``, ``${start_time:...}``, registered by :func:`msn.utils.compose.register_configs`)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from msn.utils.rundir import run_dir_of, safe_name

START_TIME_ENV = "MSN_START_TIME"


def start_time(pattern: str) -> str:
    """``${start_time:%Y-%m-%d}``: the job's start time, the same on every rank of a multi-process job.

    ``msn-pretrain`` under torchrun or srun puts rank 0's clock (ISO format) in ``$MSN_START_TIME``
    before Hydra names the run directory, so all ranks share one directory; otherwise this is now.
    Like Hydra's ``${now:}``, a value is cached per config, and submitit jobs reuse the submitter's.
    """
    stamp = os.environ.get(START_TIME_ENV)
    return (datetime.fromisoformat(stamp) if stamp else datetime.now()).strftime(pattern)


def run_directory(root: str, run_name: str | None, overrides: str | None, resume: str | None,
                  excluded: Sequence[str] = ()) -> str:
    """``hydra.run.dir``: one stable folder per run, so that the same command continues the same run.

    ``resume=RUN_DIR`` (or a checkpoint under ``RUN_DIR/checkpoints/``) continues in RUN_DIR. Otherwise
    the folder is ``ROOT/RUN_NAME``, where the name is ``run_name`` or, by default, Hydra's
    ``override_dirname``: the command line's overrides that change the result (msn/configs/config.yaml lists
    those that do not, such as ``resume``, ``device`` or ``logger.*``), ``experiment=`` left out, for
    example ``outputs/cpu_smoke,optim.lr=1e-3``; ``outputs/default`` without any. ``excluded``: the keys that do
    not name a run (Hydra's ``exclude_keys``, which leaves out the keys themselves), whose sub-keys
    (``+monitor.options.k=10``) are left out here.
    """
    if resume not in (None, "auto") and (resumed := run_dir_of(str(resume))) is not None:
        return str(resumed)
    if run_name:
        return str(Path(root) / run_folder_name(str(run_name)))
    pairs = dict(_override_pairs(overrides or ""))  # a key given twice: its last value, as Hydra takes it
    pairs = {key: value for key, value in pairs.items()
             if not any(key.lstrip("+~").startswith(f"{node}.") for node in excluded)}
    parts = [value if key == "experiment" else f"{key}={_short_value(value)}" for key, value in pairs.items()]
    return str(Path(root) / (run_folder_name(",".join(parts)) or "default"))


def _override_pairs(overrides: str) -> list[tuple[str, str]]:
    """Hydra's ``override_dirname`` (``k1=v1,k2=[a,b]``) as (key, value) pairs: a comma starts a new pair only
    where a key and ``=`` follow, so list values keep theirs."""
    parts = re.split(r",(?=[+~]?[A-Za-z_][\w.@/]*=)", overrides) if overrides else []
    return [tuple(part.split("=", 1)) if "=" in part else (part, "") for part in parts]  # type: ignore[misc]


def _short_value(value: str) -> str:
    """A path keeps its last part (``data.root=/data/x/train`` -> ``train``), with a hash of the whole value so
    that two paths ending alike name two folders."""
    if "/" not in value:
        return value
    last = value.rstrip("/").rsplit("/", 1)[-1] or "root"
    return f"{last}-{hashlib.sha1(value.encode()).hexdigest()[:6]}"


def run_folder_name(name: str) -> str:
    """:func:`safe_name`, unique: when characters had to be replaced (``/``, spaces, non-ASCII letters), a hash
    of the original keeps two different values (``猫`` and ``犬``) from naming one folder."""
    cleaned = safe_name(name)
    if cleaned == name:
        return cleaned
    return safe_name(f"{cleaned}-{hashlib.sha1(name.encode()).hexdigest()[:8]}")
