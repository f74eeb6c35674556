"""A sweep's failed jobs: ``msn-pretrain`` records a job that failed (:func:`record_failed_job`) and, when the sweep
runs its jobs in this process, goes on to the next one; the sweep's summary (:mod:`msn.cli.sweep`) reads the record
(:func:`job_failure`). A module of its own: the console scripts import no other console script."""

from __future__ import annotations

import json
from pathlib import Path

from msn.cli.errors import any_error_line
from msn.sweeps.summary import FAILURE_FILE
from msn.utils.launcher import process_info

IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # jobs one after another, here


def record_failed_job(run_dir: Path, error: BaseException) -> bool:
    """Record a job of a multirun that failed with ``error`` in ``run_dir/failure.json``; True when the sweep
    runs its jobs in this process (Hydra's basic launcher), which must then go on to its next job rather than
    exit; False (nothing recorded) outside a multirun. A SLURM or submitit job is recorded too, and still ends
    with exit code 1: that is how its launcher learns of the failure."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    info = process_info()
    if (info is None or info.rank == 0) and run_dir.is_dir():
        reason = any_error_line(error, "the job")
        (run_dir / FAILURE_FILE).write_text(json.dumps({"reason": reason}, indent=2) + "\n")
    return str(HydraConfig.get().launcher.get("_target_")) == IN_PROCESS_LAUNCHER


def forget_failure(run_dir: Path) -> None:
    """A job that starts again (a rerun of the sweep) is no longer the failure an earlier attempt recorded."""
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)
