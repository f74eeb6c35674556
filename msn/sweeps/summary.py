"""A sweep's jobs summed up: one row per job of its overrides, status and final figures (``summary.csv``,
``summary.json`` and the console table), ranked by ``sweep.rank_by`` (:mod:`msn.sweeps.ranking`).

Per job: its number and directory, each override (``key=value`` as typed), ``status`` (finished, stopped,
collapsed, failed, or no metrics), ``reason`` (why a failed or collapsed job stopped), and from its ``metrics.csv``
the final step, the loss and every term and diagnostic the loss logged (ce, me_max, entropy, distinct_prototypes,
... and terms of your own), the last ``monitor`` accuracy and the last RankMe of the backbone and of the head;
then ``eval/<protocol>/<setting>`` from every msn-eval report found in the job directory. Torch-free.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from msn.sweeps.ranking import rank_metric, rank_value, ranked
from msn.utils.rundir import MONITOR_COLUMNS, loss_columns, read_status

FAILURE_FILE = "failure.json"  # JOB_DIR/failure.json: {"reason": the one line msn-pretrain printed}


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories (those Hydra wrote ``.hydra/overrides.yaml`` into), numeric names in order."""
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides, ``{"optim.lr": "0.001", ...}`` (Hydra's own record)."""
    items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    return dict(item.split("=", 1) for item in items if "=" in item)


def _total_steps(job: Path) -> int | None:
    """Steps the job was set to run, from the ``run.json`` the trainer writes (None when absent)."""
    path = job / "run.json"
    return json.loads(path.read_text()).get("total_steps") if path.is_file() else None


def summarize_job(job: Path) -> dict[str, Any]:
    """One summary row for the run directory ``job``."""
    row: dict[str, Any] = {"job": job.name, "dir": str(job), **_overrides(job)}
    failure = job_failure(job)
    rows: list[dict[str, str]] = []
    header: list[str] = []
    if (job / "metrics.csv").is_file():
        with (job / "metrics.csv").open(newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), list(reader.fieldnames or [])
    if not rows:
        row["status"] = "no metrics" if failure is None else "failed"
        if failure is not None:
            row["reason"] = failure
        return row
    last = rows[-1]
    row["final_step"] = int(float(last["step"]))
    for key in ("loss", *loss_columns(header)):
        row[f"final_{key}"] = float(last[key])
    for column in MONITOR_COLUMNS:  # the last value logged (monitor steps only; nan elsewhere)
        logged = [float(r[column]) for r in rows if r.get(column) not in (None, "", "nan")]
        if logged:
            row[f"final_{column}"] = logged[-1]
    total = _total_steps(job)
    row["total_steps"] = total
    row["status"] = "finished" if total is not None and row["final_step"] >= total else "stopped"
    status = read_status(job) or {}
    if status.get("status") == "collapsed":  # (a rerun that trains on rewrites status.json)
        row["status"], row["reason"] = "collapsed", status.get("reason", "its representations collapsed")
    elif failure is not None and row["status"] != "finished":  # a later rerun that finished clears the failure
        row["status"], row["reason"] = "failed", failure
    for report in sorted(job.glob("*.json")):  # msn-eval --output RUN_DIR/eval_knn.json, ...
        try:
            content = json.loads(report.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(content, dict) and "protocol" in content and "results" in content:
            for setting, result in content["results"].items():
                row[f"eval/{content['protocol']}/{setting}"] = result["mean"]
    return row


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a console table: the rank (when ranked), job, its overrides, status, the final step and loss,
    the monitor's figures and msn-eval's when there are any; then each failed or collapsed job's reason, a line
    each."""
    fixed = {"job", "dir", "status", "reason", "total_steps", "rank"}
    shown = ("final_step", "final_loss", *(f"final_{m}" for m in MONITOR_COLUMNS))  # of the final_ figures
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in fixed
            and (not k.startswith("final_") or k in shown)]
    overrides = [k for k in keys if not k.startswith(("final_", "eval/"))]
    # an override every job shares (experiment=cpu_smoke) says nothing about the differences: one line above
    shared = [k for k in overrides if len(rows) > 1 and len({str(r.get(k)) for r in rows}) == 1]
    ranks = ["rank"] if any("rank" in r for r in rows) else []
    columns = [*ranks, "job", *[k for k in overrides if k not in shared], "status",
               *[k for k in keys if k.startswith(("final_", "eval/"))]]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [columns, *[[cell(r.get(c)) for c in columns] for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [f"every job: {' '.join(f'{k}={rows[0][k]}' for k in shared)}"] if shared else []
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in table]
    lines += [f"job {r['job']} {r['status']}: {r['reason']}" for r in rows
              if r.get("status") in ("failed", "collapsed") and "reason" in r]
    return "\n".join(lines)


def best_job_lines(rows: Sequence[dict[str, Any]], rank_by: str) -> list[str]:
    """What the end of a sweep says about its ranking: the best job by ``rank_by`` with its figure and the
    command that exports it, or why there is none (no job has the figure: how a run logs it)."""
    metric = rank_metric(rank_by)
    usable = [r for r in rows if r.get("status") not in ("failed", "collapsed", "no metrics")]
    scored = [r for r in usable if rank_value(r, rank_by) is not None]
    if not scored:
        return [f"ranked by {rank_by} (sweep.rank_by): no job has it; {metric.hint}"]
    best = ranked(scored, rank_by)[0]
    figure = rank_value(best, rank_by)
    return [f"best job by {rank_by} ({'higher' if metric.maximize else 'lower'} is better): job {best['job']} "
            f"({rank_by} {figure:.4g}, {best['status']})",
            f"  msn-export {best['dir']} {best['dir']}/hf"]


def write_summary(sweep_dir: str | Path, rank_by: str | None = None) -> list[dict[str, Any]]:
    """Summarise every job of ``sweep_dir`` into ``summary.csv`` and ``summary.json`` there, best first by
    ``rank_by`` (:func:`msn.sweeps.ranking.ranked`; None: in job order); return the rows in that order."""
    sweep_dir = Path(sweep_dir)
    rows = [summarize_job(job) for job in _job_dirs(sweep_dir)]
    if rank_by is not None:
        rows = [dict(r) for r in ranked(rows, rank_by)]
        for place, row in enumerate(rows, start=1):
            row["rank"] = place
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def job_failure(job: Path) -> str | None:
    """Why the job ``job`` (its directory) failed, as :func:`record_failed_job` recorded it, or None."""
    try:
        return str(json.loads((job / FAILURE_FILE).read_text())["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
