"""The config layer: the schema (:mod:`.schema`), the value checks (:mod:`.checks`) and the architecture
presets (:mod:`.arch`). It imports only omegaconf and :mod:`msn.errors`; every other layer may import it.

The dataclasses are registered in Hydra's ConfigStore as ``msn_schema`` by the command line
(:func:`msn.cli.hydra.register_configs`); ``msn/configs/config.yaml`` lists it first in its defaults, so a
misspelt key or a wrongly typed value in any YAML file or command-line override fails during composition.
:func:`validate` then checks the values that a type cannot express (ranges, divisibility, names) before
any compute starts. The YAML files ship inside the package, in :data:`CONFIG_DIR`.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

from msn.config.checks import (
    PROGRESS_MODES,
    load_run_config,
    progress_bar_disabled,
    to_schema,
    unknown_keys,
    validate,
)
from msn.config.schema import (
    DEFAULT_CROP_PCT,
    CheckpointConfig,
    DataConfig,
    LoggerConfig,
    LossConfig,
    MaskingConfig,
    ModelConfig,
    MonitorConfig,
    MSNConfig,
    OptimConfig,
    WandbConfig,
    check_crop_pct,
    model_arch,
)
from msn.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the shipped Hydra configs (package data)

__all__ = [
    "CONFIG_DIR", "DEFAULT_CROP_PCT", "PROGRESS_MODES", "CheckpointConfig", "ConfigError", "DataConfig",
    "LoggerConfig", "LossConfig", "MSNConfig", "MaskingConfig", "ModelConfig", "MonitorConfig", "OptimConfig",
    "WandbConfig", "check_crop_pct", "load_run_config", "model_arch", "progress_bar_disabled", "to_schema",
    "unknown_keys", "validate",
]

# Names that lived here before the Hydra glue moved to the command-line layer and the run-directory helpers
# to msn.utils.rundir. They resolve for one more release, with a FutureWarning, and only when asked for:
# importing msn.config itself loads neither module (the config layer imports no layer above it).
_MOVED = {
    "CheckBeforeRun": "msn.cli.hydra", "register_configs": "msn.cli.hydra", "compose_run_config": "msn.cli.hydra",
    "run_directory": "msn.cli.hydra", "start_time": "msn.cli.hydra", "START_TIME_ENV": "msn.cli.hydra",
    "complete_message": "msn.utils.rundir", "finished_run": "msn.utils.rundir",
    "resume_null_message": "msn.utils.rundir", "safe_name": "msn.utils.rundir",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"msn.config.{name} moved to {_MOVED[name]}.{name}; the old name goes in the next release",
                      FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'msn.config' has no attribute {name!r}")
