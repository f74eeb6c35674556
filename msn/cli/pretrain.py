"""``msn-pretrain``: the Hydra command line around :func:`msn.train.train`.

A thin shell that imports torch only once there is something to train: ``--help``, ``--cfg`` and a
config refused by :class:`msn.cli.checks.CheckBeforeRun` (an unknown key, a bad value, a run that exists)
answer in about a second, where importing torch, torchvision and timm takes about ten on a 2-core CPU.
``python -m msn.train`` and ``torchrun -m msn.train`` run this same entry point.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import threading
import traceback
from datetime import datetime
from pathlib import Path

import hydra
import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from msn.cli.checks import CREATED_RUN_DIRS, LOCKED_RUN_DIRS
from msn.cli.errors import error_line, fail, missing_package_header, os_error_line
from msn.cli.logs import console_logging
from msn.cli.sweep_jobs import forget_failure, record_failed_job
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


# whether Hydra handed over to the task (what fails before it is Hydra's or the check's), whether the task's
# signal handlers are installed (a Ctrl-C before them stops a run that has trained nothing), and whether a Ctrl-C
# came during start-up
_TASK = {"started": False, "handlers": False, "ctrl_c": False}


def _start_up_ctrl_c(number: int, frame: object) -> None:
    """SIGINT before the run's own handlers: Python's KeyboardInterrupt, and remembered. A KeyboardInterrupt
    raised while the interpreter runs a ``__del__``, a weakref callback or a library's bare ``except:`` (importing
    torch runs all of these) is swallowed; the flag is not, and the task honours it once its imports are done."""
    _TASK["ctrl_c"] = True
    raise KeyboardInterrupt


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    _TASK["started"], _TASK["handlers"] = True, False  # (each job of a sweep installs its own)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        from msn.train import train  # torch and the rest (seconds): the config passed its check
        from msn.train.signals import StopRequest
        from msn.utils.device import configure_matmul, resolve_device
    except KeyboardInterrupt:  # a Ctrl-C while starting: no step was trained, the folder this command made goes
        _forget_refused_run(run_dir)
        release_run_lock(run_dir)
        raise

    overrides = list(HydraConfig.get().overrides.task)
    cfg.given = overrides  # what the user set: a fitted recipe (fit) leaves it alone
    if process_info() is None:
        command = shlex.join(["msn-pretrain", *overrides])
    else:
        command = "the same launch command (torchrun or srun), whose overrides are: " + shlex.join(overrides)
    console_logging()  # the library's log lines, printed as msn-pretrain always printed them
    # the command owns the process's signals (train() as a library leaves them alone) and says why a job ends
    stop = StopRequest(report=lambda line: fail("msn-pretrain", line))
    if _TASK["ctrl_c"]:  # a start-up Ctrl-C that something swallowed: nothing was trained, and nothing will be
        stop.restore()
        raise KeyboardInterrupt
    _TASK["handlers"] = True  # from here a first Ctrl-C is ours: a stop at the next step, with a checkpoint
    forget_failure(run_dir)
    try:
        configure_matmul(resolve_device(cfg.device), cfg.tf32)  # process-wide: the entry point's decision
        train(cfg, command, stop=stop)
        if cfg.plan:  # printed, nothing trained: the folder the check made goes
            _forget_refused_run(run_dir)
    except MSNError as e:
        if not isinstance(e, LockLost):  # a folder that is no longer this run's is left alone
            _forget_refused_run(run_dir)
        code = fail("msn-pretrain", e)
        if not record_failed_job(run_dir, e):  # a sweep's job: recorded, and the sweep goes on to the next job
            sys.exit(code)
    except Exception as e:  # not bad input (a bug, CUDA out of memory): its traceback; a sweep still goes on
        if not record_failed_job(run_dir, e):
            raise
        traceback.print_exc()
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


# A brace range of a shard pattern (``shard-{000000..000099}.tar``), which Hydra's grammar cannot read unquoted.
_BRACE_RANGE = re.compile(r"\{[^{}]*\.\.[^{}]*\}")


def quote_brace_ranges(args: list[str]) -> list[str]:
    """The command line's overrides with every value that holds a brace range (``data.shards=/x/{0..9}.tar``)
    quoted for Hydra, as webdataset users type them. Each comma-separated value of a sweep
    (``-m data.shards=/a/{0..9}.tar,/b/{0..9}.tar``) is quoted on its own; a value already quoted, a list
    (``[...]``) or a sweep function (``choice(...)``) is left as typed. Hydra's flags and their values are kept."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if (not sep or arg.startswith("-") or not _BRACE_RANGE.search(value)
                or re.match(r"""\s*(['"\[]|\w+\()""", value)):
            quoted.append(arg)
            continue
        parts = re.split(r",(?![^{}]*\})", value)  # commas outside braces separate a sweep's values
        quoted.append(key + "=" + ",".join(_quote(part) if _BRACE_RANGE.search(part) else part for part in parts))
    return quoted


