"""Metric sinks: a CSV file that is always written, and optionally a wandb run (offline by default)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from msn.config import ConfigError
from msn.utils.rundir import MONITOR_COLUMNS


class MetricsLogger:
    """Appends one row per logged step to ``RUN_DIR/metrics.csv`` and mirrors it to wandb.

    On resume, rows past the resumed step (written after the checkpoint was taken) are dropped so
    the file reads like one uninterrupted run.

    Args:
        run_dir: the run directory.
        cfg: the full (resolved) config; ``cfg.logger`` picks the sinks.
        columns: the file's columns (:func:`msn.utils.rundir.metrics_columns` of the loss's terms).
        start_step: global step the run starts (or resumes) from.
        wandb_run_id: id of the wandb run to continue, when resuming.
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, columns: list[str], start_step: int = 0,
                 wandb_run_id: str | None = None) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.columns = list(columns)
        self._truncate_after(start_step)
        new_file = not self.path.exists()
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        if new_file:
            self._writer.writeheader()
        self.wandb_run = None
        if cfg.logger.name == "wandb":
            self.wandb_run = _init_wandb(run_dir, cfg, wandb_run_id)

    @property
    def wandb_run_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def _truncate_after(self, step: int) -> None:
        """Keep the rows up to ``step`` (the checkpoint resumed from), each step once, under one header.

        Reading our own file must never stop a resume: rows that do not parse (a repeated header, a line cut
        by a crash, another program's columns) are left out, and a step logged twice keeps its last row.
        """
        if not self.path.exists():
            return
        kept: dict[int, dict[str, str]] = {}
        with self.path.open(newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.DictReader(f):
                try:
                    row_step = int(row.get("step") or "")
                except ValueError:
                    continue
                if row_step <= step and None not in row:  # None: more fields than columns
                    kept[row_step] = {k: row.get(k, "") for k in self.columns}
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(kept[s] for s in sorted(kept))

    def log(self, metrics: dict[str, float]) -> None:
        row = {k: metrics.get(k, math.nan) for k in self.columns}
        self._writer.writerow(row)
        self._file.flush()
        if self.wandb_run is not None:
            logged = {f"train/{k}": v for k, v in row.items()  # the monitor's figures only on its steps
                      if k != "step" and not (k in MONITOR_COLUMNS and math.isnan(v))}
            self.wandb_run.log(logged, step=int(row["step"]))

    def log_picture(self, name: str, picture: Any, step: int, caption: str = "") -> None:
        """A picture (PIL image) to wandb as ``pictures/NAME``; nothing without wandb."""
        if self.wandb_run is not None:
            wandb = import_wandb("logger=wandb")
            self.wandb_run.log({f"pictures/{name}": wandb.Image(picture, caption=caption)}, step=step)

    def log_prototype_use(self, counts: Any, step: int) -> None:
        """How often each prototype was the targets' argmax since the last call: a wandb histogram of the
        per-prototype counts, a bar chart of them sorted, and the share never used; nothing without wandb."""
        if self.wandb_run is None:
            return
        wandb = import_wandb("logger=wandb")
        counts = sorted((int(c) for c in counts), reverse=True)
        table = wandb.Table(data=[[rank, c] for rank, c in enumerate(counts)], columns=["prototype rank", "targets"])
        self.wandb_run.log({
            "prototypes/use": wandb.Histogram(np_histogram=_histogram(counts)),
            "prototypes/sorted_use": wandb.plot.bar(table, "prototype rank", "targets", title="prototype use, sorted"),
            "prototypes/unused_share": sum(c == 0 for c in counts) / max(len(counts), 1),
        }, step=step)

    def close(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _histogram(values: list[int], bins: int = 32) -> tuple[list[int], list[float]]:
    """numpy-style (counts, edges) of ``values``, as wandb.Histogram takes them."""
    import numpy as np

    hist, edges = np.histogram(np.asarray(values), bins=bins)
    return hist.tolist(), edges.tolist()


def import_wandb(what: str) -> Any:
    """The wandb module, or a :class:`ConfigError` saying that ``what`` needs it installed."""
    try:
        import wandb  # imported lazily: most runs log to CSV only
    except ImportError:
        raise ConfigError(f"{what} needs the wandb package, which is not installed: pip install wandb") from None
    return wandb


def _init_wandb(run_dir: Path, cfg: DictConfig, run_id: str | None) -> Any:
    """Start (or continue) a wandb run; offline mode needs no network and no account."""
    wandb = import_wandb("logger=wandb")

    w = cfg.logger.wandb
    return wandb.init(
        project=w.project,
        entity=w.entity,
        name=w.name,
        mode=w.mode,
        tags=list(w.tags),
        dir=str(run_dir),
        id=run_id,
        resume="allow" if run_id else None,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
