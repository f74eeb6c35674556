"""Sweeps as a library: each job's summary row (:mod:`msn.sweeps.summary`), how jobs are ranked
(:mod:`msn.sweeps.ranking`) and the Optuna search behind ``hydra/sweeper=optuna`` (:mod:`msn.sweeps.optuna`).
The commands around them are :mod:`msn.cli.sweep` (the end-of-sweep summary) and the Hydra plugin in
``hydra_plugins/msn_optuna_sweeper``."""
