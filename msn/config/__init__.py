"""msn-pretrain's config: the schema (:mod:`.schema`), the value checks (:mod:`.checks`) and the run
directories and composition under Hydra (:mod:`.runs`). Everything is importable from ``msn.config``.

The dataclasses are registered in Hydra's ConfigStore as ``msn_schema``; ``configs/config.yaml`` lists
it first in its defaults, so a misspelt key or a wrongly typed value in any YAML file or command-line
override fails during composition. :func:`validate` then checks the values that a type cannot express
(ranges, divisibility, names) before any compute starts.
"""

from msn.config.checks import PROGRESS_MODES, progress_bar_disabled, to_schema, unknown_keys, validate
from msn.config.runs import (
    CONFIG_DIR,
    START_TIME_ENV,
    CheckBeforeRun,
    complete_message,
    compose_run_config,
    finished_run,
    load_run_config,
    register_configs,
    resume_null_message,
    run_directory,
    safe_name,
    start_time,
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

__all__ = [
    "CONFIG_DIR", "DEFAULT_CROP_PCT", "PROGRESS_MODES", "START_TIME_ENV", "CheckBeforeRun", "CheckpointConfig",
    "ConfigError", "DataConfig", "LoggerConfig", "LossConfig", "MSNConfig", "MaskingConfig", "ModelConfig",
    "MonitorConfig", "OptimConfig", "WandbConfig", "check_crop_pct", "complete_message", "compose_run_config",
    "finished_run", "load_run_config", "model_arch", "progress_bar_disabled", "register_configs",
    "resume_null_message", "run_directory", "safe_name", "start_time", "to_schema", "unknown_keys", "validate",
]
