"""The config layer: the schema (:mod:`.schema`), the value checks (:mod:`.checks`) and the architecture
presets (:mod:`.arch`). It imports only omegaconf and :mod:`msn.errors`; every other layer may import it.

The dataclasses are registered in Hydra's ConfigStore as ``msn_schema`` (:func:`msn.utils.compose.register_configs`,
before any composition); ``msn/configs/config.yaml`` lists it first in its defaults, so a
misspelt key or a wrongly typed value in any YAML file or command-line override fails during composition.
:func:`validate` then checks the values that a type cannot express (ranges, divisibility, names) before
any compute starts. The YAML files ship inside the package, in :data:`CONFIG_DIR`.
"""

from __future__ import annotations

from pathlib import Path

from msn.config.checks import (
    PROGRESS_MODES,
    budget_seconds,
    fit_mode,
    load_run_config,
    monitor_protocols,
    progress_bar_disabled,
    to_schema,
    unknown_keys,
    validate,
)
from msn.config.schema import (
    DEFAULT_CROP_PCT,
    FIT_MODES,
    PRIORS,
    CheckpointConfig,
    CollapseConfig,
    DataConfig,
    DistConfig,
    LoggerConfig,
    LossConfig,
    MaskingConfig,
    ModelConfig,
    MonitorConfig,
    MSNConfig,
    OptimConfig,
    SweepConfig,
    WandbConfig,
    check_crop_pct,
    model_arch,
)
from msn.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the shipped Hydra configs (package data)

__all__ = [
    "CONFIG_DIR", "DEFAULT_CROP_PCT", "PRIORS", "PROGRESS_MODES", "CheckpointConfig", "CollapseConfig", "ConfigError",
    "DataConfig", "DistConfig", "FIT_MODES",
    "budget_seconds", "fit_mode", "LoggerConfig", "LossConfig", "MSNConfig", "MaskingConfig", "ModelConfig",
    "MonitorConfig", "OptimConfig", "SweepConfig", "WandbConfig", "check_crop_pct", "load_run_config", "model_arch",
    "monitor_protocols", "progress_bar_disabled",
    "to_schema", "unknown_keys", "validate",
]
