"""Sweep summaries: one table of every multirun job's overrides and final figures.

``msn-pretrain -m a=1,2 b=x,y`` runs each combination in ``SWEEP_DIR/<job number>/``. When the sweep
ends, the :class:`SweepSummary` Hydra callback (msn/configs/config.yaml) writes ``SWEEP_DIR/summary.csv``
and ``SWEEP_DIR/summary.json``; ``python -m msn.sweep SWEEP_DIR`` rebuilds them at any time (after a
failed or cancelled job, or after ``msn-eval ... RUN_DIR`` wrote its ``RUN_DIR/eval_*.json`` results).

A job that fails (a diverging lr, a data error: any error msn-pretrain answers with one line) is recorded in
``JOB_DIR/failure.json`` with that line (:func:`msn.cli.sweep_jobs.record_failed_job`) and the sweep goes on to
its next job; at the end the summary's table is printed, and a sweep with failed jobs says how many and exits
with code 1.

Per job: its number and directory, each override (``key=value`` as typed), ``status`` (finished,
stopped, failed, or no metrics), ``reason`` (why a failed job stopped), and from the last row of its
``metrics.csv`` the step, the loss and every term and diagnostic the loss logged (ce, me_max, entropy,
distinct_prototypes, ... and terms of your own), and the last ``monitor`` accuracy; then
``eval/<protocol>/<setting>`` means from every msn-eval report found in the job directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from msn.cli.errors import fail
from msn.cli.sweep_jobs import job_failure
from msn.utils.launcher import process_info
from msn.utils.rundir import loss_columns


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
    monitored = [float(r["monitor"]) for r in rows if r.get("monitor") not in (None, "", "nan")]
    if monitored:
        row["final_monitor"] = monitored[-1]
    total = _total_steps(job)
    row["total_steps"] = total
    row["status"] = "finished" if total is not None and row["final_step"] >= total else "stopped"
    if failure is not None and row["status"] != "finished":  # a later rerun that finished clears the failure
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
    """The summary as a console table: job, its overrides, status, the final step and loss, the monitor and
    msn-eval figures when there are any; then each failed job's reason, on its own line."""
    fixed = {"job", "dir", "status", "reason", "total_steps"}
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in fixed
            and (not k.startswith("final_") or k in ("final_step", "final_loss", "final_monitor"))]
    overrides = [k for k in keys if not k.startswith(("final_", "eval/"))]
    # an override every job shares (experiment=cpu_smoke) says nothing about the differences: one line above
    shared = [k for k in overrides if len(rows) > 1 and len({str(r.get(k)) for r in rows}) == 1]
    columns = ["job", *[k for k in overrides if k not in shared], "status",
               *[k for k in keys if k.startswith(("final_", "eval/"))]]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [columns, *[[cell(r.get(c)) for c in columns] for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [f"every job: {' '.join(f'{k}={rows[0][k]}' for k in shared)}"] if shared else []
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in table]
    lines += [f"job {r['job']} failed: {r['reason']}" for r in rows if r.get("status") == "failed" and "reason" in r]
    return "\n".join(lines)


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Summarise every job of ``sweep_dir`` into ``summary.csv`` and ``summary.json`` there; return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = [summarize_job(job) for job in _job_dirs(sweep_dir)]
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: write the sweep summary when a multirun ends (rank 0 only under torchrun)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = process_info()
        if info is not None and info.rank != 0:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = write_summary(sweep_dir)
        print(summary_table(rows), flush=True)
        print(f"sweep summary of {len(rows)} runs: {sweep_dir / 'summary.csv'}", flush=True)
        failed = [r["job"] for r in rows if r.get("status") == "failed"]
        if failed:  # exit code 1 for scripts and schedulers; every job ran, and the summary holds them all
            sys.exit(fail("msn-pretrain", f"{len(failed)} of {len(rows)} jobs of the sweep failed (job"
                          f"{'s' if len(failed) > 1 else ''} {', '.join(failed)}: the reasons are above and in "
                          f"{sweep_dir / 'summary.csv'}); the other jobs ran"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m msn.sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path, help="a multirun directory (holding 0/, 1/, ...)")
    args = p.parse_args(argv)
    if not args.sweep_dir.is_dir():
        sys.exit(fail("msn.sweep", f"{args.sweep_dir} is not a directory"))
    rows = write_summary(args.sweep_dir)
    if not rows:
        sys.exit(fail("msn.sweep", f"no Hydra job directories (with .hydra/overrides.yaml) in {args.sweep_dir}"))
    print(summary_table(rows))
    print(f"{len(rows)} runs: {args.sweep_dir / 'summary.csv'}")


if __name__ == "__main__":
    main()
