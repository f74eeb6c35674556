"""The Hydra glue of the command line: the schema in Hydra's ConfigStore, the resolvers that name run
directories, the callback that refuses a bad run before Hydra writes into its folder, and composing a run's
config outside the app (for msn-bench, msn-viz and the tests).

Library code never imports this module: it takes a composed, validated config (:func:`msn.config.to_schema`).
"""

from __future__ import annotations

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
    last_checkpoint,
    live_elsewhere,
    read_status,
    resume_null_message,
    run_dir_of,
    safe_name,
)


class CheckBeforeRun(Callback):
    """Hydra callback (msn/configs/config.yaml): refuse a bad config before Hydra creates or writes the run directory.

    Hydra saves ``.hydra/`` in the run directory before the job starts; a run that is going to be refused
    (an unknown key, a bad value, ``resume=null`` over an earlier run's ``last.pt``) must leave it as it
    was. Prints one line and exits with code 1. Multirun jobs are checked by ``train`` itself.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # what Hydra does first thing in run_job: ${hydra:...} resolves
        task = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k != "hydra"}
        try:
            cfg = to_schema(task)
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
            if cfg.resume is None and last_checkpoint(run_dir).is_file():
                raise ConfigError(resume_null_message(run_dir))
            info = process_info()  # in a multi-process job rank 0 asks (the others see rank 0 itself running)
            pid = live_elsewhere(read_status(run_dir)) if info is None or info.rank == 0 else None
            if pid is not None:
                raise ConfigError(f"{run_dir} is being trained right now by process {pid}; wait for it to stop, or "
                                  "pass run_name=NEW_NAME for a separate run")
            if cfg.data.name == "folder":  # the cheap part of the data check: no run folder for a typo
                from msn.data import check_data_root

                check_data_root(cfg.data.root)
            if cfg.data.name == "fashion_mnist":  # ... or for a dataset that is not installed
                from msn.data import find_fashion_mnist

                find_fashion_mnist(cfg.data.root)
            if cfg.data.name == "webdataset":  # ... or for a shard pattern that names nothing or a missing shard
                from msn.data.shards import expand_shards

                expand_shards(cfg.data.shards)
            if cfg.data.name == "hf":
                from msn.data.hf import check_hf_source

                check_hf_source(cfg.data.path)
        except (MSNError, ValueError) as e:  # ours, and omegaconf's ValidationError for a wrongly typed value
            sys.exit(f"msn-pretrain: error: {e}")
        status = finished_run(run_dir, cfg) if cfg.resume is not None else None
        if status is not None:
            print(complete_message(run_dir, status["step"], status["total_steps"]), flush=True)
            sys.exit(0)  # without touching the finished run: Hydra has not written anything yet


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
        return str(Path(root) / safe_name(run_name))
    name = re.sub(r"(^|,)experiment=", r"\1", overrides or "")
    return str(Path(root) / (safe_name(name) or "default"))


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
