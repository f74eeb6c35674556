"""The checks msn-pretrain makes before Hydra writes into a run folder: :class:`CheckBeforeRun`, the Hydra callback
that msn/configs/config.yaml installs, and :func:`check_before_run`, what it refuses (torch-free)."""

from __future__ import annotations

import itertools
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from msn.cli.errors import any_error_line, fail
from msn.config import monitor_protocols, to_schema
from msn.data.registry import check_source
from msn.errors import ConfigError, MSNError
from msn.eval.registry import get_protocol
from msn.eval.splits import check_eval_dataset
from msn.train.terms import check_extra_terms
from msn.utils.launcher import process_info
from msn.utils.rundir import complete_message, finished_run, has_checkpoints, resume_null_message
from msn.utils.runlock import RunBusy, acquire_run_lock


class CheckBeforeRun(Callback):
    """Hydra callback (msn/configs/config.yaml): refuse a bad run before Hydra creates or writes its directory.

    Hydra saves ``.hydra/`` in the run directory before the job starts; a run that is going to be refused
    must leave the folder as it was (or leave none). Checked here: the config, the data paths, the device and
    precision, ``init_from`` and the monitor's dataset, a folder that holds someone else's files, ``resume=null``
    over an earlier run, a key given twice, and a run that another process trains (whose lock this process then
    holds for the run's life). A multirun checks every job's values before the first job starts. Prints one line,
    exit 1, whatever goes wrong here: Hydra would turn any other exception of a callback into a warning and run
    the job anyway.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # what Hydra does first thing in run_job: ${hydra:...} resolves
        try:
            check_overrides_once(config.hydra.overrides.task)
            cfg = to_schema({**task_config(config), "given": list(config.hydra.overrides.task)})
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
            check_before_run(cfg, run_dir)
            status = finished_run(run_dir, cfg) if resumes_the_run(cfg.resume, run_dir) else None
            if status is not None:
                print(complete_message(run_dir, status["step"], status["total_steps"]), flush=True)
                sys.exit(0)  # without touching the finished run: Hydra has not written anything yet
            info = process_info()  # in a multi-process job rank 0 locks (the others wait for it in the group)
            if info is None or info.rank == 0:
                created = not run_dir.exists()
                try:
                    acquire_run_lock(run_dir)
                except RunBusy:
                    raise  # (another process's folder: made by it, whatever this one saw a moment before)
                except BaseException:
                    if created:  # the lock made the folder and then failed: take back what this command made
                        shutil.rmtree(run_dir, ignore_errors=True)
                    raise
                if created:
                    CREATED_RUN_DIRS.add(str(run_dir.resolve()))
                LOCKED_RUN_DIRS.add(str(run_dir))
        except Exception as e:  # ours, omegaconf's for a wrongly typed value, a folder it cannot make, anything
            sys.exit(fail("msn-pretrain", any_error_line(e, "the check before the run failed")))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job's values, before the first job runs (a sweep must not fail at its last job)."""
        from hydra import compose

        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        swept = [f"{key}={value}" for key, value in params.items()]  # a sweep config's grid (sweep=lr_mask)
        search = str(OmegaConf.select(config, "hydra.sweeper._target_")).endswith(OPTUNA_SWEEPER)
        try:
            check_overrides_once(config.hydra.overrides.task)
            if search:  # an Optuna search (hydra/sweeper=optuna): the corners of its space, in its grammar
                from msn.sweeps.optuna import parse_space

                jobs = parse_space([*swept, *config.hydra.overrides.task]).corners()
            else:
                jobs = sweep_jobs([*swept, *config.hydra.overrides.task])
        except MSNError as e:
            sys.exit(fail("msn-pretrain", f"{e}; no job was run"))
        what = "a corner of the search space" if search else "job {number} of the sweep"
        for number, job in enumerate(jobs):
            try:
                cfg = compose("config", overrides=[*job, "run_dir=."])
                check_before_run(to_schema({**task_config(cfg), "given": list(job)}), None)
            except Exception as e:  # one line, never Hydra's warning and a sweep that runs anyway
                line = any_error_line(e, "its check failed")
                sys.exit(fail("msn-pretrain", f"{what.format(number=number)} ({' '.join(job)}): {line}; "
                              "no job was run"))


