"""Shared fixtures: composing the real Hydra configs and locating the reference figures."""

from __future__ import annotations

import atexit
import csv
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from msn.config import CONFIG_DIR
from msn.utils.compose import register_configs

# Nothing in the tests may reach the Hugging Face hub (transformers, datasets): set before either is imported,
# since both read these once, at import.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"
# Caches the code under test writes (shard indexes, fetched shards) go to a folder of the test session's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="msn-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

REPO = Path(__file__).resolve().parent.parent
# A researcher's own package (tests/plugin/msnplugin): a dataset, a source, a loss term and a protocol, importable in
# this process as from an installed package; subprocesses get it through PYTHONPATH (plugin_env).
PLUGIN = REPO / "tests" / "plugin"
if str(PLUGIN) not in sys.path:
    sys.path.insert(0, str(PLUGIN))
REFERENCE = Path(os.environ.get("MSN_REFERENCE", REPO / "tests" / "reference" / "msn_original_reference.pt"))
STEP_REFERENCE = REFERENCE.parent / "msn_original_step_reference.pt"


@pytest.fixture(autouse=True)
def _msn_records_reach_caplog():
    """msn's log records reach pytest's ``caplog`` at INFO, whatever a command run in-process set up before (a
    command's console handler stops them at the ``msn`` logger); restored after each test."""
    logger = logging.getLogger("msn")
    saved = logger.level, logger.propagate, list(logger.handlers)
    logger.setLevel(logging.INFO)
    logger.propagate = True
    for handler in [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]:
        logger.removeHandler(handler)
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``configs/config.yaml`` with command-line style overrides, as ``msn-pretrain`` does."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    cfg.given = list(overrides)  # what msn-pretrain records: a fitted recipe (fit) leaves these alone
    return cfg


def plugin_env(**extra: str) -> dict[str, str]:
    """The environment of a command that uses the plugin package: it is on PYTHONPATH, as if installed."""
    path = os.pathsep.join(p for p in (str(PLUGIN), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``RUN_DIR/metrics.csv``, as the CSV reader gives them (strings)."""
    with (Path(run_dir) / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _load_reference(path: Path) -> dict:
    import torch

    if not path.is_file():  # the figures ship in tests/reference/: missing is a broken checkout, never a skip
        pytest.fail(f"reference figures not found at {path} (tests/reference/ is part of the repository; "
                    "MSN_REFERENCE points elsewhere)")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def reference() -> dict:
    """Loss parts and schedules of the original code (``msn_original_reference.pt``)."""
    return _load_reference(REFERENCE)


@pytest.fixture(scope="session")
def step_reference() -> dict:
    """Two whole training steps of the original code (``msn_original_step_reference.pt``)."""
    return _load_reference(STEP_REFERENCE)
