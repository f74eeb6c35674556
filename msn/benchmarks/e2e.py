"""msn-bench e2e: the real trainer for a few steps, its steady images/s, and the ratio to the step alone.

The trainer runs as a separate ``msn-pretrain`` process (exactly what a user runs: loader, workers,
augmentation, copies, step, logging) in a temporary run folder, logging every few steps; the first
``warmup`` steps (start-up, compilation, the workers' first batches) are left out. Then the step alone
(:func:`msn.benchmarks.step.bench_step`: random views already on the device) is timed in this process
with the same overrides, so the ratio says how much of the step's speed the input pipeline keeps.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from msn.benchmarks.step import bench_step
from msn.config import ConfigError
from msn.data.loader import loader_workers
from msn.data.multicrop import augment_in_workers
from msn.utils.device import resolve_device

QUIET = ["logger=csv", "logger.progress=false", "logger.console_every=0", "monitor.every_steps=0",
         "checkpoint.every_steps=0", "checkpoint.last_every_steps=0"]


def log_interval(warmup: int, steps: int) -> int:
    """Steps between two log rows: a divisor of both ``warmup`` and ``steps`` (so rows split there), at most 10.

    Each log reads the step's figures back, which waits for the device; every step would hide the
    overlap of input and compute that the benchmark is about.
    """
    common = math.gcd(warmup, steps)
    return max(d for d in range(1, min(common, 10) + 1) if common % d == 0)


def steady_images_per_s(metrics_csv: Path, warmup: int, global_batch: int) -> float:
    """Images/s over the log rows after step ``warmup``: images over the summed time of those rows."""
    with metrics_csv.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("images_per_s")]
    images = seconds = 0.0
    last = 0
    for row in rows:
        step = int(row["step"])
        if step > warmup:
            n = (step - last) * global_batch
            images += n
            seconds += n / float(row["images_per_s"])
        last = step
    if seconds == 0:
        raise ConfigError(f"no log rows after the {warmup} warm-up steps in {metrics_csv}; run more --steps")
    return images / seconds


def bench_e2e(cfg: DictConfig, *, overrides: list[str], steps: int = 60, warmup: int = 20,
              step_steps: int = 10) -> dict[str, Any]:
    """Run the trainer (``msn-pretrain OVERRIDES``, in a process of its own) for ``steps`` steps and time the
    step of ``cfg`` (composed from the same overrides) alone; see the module docstring."""
    if not 0 < warmup < steps:
        raise ConfigError(f"--warmup {warmup} must lie between 0 and --steps {steps}")
    every = log_interval(warmup, steps)
    with tempfile.TemporaryDirectory(prefix="msn-e2e-") as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "msn.train", *overrides, *QUIET, f"logger.log_every={every}",
                   f"optim.max_steps={steps}", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", "resume=null"]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
            raise ConfigError(f"the trainer failed: {lines[-1]}")
        global_batch = int(json.loads((run_dir / "run.json").read_text())["global_batch_size"])
        e2e = steady_images_per_s(run_dir / "metrics.csv", warmup, global_batch)
    step = bench_step(cfg, overrides=overrides, steps=step_steps, warmup=3)
    return {
        "overrides": overrides, "device": step["device"], "device_name": step["device_name"],
        "batch": step["batch"], "steps": steps, "warmup": warmup, "num_workers": loader_workers(cfg.data.num_workers),
        "augment_on": "cpu" if cfg.data.decode_on != "device" and augment_in_workers(
            cfg.data.augment_on, resolve_device(cfg.device)) else "device",
        "decode_on": str(cfg.data.decode_on), "e2e_images_per_s": e2e, "step_images_per_s": step["img_s"],
        "ratio": e2e / step["img_s"],
    }
