"""msn-viz curves: a run's metrics.csv against the step, or several runs (a sweep) overlaid: one panel per logged
column, so every term the loss returned (its own and a user's) gets one."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from msn.errors import VizError
from msn.plots.common import new_figure

# Panel titles of the columns every run logs; a loss term's panel is titled by its name.
TITLES = {"lr": "learning rate", "wd": "weight decay", "momentum": "EMA momentum", "sharpen_T": "sharpening T",
          "images_per_s": "images/s", "monitor": "monitor accuracy (%)", "encoder_grad_norm": "encoder grad norm",
          "skipped_images": "skipped images (epoch)"}
NOT_DRAWN = ("step", "epoch")


@dataclass
class RunMetrics:
    """One run's logged rows: ``columns[name]`` is a list of (step, value) with the non-numbers left out."""

    label: str
    columns: dict[str, list[tuple[int, float]]]


def read_metrics(run_dir: Path, label: str) -> RunMetrics:
    """``RUN_DIR/metrics.csv`` as series per column; a file that is not such a table (damaged, not text, without
    a ``step`` column) is a :class:`VizError` naming it."""
    path = run_dir / "metrics.csv"
    columns: dict[str, list[tuple[int, float]]] = {}
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise VizError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                step = int(row["step"])
                for name, text in row.items():
                    try:
                        value = float(text)
                    except (TypeError, ValueError):
                        continue
                    if name != "step" and not math.isnan(value):
                        columns.setdefault(name, []).append((step, value))
        except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as e:
            if isinstance(e, UnicodeDecodeError):  # decoded in chunks ahead of the csv reader: no line to tell
                reason = "not UTF-8 text"
            else:
                reason = "no step column" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:120]}"
                reason = f"line {reader.line_num}: {reason}"
            raise VizError(f"{path} is not a readable metrics table ({reason}); restore it, or leave that run "
                           "out") from None
    return RunMetrics(label, columns)


def run_label(run_dir: Path) -> str:
    """A sweep member's overrides (``.hydra/overrides.yaml``), else the folder's name."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        lines = [line.strip().removeprefix("- ").strip("'\"") for line in overrides.read_text().splitlines()]
        named = [line for line in lines if line and not line.startswith(("hydra", "logger", "checkpoint"))]
        if named:
            return " ".join(named)
    return run_dir.name


def find_runs(sources: list[Path]) -> list[RunMetrics]:
    """Each source is a run folder (with metrics.csv) or a folder of runs (a sweep: every subfolder that has one)."""
    runs = []
    for source in sources:
        if (source / "metrics.csv").is_file():
            runs.append(read_metrics(source, run_label(source)))
            continue
        members = sorted((p for p in source.glob("*/metrics.csv")), key=lambda p: (len(p.parent.name), p.parent.name))
        if not members:
            raise VizError(f"{source} holds no metrics.csv (nor do its subfolders); give a run directory or a "
                           "sweep directory")
        runs += [read_metrics(m.parent, run_label(m.parent)) for m in members]
    return runs


def panels(runs: list[RunMetrics]) -> list[str]:
    """The columns that get a panel: every column any run logged a number in (step and epoch left out), in the
    order of the runs' ``metrics.csv`` headers."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(name for name in run.columns if name not in NOT_DRAWN))
    return list(names)


def curves_figure(runs: list[RunMetrics], width: int = 1500, height: int = 1000):  # -> matplotlib Figure
    """A grid with one panel per logged column (:func:`panels`), each run one colour, ``width`` x ``height`` px at
    100 dpi."""
    names = panels(runs)
    if not names:
        raise VizError("the runs' metrics.csv hold no logged numbers yet; wait for the first logged step")
    cols = 3 if len(names) <= 9 else 4
    rows = math.ceil(len(names) / cols)
    fig = new_figure(width, height)
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, name in zip(axes.flat, names, strict=False):
        for run, colour in zip(runs, colours, strict=True):
            series = run.columns.get(name, [])
            if series:
                steps, values = zip(*series, strict=True)
                ax.plot(steps, values, "-", color=colour, label=run.label, linewidth=1.2,
                        marker="o" if len(series) < 3 else None)
        ax.set_title(TITLES.get(name, name), fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(runs) > 1 and handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(runs), 4), fontsize=7)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.95, bottom=0.12 if len(runs) > 1 else 0.06, hspace=0.4,
                        wspace=0.25)
    return fig