OPTUNA_SWEEPER = "msn_optuna_sweeper.OptunaSweeper"  # hydra/sweeper=optuna: msn/configs/hydra/sweeper/optuna.yaml


def check_overrides_once(overrides: Sequence[str]) -> None:
    """Refuse a key given twice on one command line (``data.batch_size=4 data.batch_size=8``): Hydra would take
    the last value silently. A :class:`ConfigError` naming the key and both values, or the brace pattern the
    shell expanded into many (``data.shards=/x/{0..9}.tar`` unquoted). (A library caller's list of overrides,
    :func:`msn.utils.compose.compose_config`, keeps Hydra's rule: a base list plus changes.)"""
    given: dict[str, list[str]] = {}
    for override in overrides:
        given.setdefault(override.split("=", 1)[0].lstrip("+~").strip(), []).append(override)
    for key, values in given.items():
        if len(values) < 2:
            continue
        pattern = _brace_range_of([v.split("=", 1)[-1] for v in values])
        if pattern is not None:
            raise ConfigError(f"{key} is given {len(values)} times ({values[0]} ... {values[-1]}): the shell expanded "
                              f"a brace pattern; quote it: '{key}={pattern}'")
        times = "twice" if len(values) == 2 else f"{len(values)} times"
        raise ConfigError(f"{key} is given {times} ({values[0]} and {values[-1]}); give it once")


def _brace_range_of(values: list[str]) -> str | None:
    """The brace range a shell expanded into ``values`` (``a-0.tar``, ``a-1.tar`` -> ``a-{0..1}.tar``), or None."""
    import os.path
    import re

    prefix = os.path.commonprefix(values)
    prefix = prefix.rstrip("0123456789")
    suffix = os.path.commonprefix([v[len(prefix):][::-1] for v in values])[::-1].lstrip("0123456789")
    if not (prefix or suffix):
        return None  # bare numbers (optim.lr=1 optim.lr=2): a key typed twice, not a pattern the shell expanded
    middles = [v[len(prefix):len(v) - len(suffix)] for v in values]
    if not all(re.fullmatch(r"\d+", m) for m in middles):
        return None
    if [int(m) for m in middles] != list(range(int(middles[0]), int(middles[0]) + len(middles))):
        return None
    return f"{prefix}{{{middles[0]}..{middles[-1]}}}{suffix}"


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs a multirun of ``overrides`` runs: the product of every swept override's values (``a=1,2 b=x,y``:
    four jobs), each job the list of its overrides, in Hydra's basic sweeper's order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override() and not override.is_discrete_sweep():  # interval(a, b): a range to search
            raise ConfigError(f"{override.input_line}: an interval is searched, not run as a list of jobs: add "
                              "hydra/sweeper=optuna, or list values (a,b,c)")
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


def task_config(config: DictConfig) -> dict[str, Any]:
    """The run's own part of a composed config (Hydra's ``hydra`` node left out), interpolations unresolved."""
    return {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k != "hydra"}


CREATED_RUN_DIRS: set[str] = set()  # run directories this process created: removed again if the run is refused
LOCKED_RUN_DIRS: set[str] = set()  # run directories the check locked: released if Hydra fails before the run


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
    # The cheap part of the data check (torch-free): no run folder for a typo in a path or a shard pattern.
    check_source(cfg.data)
    check_extra_terms(cfg.loss.extra_terms)  # the user's loss terms can be imported
    labelled, _ = monitor_protocols(cfg.monitor.protocol)
    if cfg.monitor.every_steps and labelled is not None:  # rankme alone reads the training images, no labelled set
        check_eval_dataset(cfg.monitor.dataset, "monitor.dataset", "or set monitor.every_steps=0")
        get_protocol(labelled).resolve(cfg.monitor.options, "monitor.options")
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
