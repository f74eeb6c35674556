"""The Hydra glue of the command line: the schema in Hydra's ConfigStore, the resolvers that name run
directories, the callback that refuses a bad run before Hydra writes into its folder, and composing a run's
config outside the app (for msn-bench, msn-viz and the tests).

Library code never imports this module: it takes a composed, validated config (:func:`msn.config.to_schema`).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from msn.config import CONFIG_DIR
from msn.config.checks import to_schema
from msn.config.schema import MSNConfig
from msn.errors import ConfigError, MSNError
from msn.utils.launcher import process_info
from msn.utils.rundir import (
    complete_message,
    finished_run,
    has_checkpoints,
    resume_null_message,
    run_dir_of,
    safe_name,
)
from msn.utils.runlock import acquire_run_lock


class CheckBeforeRun(Callback):
    """Hydra callback (msn/configs/config.yaml): refuse a bad run before Hydra creates or writes its directory.

    Hydra saves ``.hydra/`` in the run directory before the job starts; a run that is going to be refused
    must leave the folder as it was (or leave none). Checked here: the config, the data paths, the device and
    precision, ``init_from`` and the monitor's dataset, a folder that holds someone else's files, ``resume=null``
    over an earlier run, and a run that another process trains (whose lock this process then holds for the
    run's life). A multirun checks every job's values before the first job starts. Prints one line, exit 1.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # what Hydra does first thing in run_job: ${hydra:...} resolves
        try:
            cfg = to_schema(task_config(config))
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
            check_before_run(cfg, run_dir)
            status = finished_run(run_dir, cfg) if resumes_the_run(cfg.resume, run_dir) else None
            if status is not None:
                print(complete_message(run_dir, status["step"], status["total_steps"]), flush=True)
                sys.exit(0)  # without touching the finished run: Hydra has not written anything yet
            info = process_info()  # in a multi-process job rank 0 locks (the others wait for it in the group)
            if info is None or info.rank == 0:
                if not run_dir.exists():
                    CREATED_RUN_DIRS.add(str(run_dir.resolve()))
                acquire_run_lock(run_dir)
        except (MSNError, ValueError) as e:  # ours, and omegaconf's ValidationError for a wrongly typed value
            sys.exit(f"msn-pretrain: error: {e}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job's values, before the first job runs (a sweep must not fail at its last job)."""
        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        for number, job in enumerate(jobs):
            try:
                cfg = compose("config", overrides=[*job, "run_dir=."])
                check_before_run(to_schema(task_config(cfg)), None)
            except (MSNError, ValueError) as e:
                sys.exit(f"msn-pretrain: error: job {number} of the sweep ({' '.join(job)}): {e}; no job was run")


def task_config(config: DictConfig) -> dict[str, Any]:
    """The run's own part of a composed config (Hydra's ``hydra`` node left out), interpolations unresolved."""
    return {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k != "hydra"}


CREATED_RUN_DIRS: set[str] = set()  # run directories this process created: removed again if the run is refused


def check_before_run(cfg: DictConfig, run_dir: Path | None) -> None:
    """Everything that can be refused before a run directory is made or written (``run_dir`` None: the values
    only, for a sweep's jobs). Raises an :class:`MSNError` naming the fix."""
    if run_dir is not None and cfg.resume is None and has_checkpoints(run_dir):
        raise ConfigError(resume_null_message(run_dir))
    if run_dir is not None:
        foreign = foreign_files(run_dir)
        if foreign:
            raise ConfigError(f"{run_dir} holds {', '.join(foreign)} but no msn run (no status.json, no checkpoints): "
                              "training there would overwrite them; pass another hydra.run.dir or run_name=NEW_NAME")
    if cfg.data.name == "folder":  # the cheap part of the data check: no run folder for a typo
        from msn.data import check_data_root

        check_data_root(cfg.data.root)
    if cfg.data.name == "fashion_mnist" or (cfg.monitor.every_steps and cfg.monitor.dataset == "fashion_mnist"):
        from msn.data import find_fashion_mnist

        find_fashion_mnist(cfg.data.root if cfg.data.name == "fashion_mnist" else None)
    if cfg.data.name == "webdataset":  # ... or for a shard pattern that names nothing or a missing shard
        from msn.data.shards import expand_shards

        expand_shards(cfg.data.shards)
    if cfg.data.name == "hf":
        from msn.data.hf import check_hf_source

        check_hf_source(cfg.data.path)
    if cfg.monitor.every_steps and cfg.monitor.dataset not in ("digits", "fashion_mnist"):
        folder = Path(str(cfg.monitor.dataset)).expanduser()
        if not ((folder / "train").is_dir() and (folder / "val").is_dir()):
            raise ConfigError(f"monitor.dataset={cfg.monitor.dataset} is not digits, fashion_mnist or a folder with "
                              "train/ and val/ class folders; fix it or set monitor.every_steps=0")
    if cfg.init_from is not None and not Path(str(cfg.init_from)).expanduser().exists():
        raise ConfigError(f"init_from={cfg.init_from} does not exist; give an original MSN checkpoint, a Hugging "
                          "Face ViTMSN folder, a timm .safetensors file or an msn run")
    if cfg.device == "cuda" or cfg.precision != "fp32":  # these need torch: asked only when they matter
        from msn.utils.device import autocast_dtype, resolve_device

        autocast_dtype(cfg.precision, resolve_device(cfg.device))


def foreign_files(run_dir: Path) -> list[str]:
    """The files of ``run_dir`` that a run would overwrite although no msn run wrote them (a user's project)."""
    if not run_dir.is_dir() or (run_dir / "status.json").is_file() or has_checkpoints(run_dir):
        return []  # an msn run (a copied one may lack its status.json, never its checkpoints)
    return [name for name in ("config.yaml", "run.json", "metrics.csv") if (run_dir / name).exists()]


def resumes_the_run(resume: str | None, run_dir: Path) -> bool:
    """Whether ``resume`` continues ``run_dir``'s newest state (auto, or the folder itself), as opposed to a fresh
    start or a checkpoint the user chose (``resume=RUN/checkpoints/step_X.pt`` rewinds even a finished run)."""
    if resume is None:
        return False
    if resume == "auto":
        return True
    return Path(str(resume)).expanduser().resolve() == run_dir.resolve()


START_TIME_ENV = "MSN_START_TIME"


def start_time(pattern: str) -> str:
    """``${start_time:%Y-%m-%d}``: the job's start time, the same on every rank of a multi-process job.

    ``msn-pretrain`` under torchrun or srun puts rank 0's clock (ISO format) in ``$MSN_START_TIME``
    before Hydra names the run directory, so all ranks share one directory; otherwise this is now.
    Like Hydra's ``${now:}``, a value is cached per config, and submitit jobs reuse the submitter's.
    """
    stamp = os.environ.get(START_TIME_ENV)
    return (datetime.fromisoformat(stamp) if stamp else datetime.now()).strftime(pattern)


def run_directory(root: str, run_name: str | None, overrides: str | None, resume: str | None) -> str:
    """``hydra.run.dir``: one stable folder per run, so that the same command continues the same run.

    ``resume=RUN_DIR`` (or a checkpoint under ``RUN_DIR/checkpoints/``) continues in RUN_DIR. Otherwise
    the folder is ``ROOT/RUN_NAME``, where the name is ``run_name`` or, by default, Hydra's
    ``override_dirname``: the command line's overrides that change the result (msn/configs/config.yaml lists
    those that do not, such as ``resume``, ``device`` or ``logger.*``), ``experiment=`` left out, for
    example ``outputs/cpu_smoke,optim.lr=0.001``; ``outputs/default`` without any.
    """
    if resume not in (None, "auto") and (resumed := run_dir_of(str(resume))) is not None:
        return str(resumed)
    if run_name:
        name, earlier = run_folder_name(str(run_name)), safe_name(str(run_name))
    else:
        pairs = dict(_override_pairs(overrides or ""))  # a key given twice: its last value, as Hydra takes it
        parts = [value if key == "experiment" else f"{key}={_short_value(value)}" for key, value in pairs.items()]
        name = run_folder_name(",".join(parts)) or "default"
        earlier = safe_name(re.sub(r"(^|,)experiment=", r"\1", overrides or "")) or "default"
    folder, before = Path(root) / name, Path(root) / earlier
    # A folder named before names were shortened and made unique: the same command still continues its run.
    return str(before if before != folder and before.is_dir() and not folder.exists() else folder)


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


def compose_run_config(overrides: list[str], placeholder_root: bool = False) -> DictConfig:
    """The validated msn-pretrain config for ``overrides``, composed without running the app (for tools).

    ``placeholder_root``: a folder dataset without ``data.root`` gets ``.`` (for tools that read no images).
    """
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=.", *overrides])
    if placeholder_root and cfg.data.name == "folder" and not cfg.data.root:
        cfg.data.root = "."
    return to_schema(cfg)


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore and the resolvers the shipped YAML uses
    (``${start_time:...}``, ``${msn_run_dir:...}``). Idempotent; every entry point calls it before composing."""
    ConfigStore.instance().store(name="msn_schema", node=MSNConfig)
    OmegaConf.register_new_resolver("start_time", start_time, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("msn_run_dir", run_directory, replace=True)


def error_line(error: BaseException) -> str:
    """The one line a command prints for ``error``: an :class:`MSNError`'s message, or a Hydra / omegaconf
    composition error explained (:func:`explain_hydra_error`)."""
    if isinstance(error, MSNError):
        return str(error).splitlines()[0]
    return explain_hydra_error(error)


def explain_hydra_error(error: BaseException) -> str:
    """Hydra's and omegaconf's composition errors as one line that names the fix: the nearest option of a
    group, the nearest real key (never Hydra's ``+key`` hint for a key the schema refuses), the expected type,
    or quoting for a value Hydra's grammar cannot read."""
    import difflib

    text = str(error)
    cause = str(error.__cause__ or "")
    missing = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        choices = re.findall(r"^\t(\S+)$", text.split("Available options", 1)[-1], flags=re.M)
        near = difflib.get_close_matches(option, choices, n=1)
        hint = f"did you mean {group}={near[0]}? " if near else ""
        return f"{group}={option} is not an option of {group}; {hint}choose one of {', '.join(choices)}"
    key = re.search(r"full_key: (\S+)", cause)
    if "could not be converted to" in cause and key:
        kind = re.search(r"converted to (\w+)", cause).group(1).lower()
        value = re.search(r"Value '([^']*)'", cause)
        expected = "a number" if kind in ("float", "int") else f"a {kind}"
        return f"{key.group(1)}={value.group(1) if value else '?'}: expected {expected} ({kind}); fix the value"
    override = re.search(r"Could not override '([^']+)'", text)
    if override or (key and "not in" in cause):
        name = override.group(1) if override else key.group(1)
        keys = schema_keys()
        near = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else "msn/config/schema.py lists the keys"
        return f"{name} is not a config group or key of msn-pretrain; {hint}"
    if "override_grammar" in text or "LexerNoViableAlt" in text or "mismatched input" in text:
        bad = re.search(r"(?:Error parsing override '|LexerNoViableAltException: )([^'\n]+)", text)
        shown = f"the override {bad.group(1)}" if bad else f"an override ({text.splitlines()[0]})"
        return (f"could not read {shown}: quote a value with spaces, braces or non-ASCII letters for Hydra, e.g. "
                "'data.root=\"/path/with spaces/ünïcode\"' (single quotes for the shell, double ones for Hydra)")
    return text.splitlines()[0] if text else type(error).__name__


def schema_keys() -> list[str]:
    """Every config key (``optim.lr``) and group (``model``) of msn-pretrain, for suggestions."""
    def walk(node: Any, prefix: str) -> list[str]:
        found = []
        for name, value in node.items():
            found.append(f"{prefix}{name}")
            if isinstance(value, DictConfig):
                found += walk(value, f"{prefix}{name}.")
        return found

    groups = [p.name for p in CONFIG_DIR.iterdir() if p.is_dir()]
    return sorted(set(walk(OmegaConf.structured(MSNConfig), "") + groups))