def _quote(value: str) -> str:
    """``value`` as one quoted Hydra string (single quotes, or double ones when it holds a single quote)."""
    quote = '"' if "'" in value else "'"
    return quote + value.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


def _forget_locked_runs() -> None:
    """Hydra stopped between the check (which locked the run folder) and the run: release the lock, and remove the
    folder if this command made it (:func:`_forget_refused_run`)."""
    for run_dir in list(LOCKED_RUN_DIRS):
        _forget_refused_run(Path(run_dir))
        release_run_lock(run_dir)


def main() -> None:
    """Console entry point ``msn-pretrain``.

    Under torchrun or srun the process group is joined before Hydra starts, so that rank 0's start
    time names the one run directory every rank uses (``${start_time:}`` in msn/configs/config.yaml).
    Everything that fails before training starts (Hydra's composition, a YAML file, the check before the run, a
    folder Hydra cannot write, a Ctrl-C) is one line.
    """
    if process_info() is not None:
        from msn.utils import distributed

        distributed.init_from_env()
        os.environ[START_TIME_ENV] = distributed.broadcast_object(datetime.now().isoformat())
    # Hydra prints its own errors as a block that ends "Set the environment variable HYDRA_FULL_ERROR=1";
    # with it set, they reach us and become one line. A user who set it gets Hydra's full traceback.
    users_setting = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    typed = sys.argv[1:]
    sys.argv[1:] = quote_brace_ranges(typed)  # Hydra reads sys.argv
    _TASK["started"] = _TASK["handlers"] = _TASK["ctrl_c"] = False
    LOCKED_RUN_DIRS.clear()
    users_handler = signal.getsignal(signal.SIGINT)
    # a Ctrl-C before the task's handlers is remembered (a shell's background job, which ignores it, keeps ignoring it)
    ours = users_handler is signal.default_int_handler and threading.current_thread() is threading.main_thread()
    if ours:
        signal.signal(signal.SIGINT, _start_up_ctrl_c)
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        if users_setting == "1":
            raise
        sys.exit(fail("msn-pretrain", missing_package_header(typed) or error_line(e)))
    except OSError as e:  # Hydra cannot make or write the run folder (after the check, before the task)
        if _TASK["started"] or users_setting == "1":
            raise
        _forget_locked_runs()
        sys.exit(fail("msn-pretrain", os_error_line(e)))
    except KeyboardInterrupt as e:
        signals = sys.modules.get("msn.train.signals")
        if signals is not None and isinstance(e, signals.SecondCtrlC):
            sys.exit(fail("msn-pretrain", "stopped at once by a second Ctrl-C; the last checkpoint written is kept, "
                          "and resume=auto continues from it"))
        if not _TASK["handlers"]:  # the default handler's: ours were not installed yet
            _forget_locked_runs()
            print("msn-pretrain: stopped by Ctrl-C before training started: nothing was trained; run the command "
                  "again to start", file=sys.stderr, flush=True)
            sys.exit(130)  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
        sys.exit(fail("msn-pretrain", "stopped by Ctrl-C; the last checkpoint written is kept, and resume=auto "
                      "continues from it"))
    finally:  # as the user had it (a second call in one process, a test, must not see ours)
        if ours:
            signal.signal(signal.SIGINT, users_handler)
        sys.argv[1:] = typed
        if users_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = users_setting


if __name__ == "__main__":
    main()
