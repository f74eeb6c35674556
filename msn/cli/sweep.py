"""Sweep summaries: one table of every multirun job's overrides and final figures.

``msn-pretrain -m a=1,2 b=x,y`` runs each combination in ``SWEEP_DIR/<job number>/``. When the sweep
ends, the :class:`SweepSummary` Hydra callback (msn/configs/config.yaml) writes ``SWEEP_DIR/summary.csv``
and ``SWEEP_DIR/summary.json``; ``python -m msn.sweep SWEEP_DIR`` rebuilds them at any time (after a
failed or cancelled job, or after ``msn-eval ... RUN_DIR`` wrote its ``RUN_DIR/eval_*.json`` results).

A job that fails (a diverging lr, a data error: any error msn-pretrain answers with one line) is recorded in
``JOB_DIR/failure.json`` with that line (:func:`msn.cli.sweep_jobs.record_failed_job`) and the sweep goes on to
its next job; at the end the summary's table is printed, and a sweep with failed jobs says how many and exits
with code 1.

A job whose representations collapsed (``collapse.stop``) has status ``collapsed``: a result of the search, not
a failure; the sweep's exit code stays 0 for it. The rows (:mod:`msn.sweeps.summary`) are sorted best first by
``sweep.rank_by`` (rankme, knn or loss: :mod:`msn.sweeps.ranking`), and the end of the sweep names the best job with
the command that exports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from msn.cli.errors import fail
from msn.config import SweepConfig
from msn.errors import MSNError
from msn.sweeps.ranking import RANK_METRICS, rank_metric
from msn.sweeps.summary import best_job_lines, summarize_job, summary_table, write_summary
from msn.utils.launcher import process_info

__all__ = ["SweepSummary", "main", "summarize_job", "summary_table", "write_summary"]


class SweepSummary(Callback):
    """Hydra callback: write the sweep summary when a multirun ends (rank 0 only under torchrun), ranked by
    ``sweep.rank_by``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = process_info()
        if info is not None and info.rank != 0:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rank_by = str(OmegaConf.select(config, "sweep.rank_by", default=SweepConfig.rank_by))
        rows = write_summary(sweep_dir, rank_by)
        print(summary_table(rows), flush=True)
        print(f"sweep summary of {len(rows)} runs, best first by {rank_by}: {sweep_dir / 'summary.csv'}", flush=True)
        for line in best_job_lines(rows, rank_by):
            print(line, flush=True)
        collapsed = [r["job"] for r in rows if r.get("status") == "collapsed"]
        if collapsed:  # a result of the search, not a failure of the sweep
            print(f"{len(collapsed)} of {len(rows)} jobs collapsed and were stopped early (job"
                  f"{'s' if len(collapsed) > 1 else ''} {', '.join(collapsed)}); the other jobs ran", flush=True)
        failed = [r["job"] for r in rows if r.get("status") == "failed"]
        if failed:  # exit code 1 for scripts and schedulers; every job ran, and the summary holds them all
            sys.exit(fail("msn-pretrain", f"{len(failed)} of {len(rows)} jobs of the sweep failed (job"
                          f"{'s' if len(failed) > 1 else ''} {', '.join(failed)}: the reasons are above and in "
                          f"{sweep_dir / 'summary.csv'}); the other jobs ran"))


def _recorded_rank_by(sweep_dir: Path) -> str:
    """The ``sweep.rank_by`` the sweep ran with (its ``multirun.yaml``), else the default."""
    try:
        return str(OmegaConf.select(OmegaConf.load(sweep_dir / "multirun.yaml"), "sweep.rank_by",
                                    default=SweepConfig.rank_by))
    except Exception:  # no record, or not ours: the default
        return SweepConfig.rank_by


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m msn.sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path, help="a multirun directory (holding 0/, 1/, ...)")
    p.add_argument("--rank-by", choices=tuple(RANK_METRICS), default=None,
                   help="rank the jobs by this final figure (default: the sweep's own sweep.rank_by, else "
                        f"{SweepConfig.rank_by})")
    args = p.parse_args(argv)
    if not args.sweep_dir.is_dir():
        sys.exit(fail("msn.sweep", f"{args.sweep_dir} is not a directory"))
    rank_by = args.rank_by or _recorded_rank_by(args.sweep_dir)
    try:
        rank_metric(rank_by)
    except MSNError as e:
        sys.exit(fail("msn.sweep", f"{e} (in {args.sweep_dir / 'multirun.yaml'}); pass --rank-by"))
    rows = write_summary(args.sweep_dir, rank_by)
    if not rows:
        sys.exit(fail("msn.sweep", f"no Hydra job directories (with .hydra/overrides.yaml) in {args.sweep_dir}"))
    print(summary_table(rows))
    print(f"{len(rows)} runs, best first by {rank_by}: {args.sweep_dir / 'summary.csv'}")
    for line in best_job_lines(rows, rank_by):
        print(line)


if __name__ == "__main__":
    main()
