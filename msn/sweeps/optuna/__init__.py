"""The Optuna search behind ``hydra/sweeper=optuna``: an Optuna study whose trials are msn-pretrain jobs.

``msn-pretrain -m hydra/sweeper=optuna 'optim.lr=tag(log, interval(1e-4, 1e-2))' 'masking.ratio=interval(0.1, 0.7)'``
searches the space its sweep overrides span (and those of ``hydra.sweeper.params``), in Hydra's override grammar
(:func:`parse_space`): ``interval(a, b)`` a float between a and b (``tag(log, ...)``: on a log scale, ``tag(int,
...)``: an integer), ``choice(a, b)`` or ``a,b`` one of the values, ``range(a, b[, step])`` one of Python's range.
Plain overrides are the same for every trial.

Trial N runs as job N of the launcher, in ``SWEEP_DIR/N``; its figure is read from that run directory afterwards
(:func:`msn.sweeps.summary.summarize_job`, ranked by ``sweep.rank_by``: :mod:`msn.sweeps.ranking`), never from the
task's return value, so a launcher that runs jobs elsewhere (SLURM) reports the same. A finished trial is told its
figure; a collapsed one is reported and pruned (Optuna's samplers rank pruned trials below complete ones); a failed
one, or one without the figure, fails; one stopped by a signal (Ctrl-C) stays open and the search ends there.

The study lives in ``SWEEP_DIR/optuna.db`` (or ``hydra.sweeper.storage``): the same command with the same
``hydra.sweep.dir`` loads it, counts its finished trials towards ``n_trials``, continues the trials an interrupted
session left open in their own job folders (``resume=auto`` continues them from ``checkpoints/last.pt``) and
runs the rest. ``SWEEP_DIR/study.json`` holds every trial and the best one.

Optuna is imported when a search starts, not with this module.
"""

from msn.sweeps.optuna.search import OptunaSearch, SearchOptions, grid_size, judge, session_seed, write_study
from msn.sweeps.optuna.space import SearchSpace, parse_space

__all__ = ["OptunaSearch", "SearchOptions", "SearchSpace", "grid_size", "judge", "parse_space", "session_seed",
           "write_study"]
