"""``msn-pretrain``: the Hydra command line around :func:`msn.train.train`.

A thin shell that imports torch only once there is something to train: ``--help``, ``--cfg`` and a
config refused by :class:`msn.cli.checks.CheckBeforeRun` (an unknown key, a bad value, a run that exists)
answer in about a second, where importing torch, torchvision and timm takes about ten on a 2-core CPU.
``python -m msn.train`` and ``torchrun -m msn.train`` run this same entry point.
"""

from __future__ import annotations

import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from msn.cli.checks import CREATED_RUN_DIRS
from msn.cli.errors import explain_hydra_error, fail
from msn.cli.logs import console_logging
from msn.cli.sweep_jobs import record_failed_job
from msn.config import CONFIG_DIR
from msn.errors import MSNError
from msn.utils.compose import register_configs
from msn.utils.launcher import process_info
from msn.utils.rundir import has_checkpoints
from msn.utils.runlock import LockLost, release_run_lock
from msn.utils.runname import START_TIME_ENV

# At import: a submitit job process imports this module to unpickle the task, and composes its config
# (``${start_time:}``, ``${msn_run_dir:}``) before the task runs.
register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from msn.train import train  # torch and the rest: the config passed its check
    from msn.train.signals import StopRequest
    from msn.utils.device import configure_matmul, resolve_device

    overrides = list(HydraConfig.get().overrides.task)
    if process_info() is None:
        command = shlex.join(["msn-pretrain", *overrides])
    else:
        command = "the same launch command (torchrun or srun), whose overrides are: " + shlex.join(overrides)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    console_logging()  # the library's log lines, printed as msn-pretrain always printed them
    # the command owns the process's signals (train() as a library leaves them alone) and says why a job ends
    stop = StopRequest(report=lambda line: fail("msn-pretrain", line))
    try:
        configure_matmul(resolve_device(cfg.device), cfg.tf32)  # process-wide: the entry point's decision
        train(cfg, command, stop=stop)
    except MSNError as e:
        if not isinstance(e, LockLost):  # a folder that is no longer this run's is left alone
            _forget_refused_run(run_dir)
        code = fail("msn-pretrain", e)
        if not record_failed_job(run_dir, e):  # a sweep's job: recorded, and the sweep goes on to the next job
            sys.exit(code)
    finally:
        stop.restore()
        release_run_lock(run_dir)


def _forget_refused_run(run_dir: Path) -> None:
    """A run refused before it trained a step leaves no folder behind, if this command created the folder."""
    import shutil

    if str(run_dir.resolve()) not in CREATED_RUN_DIRS or has_checkpoints(run_dir):
        return
    metrics = run_dir / "metrics.csv"
    if metrics.is_file() and len(metrics.read_text(errors="replace").splitlines()) > 1:
        return  # it logged steps: the record of why it stopped stays
    release_run_lock(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    """Console entry point ``msn-pretrain``.

    Under torchrun or srun the process group is joined before Hydra starts, so that rank 0's start
    time names the one run directory every rank uses (``${start_time:}`` in msn/configs/config.yaml).
    """
    if process_info() is not None:
        from msn.utils import distributed

        distributed.init_from_env()
        os.environ[START_TIME_ENV] = distributed.broadcast_object(datetime.now().isoformat())
    # Hydra prints its own errors as a block that ends "Set the environment variable HYDRA_FULL_ERROR=1";
    # with it set, they reach us and become one line. A user who set it gets Hydra's full traceback.
    users_setting = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        if users_setting == "1":
            raise
        sys.exit(fail("msn-pretrain", explain_hydra_error(e)))
    except KeyboardInterrupt:
        sys.exit(fail("msn-pretrain", "stopped at once by a second Ctrl-C; the last checkpoint written is kept, "
                      "and resume=auto continues from it"))
    finally:  # as the user had it (a second call in one process, a test, must not see ours)
        if users_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = users_setting


if __name__ == "__main__":
    main()
