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


# The characters of a run folder's name: none that a shell or Hydra's override grammar would make a user quote
# (``=``, ``,``, spaces, quotes, braces, ``*``, ``$``), so that ``resume=outputs/NAME`` and ``cd outputs/NAME`` are
# typed as printed.
_NAME_CHARS = r"A-Za-z0-9._+@-"
NAME_LIMIT = 100  # characters of a generated name; longer ones drop whole items and end with a hash


def run_directory(root: str, run_name: str | None, overrides: str | None, resume: str | None,
                  excluded: Sequence[str] = ()) -> str:
    """``hydra.run.dir``: one stable folder per run, so that the same command continues the same run.

    ``resume=RUN_DIR`` (or a checkpoint under ``RUN_DIR/checkpoints/``) continues in RUN_DIR. Otherwise
    the folder is ``ROOT/RUN_NAME``, where the name is ``run_name`` or, by default, built from Hydra's
    ``override_dirname``: the command line's overrides that change the result (msn/configs/config.yaml lists
    those that do not, such as ``resume``, ``device`` or ``logger.*``), the experiment's name first, then
    ``key-value`` items joined by ``_``, for example ``outputs/cpu_smoke_optim.lr-1e-3``; ``outputs/default``
    without any (:func:`overrides_name`). ``excluded``: the keys that do not name a run (Hydra's
    ``exclude_keys``, which leaves out the keys themselves), whose sub-keys (``+monitor.options.k=10``) are left
    out here. A run started before names took this form (``outputs/cpu_smoke,optim.lr=1e-3``) is continued in
    its folder by the same command.
    """
    if resume not in (None, "auto") and (resumed := run_dir_of(str(resume))) is not None:
        return str(resumed)
    if run_name:
        folder, earlier = Path(root) / run_folder_name(str(run_name)), Path(root) / safe_name(str(run_name))
        return str(earlier if not folder.exists() and earlier.is_dir() else folder)  # (as for the comma names)
    pairs = [(key, value) for key, value in _override_pairs(overrides or "")
             if not any(key.lstrip("+~").startswith(f"{node}.") for node in excluded)]
    folder = Path(root) / overrides_name(pairs)
    earlier = Path(root) / _comma_name(pairs)  # the name such a run had before (cheap to keep continuing it)
    return str(earlier if not folder.exists() and earlier.is_dir() else folder)


def overrides_name(pairs: Sequence[tuple[str, str]]) -> str:
    """The folder name of a run with these (key, value) overrides: the experiment's name, then ``key-value``
    items (``optim.lr-1e-3``, a path's last part with a hash: ``data.root-train-1a2b3c``), joined by ``_``.

    Only :data:`_NAME_CHARS`; a name over :data:`NAME_LIMIT` characters keeps its first whole items and ends
    with ``_N-more-HASH`` (a hash of every override), so that no value is ever shown cut (``max_steps-3`` for
    ``max_steps=30``) and two runs never share a folder."""
    pairs = dict(pairs)  # a key given twice (refused by msn-pretrain; a library caller's): the last value, as Hydra
    items = [_name_value(value) if key == "experiment" else f"{_name_key(key)}-{_name_value(value)}"
             for key, value in sorted(pairs.items(), key=lambda kv: kv[0] != "experiment")]
    name = "_".join(items)
    if len(name) <= NAME_LIMIT:
        return name or "default"
    digest = hashlib.sha1(repr(sorted(pairs.items())).encode()).hexdigest()[:8]
    for kept in range(len(items) - 1, -1, -1):
        tail = f"{len(items) - kept}-more-{digest}"
        name = "_".join([*items[:kept], tail])
        if len(name) <= NAME_LIMIT:
            return name
    return tail  # unreachable: the tail alone fits


def _name_key(key: str) -> str:
    """``+monitor.options.k`` -> ``monitor.options.k``; ``~key`` (delete) -> ``del-key``."""
    if key.startswith("~"):
        return "del-" + key.lstrip("~")
    return key.lstrip("+")


def _name_value(value: str) -> str:
    """A value as a name part: a path's last part with a hash of the whole path (``/data/x/train`` ->
    ``train-1a2b3c``: two paths ending alike name two folders), a list's items joined by ``-`` (``[0.9,0.95]`` ->
    ``0.9-0.95``); any other character outside :data:`_NAME_CHARS` is replaced, and a hash added, so that two
    values (``猫`` and ``犬``) name two folders."""
    path = "/" in value
    shown = (value.rstrip("/").rsplit("/", 1)[-1] or "root") if path else value
    plain = re.sub(r"[\s,]+", "-", re.sub(r"[\[\]{}()]", "", shown)).strip("-")
    cleaned = re.sub(f"[^{_NAME_CHARS}]+", "-", plain).strip("-")
    if path or cleaned != plain or not cleaned:
        cleaned = f"{cleaned}-{hashlib.sha1(value.encode()).hexdigest()[:6]}".lstrip("-")
    return cleaned


def _comma_name(pairs: Sequence[tuple[str, str]]) -> str:
    """A run folder's name before :func:`overrides_name` (``cpu_smoke,optim.lr=1e-3``), so that the same command
    continues a run started then."""
    parts = [value if key == "experiment" else f"{key}={_short_value(value)}" for key, value in dict(pairs).items()]
    name = ",".join(parts)
    cleaned = safe_name(name)
    if cleaned != name:
        cleaned = safe_name(f"{cleaned}-{hashlib.sha1(name.encode()).hexdigest()[:8]}")
    return cleaned or "default"


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
    """``run_name=NAME`` as a folder name: characters outside :data:`_NAME_CHARS` (``/``, spaces, ``=``, non-ASCII
    letters) replaced, with a hash of the original when any was, so that ``猫`` and ``犬`` name two folders."""
    cleaned = re.sub(f"[^{_NAME_CHARS}]", "_", name).strip("._")
    if cleaned == name and len(name) <= NAME_LIMIT:
        return cleaned
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{cleaned[:NAME_LIMIT - 9]}-{digest}".lstrip("-")
