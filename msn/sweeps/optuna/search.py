"""The Optuna study behind ``hydra/sweeper=optuna``: its options, trials launched as msn-pretrain jobs, and what
each trial is told (the package's docstring says how). Optuna is imported when a search starts."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from msn.config import SweepConfig
from msn.errors import ConfigError, MSNError
from msn.sweeps.optuna.space import SearchSpace, first_line, grid_values, override_value, parse_space
from msn.sweeps.ranking import rank_metric, rank_value
from msn.sweeps.summary import summarize_job

if TYPE_CHECKING:
    import optuna
    from hydra.core.config_loader import ConfigLoader
    from hydra.core.utils import JobReturn
    from hydra.plugins.launcher import Launcher

SAMPLERS = ("tpe", "random", "cmaes", "grid")
DIRECTIONS = ("minimize", "maximize")
STUDY_FILE = "study.json"
STORAGE_FILE = "optuna.db"


@dataclass
class SearchOptions:
    """``hydra.sweeper``'s options (msn/configs/hydra/sweeper/optuna.yaml)."""

    n_trials: int = 20  # trials the study holds when the search ends (finished, pruned and failed ones count)
    direction: str | None = None  # minimize | maximize; None: sweep.rank_by's (rankme* and knn up, loss down)
    sampler: str = "tpe"  # tpe | random | cmaes (pip install cmaes) | grid
    seed: int = 0
    n_startup_trials: int | None = None  # tpe and cmaes: random trials before the model; None: Optuna's (10, 1)
    storage: str | None = None  # any Optuna storage URL; None: sqlite:///SWEEP_DIR/optuna.db
    study_name: str = "msn"
    n_jobs: int = 1  # trials launched together (a batch of jobs for the launcher)
    params: dict[str, Any] = field(default_factory=dict)  # the search space, key -> override grammar

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int):
            raise ConfigError(f"hydra.sweeper.seed={self.seed} must be a whole number")
        if not isinstance(self.n_trials, int) or self.n_trials < 0:
            raise ConfigError(f"hydra.sweeper.n_trials={self.n_trials} must be a whole number >= 0")
        if not isinstance(self.n_jobs, int) or self.n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_jobs={self.n_jobs} must be a whole number >= 1")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ConfigError(f"hydra.sweeper.direction={self.direction} must be minimize, maximize or null "
                              "(null: sweep.rank_by's)")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"hydra.sweeper.sampler={self.sampler} is not a sampler; choose one of "
                              f"{', '.join(SAMPLERS)}")
        if self.sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
            raise ConfigError("hydra.sweeper.sampler=cmaes needs the cmaes package: pip install cmaes")
        if self.n_startup_trials is not None and (not isinstance(self.n_startup_trials, int)
                                                  or self.n_startup_trials < 0):
            raise ConfigError(f"hydra.sweeper.n_startup_trials={self.n_startup_trials} must be a whole number >= 0 "
                              "or null")

    @classmethod
    def from_config(cls, **options: Any) -> SearchOptions:
        """The options as Hydra passes them (``params`` a DictConfig or None)."""
        params = options.pop("params", None)
        if isinstance(params, DictConfig):
            params = OmegaConf.to_container(params, resolve=True)
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"hydra.sweeper.{unknown[0]} is not an option of hydra/sweeper=optuna; its options are "
                              f"{', '.join(f.name for f in fields(cls))}")
        return cls(params=dict(params or {}), **options)

    def param_overrides(self) -> list[str]:
        """``hydra.sweeper.params`` as overrides (``key=value``), in their order."""
        return [f"{key}={_param_text(value)}" for key, value in self.params.items()]


def _param_text(value: Any) -> str:
    """A ``hydra.sweeper.params`` value as the text after ``key=`` (a YAML number or list as Hydra would write it)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return f"[{','.join(_param_text(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_param_text(v)}" for k, v in value.items()) + "}"
    return override_value(value)


def search_direction(direction: str | None, rank_by: str) -> str:
    """The study's direction: ``direction`` when given, else the one of ``sweep.rank_by``'s figure."""
    return direction or rank_metric(rank_by).direction


def default_storage(sweep_dir: Path) -> str:
    """The study's storage when none is given: an SQLite file in the sweep folder (absolute: a resumed search
    finds it from any working directory)."""
    return f"sqlite:///{(sweep_dir / STORAGE_FILE).resolve()}"


def make_sampler(options: SearchOptions, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """The sampler ``options.sampler`` names, seeded with ``seed``."""
    import optuna

    if options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if options.sampler == "grid":
        grid = {key: grid_values(key, dist) for key, dist in space.dimensions.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    startup = {} if options.n_startup_trials is None else {"n_startup_trials": options.n_startup_trials}
    if options.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    return optuna.samplers.TPESampler(seed=seed, **startup)


def session_seed(seed: int, held: int) -> int:
    """The sampler's seed for a session that starts with ``held`` trials in the study: ``seed`` for the first, a
    seed mixed from both for a resumed one, so that it does not draw the first session's values again (nor values
    next to them: the first draws of a Mersenne Twister seeded 0 and 3 are close)."""
    if held == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, held]).generate_state(1)[0])


def grid_size(options: SearchOptions, space: SearchSpace) -> int | None:
    """How many trials a grid holds (``sampler=grid``), None for the other samplers."""
    if options.sampler != "grid":
        return None
    return math.prod(len(grid_values(key, dist)) for key, dist in space.dimensions.items())


def check_rank_by(config: DictConfig, rank_by: str, space: SearchSpace) -> None:
    """Refuse a search whose trials cannot have their figure: ``sweep.rank_by`` rankme or knn needs the monitor
    (``monitor.every_steps`` and a ``monitor.protocol`` that measures it), which a search cannot add afterwards as
    ``msn-eval`` can to a grid's jobs. (A search over the monitor's own keys is left to its trials.)"""
    from msn.config import monitor_protocols

    metric = rank_metric(rank_by)
    if metric.name == "loss" or any(key.lstrip("+~").startswith("monitor.") for key in space.dimensions):
        return
    fix = f"{metric.hint}; or search by the loss with sweep.rank_by=loss"
    if not OmegaConf.select(config, "monitor.every_steps", default=0):
        raise ConfigError(f"sweep.rank_by={rank_by}: no trial would log it with monitor.every_steps=0 ({fix})")
    protocol = OmegaConf.select(config, "monitor.protocol", default="knn")
    if isinstance(protocol, DictConfig | ListConfig):
        protocol = OmegaConf.to_container(protocol)
    try:
        labelled, rankme = monitor_protocols(protocol)
    except ValueError:  # the check before the run names what is wrong with it
        return
    if (metric.name.startswith("rankme") and not rankme) or (metric.name == "knn" and labelled is None):
        raise ConfigError(f"sweep.rank_by={rank_by}: no trial would log it with monitor.protocol={protocol} ({fix})")


# ---------------------------------------------------------------------------------------------------------------
# A trial's outcome


@dataclass(frozen=True)
class Outcome:
    """What a trial's job came to: ``state`` complete, pruned, fail, or open (stopped by a signal: continued by
    the next session); the figure (``value``) and the step it was reached at; the job's status and why."""

    state: str
    value: float | None
    step: int | None
    status: str
    reason: str = ""


def judge(row: Mapping[str, Any], rank_by: str) -> Outcome:
    """The :class:`Outcome` of a job from its summary row (:func:`msn.sweeps.summary.summarize_job`)."""
    status = str(row.get("status", "no metrics"))
    value = rank_value(row, rank_by)
    step = row.get("final_step")
    reason = str(row.get("reason", ""))
    if status == "finished" and value is not None:
        return Outcome("complete", value, step, status)
    if status == "stopped":  # a signal (Ctrl-C, preemption) stopped it with a checkpoint: resumable
        return Outcome("open", value, step, status, reason or "stopped by a signal")
    if status == "collapsed":
        return Outcome("pruned", value, step, status, reason or "its representations collapsed")
    if status == "finished":
        return Outcome("fail", None, step, status, f"it logged no {rank_by} ({rank_metric(rank_by).hint})")
    return Outcome("fail", None, step, status, reason or ("it wrote no metrics" if status == "no metrics" else status))


# ---------------------------------------------------------------------------------------------------------------
# The search


class OptunaSearch:
    """One session of a search: load or create the study, continue its open trials, run the rest, write
    ``study.json``. ``report`` prints a line (the command's console; a library caller may log)."""

    def __init__(self, options: SearchOptions, config: DictConfig, launcher: Launcher,
                 config_loader: ConfigLoader | None, report: Callable[[str], Any]) -> None:
        self.options = options
        self.config = config
        self.launcher = launcher
        self.config_loader = config_loader
        self.report = report
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.rank_by = str(OmegaConf.select(config, "sweep.rank_by", default=SweepConfig.rank_by))
        self.direction = search_direction(options.direction, self.rank_by)
        self.storage = options.storage or default_storage(self.sweep_dir)
        self.stopped = False  # a trial was stopped by a signal: no new trial starts

    def run(self, arguments: Sequence[str]) -> list[JobReturn]:
        """Search over ``hydra.sweeper.params`` and ``arguments`` (the command line's task overrides)."""
        import optuna

        space = parse_space([*self.options.param_overrides(), *arguments], self.config_loader)
        if not space.dimensions:
            raise ConfigError("the search has no dimension: give a sweep override such as 'optim.lr=tag(log, "
                              "interval(1e-4, 1e-2))' or masking.ratio=0.15,0.3, or hydra.sweeper.params")
        check_rank_by(self.config, self.rank_by, space)
        size = grid_size(self.options, space)  # (refuses an interval under sampler=grid)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")  # as Hydra's basic sweeper does
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line of ours per trial instead
        study = self._study(space)
        done = _finished(study)
        total = self.options.n_trials
        if size is not None and size < total:
            self.report(f"the grid holds {size} trials: n_trials {total} -> {size}")
            total = size
        open_trials, elsewhere = self._open_trials(study, space)
        to_ask = max(0, total - len(done) - len(open_trials) - len(elsewhere))
        self._report_start(study, space, len(done), total, open_trials, elsewhere, to_ask)

        returns: list[JobReturn] = []
        pending = list(open_trials)
        try:
            while (pending or to_ask) and not self.stopped:
                batch = pending[:self.options.n_jobs]
                pending = pending[len(batch):]
                while len(batch) < self.options.n_jobs and to_ask and not pending:
                    trial = study.ask(space.dimensions)
                    overrides = space.overrides(trial.params)
                    trial.set_user_attr("overrides", overrides)
                    trial.set_user_attr("job_dir", str(self.sweep_dir / str(trial.number)))
                    batch.append((trial.number, overrides))
                    to_ask -= 1
                self._write_study(study)  # (its trials as running, for a search that is killed)
                returns += self._run_batch(study, batch)
        finally:  # (also when the search stops on an error or a second Ctrl-C)
            self._write_study(study)
        if self.stopped:
            self.report(f"the search stopped; rerun the same command with hydra.sweep.dir={self.sweep_dir} to "
                        "continue it")
        self._report_best(study)
        return returns

    def _study(self, space: SearchSpace) -> optuna.Study:
        """Load the study, or create it; its sampler seeded for this session (:func:`session_seed`)."""
        import optuna

        try:
            study = optuna.create_study(storage=self.storage, study_name=self.options.study_name,
                                        direction=self.direction, load_if_exists=True)
        except MSNError:
            raise
        except Exception as e:  # a storage URL that does not open, a database of another Optuna version
            raise ConfigError(f"hydra.sweeper.storage={self.storage}: the study cannot be opened "
                              f"({type(e).__name__}: {first_line(e)})") from None
        stored = study.direction.name.lower()
        if stored != self.direction:
            raise ConfigError(f"the study {self.options.study_name!r} in {self.storage} was created to {stored} and "
                              f"this search would {self.direction} (sweep.rank_by={self.rank_by}, "
                              f"hydra.sweeper.direction={self.options.direction}); rank by the same figure, or start "
                              "another study (hydra.sweeper.study_name=NAME or another hydra.sweep.dir)")
        study.sampler = make_sampler(self.options, space, session_seed(self.options.seed, len(study.trials)))
        return study

    def _open_trials(self, study: optuna.Study, space: SearchSpace) -> tuple[list[tuple[int, list[str]]], list[int]]:
        """The trials an interrupted session left running, with their overrides (to continue here), and those
        another process is training right now (its lock on their job folder: left to it)."""
        from optuna.trial import TrialState

        mine, elsewhere = [], []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if _trained_elsewhere(Path(trial.user_attrs.get("job_dir", self.sweep_dir / str(trial.number)))):
                elsewhere.append(trial.number)
                continue
            overrides = trial.user_attrs.get("overrides")
            if not overrides:  # not asked by a search of ours: its values with this search's fixed overrides
                overrides = [*space.fixed.values(), *(f"{k}={override_value(v)}" for k, v in trial.params.items())]
            mine.append((trial.number, list(overrides)))
        return mine, elsewhere

    def _run_batch(self, study: optuna.Study, batch: list[tuple[int, list[str]]]) -> list[JobReturn]:
        """Launch the batch's trials (trial N as job N, so in ``SWEEP_DIR/N``) and tell the study each outcome."""
        returns: list[JobReturn] = []
        for run in _consecutive(batch):
            first = run[0][0]
            try:
                results = list(self.launcher.launch([overrides for _, overrides in run], initial_job_idx=first))
            except Exception as e:  # the launcher itself failed (a composition error, a cluster's): the search goes on
                for number, overrides in run:
                    self._tell(study, number, overrides, Outcome("fail", None, None, "failed", first_line(e)), None)
                continue
            for (number, overrides), result in zip(run, results, strict=False):
                job_dir = _job_dir(result, self.sweep_dir / str(number))
                outcome = self._outcome(result, job_dir)
                self._tell(study, number, overrides, outcome, job_dir)
            returns += results
        return returns

    def _outcome(self, result: JobReturn, job_dir: Path) -> Outcome:
        """A job's outcome from its run directory; a job whose task raised (not recorded by msn-pretrain) fails."""
        from hydra.core.utils import JobStatus

        row = summarize_job(job_dir) if (job_dir / ".hydra" / "overrides.yaml").is_file() else {"status": "no metrics"}
        outcome = judge(row, self.rank_by)
        if result.status == JobStatus.FAILED and outcome.state != "complete":
            error = getattr(result, "_return_value", None)
            reason = first_line(error) if isinstance(error, BaseException) else "the job failed"
            return Outcome("fail", None, outcome.step, "failed", reason)
        return outcome

    def _tell(self, study: optuna.Study, number: int, overrides: list[str], outcome: Outcome,
              job_dir: Path | None) -> None:
        """Tell the study the trial's outcome, and say it in one line."""
        import optuna
        from optuna.trial import TrialState

        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        trial = optuna.trial.Trial(study, frozen._trial_id)  # (a trial of an earlier session too)
        trial.set_user_attr("status", outcome.status)
        if outcome.reason:
            trial.set_user_attr("reason", outcome.reason)
        if job_dir is not None:
            trial.set_user_attr("job_dir", str(job_dir))
        values = " ".join(o for o in overrides if o.split("=", 1)[0] in frozen.distributions) or " ".join(overrides)
        figure = "" if outcome.value is None else f"{self.rank_by} {outcome.value:.6g}, "
        where = f"job {job_dir}" if job_dir is not None else "no job"
        if outcome.state == "complete":
            _tell_study(study, number, values=outcome.value)
            self.report(f"trial {number} ({values}): {figure}{outcome.status} ({where})")
        elif outcome.state == "pruned":
            if outcome.value is not None:
                trial.report(outcome.value, int(outcome.step or 0))
            _tell_study(study, number, state=TrialState.PRUNED)
            self.report(f"trial {number} ({values}): pruned, {figure}{outcome.status}: {outcome.reason} ({where})")
        elif outcome.state == "open":
            self.stopped = True
            self.report(f"trial {number} ({values}): {outcome.reason} at step {outcome.step}; it stays open and "
                        f"continues from its checkpoint when the search is rerun ({where})")
        else:
            _tell_study(study, number, state=TrialState.FAIL)
            self.report(f"trial {number} ({values}): failed: {outcome.reason} ({where})")
            if outcome.status == "finished":  # it ran to its end without the figure: so would every trial
                raise ConfigError(f"trial {number} finished without a {self.rank_by} figure, and so would every "
                                  f"trial: {rank_metric(self.rank_by).hint}; or search with sweep.rank_by=loss")

    def _report_start(self, study: optuna.Study, space: SearchSpace, done: int, total: int,
                      open_trials: list[tuple[int, list[str]]], elsewhere: list[int], to_ask: int) -> None:
        sampler = f"{self.options.sampler} (seed {self.options.seed})"
        self.report(f"optuna search: study {study.study_name!r} in {self.storage}, {self.direction} {self.rank_by} "
                    f"(sweep.rank_by={self.rank_by}), sampler {sampler}, searching {', '.join(space.dimensions)}")
        parts = [f"{done} of {total} trials done"]
        if open_trials:
            parts.append(f"{len(open_trials)} left open by an interrupted session to continue here (trial"
                         f"{'s' if len(open_trials) > 1 else ''} {', '.join(str(n) for n, _ in open_trials)})")
        if elsewhere:
            parts.append(f"{len(elsewhere)} run in another process ({', '.join(map(str, elsewhere))})")
        parts.append(f"{to_ask} new to run")
        self.report(f"{', '.join(parts)}; rerun with hydra.sweep.dir={self.sweep_dir} to continue this study")

    def _report_best(self, study: optuna.Study) -> None:
        best = best_trial(study)
        if best is None:
            self.report(f"no trial of the study has completed with a {self.rank_by} figure yet: no best trial")
            return
        metric = rank_metric(self.rank_by)
        better = "higher" if self.direction == "maximize" else "lower"
        values = " ".join(f"{k}={override_value(v)}" for k, v in best.params.items())
        job_dir = best.user_attrs.get("job_dir", str(self.sweep_dir / str(best.number)))
        self.report(f"best trial by {metric.name} ({better} is better): trial {best.number}, {metric.name} "
                    f"{best.value:.6g}: {values}")
        self.report(f"  msn-export {job_dir} {job_dir}/hf")
        self.report(f"study: {self.sweep_dir / STUDY_FILE}")

    def _write_study(self, study: optuna.Study) -> None:
        """``SWEEP_DIR/study.json``: the study, its best trial and every trial."""
        write_study(study, self.sweep_dir / STUDY_FILE, rank_by=self.rank_by, storage=self.storage,
                    sampler=self.options.sampler)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's best complete trial, or None while it has none."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def write_study(study: optuna.Study, path: Path, *, rank_by: str, storage: str, sampler: str) -> dict[str, Any]:
    """Write the study's record to ``path`` (JSON, replaced whole) and return it."""
    best = best_trial(study)

    def trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {"number": trial.number, "state": trial.state.name.lower(), "params": trial.params,
                "value": trial.value, "status": trial.user_attrs.get("status"),
                "reason": trial.user_attrs.get("reason"), "job_dir": trial.user_attrs.get("job_dir"),
                "overrides": trial.user_attrs.get("overrides")}

    record: dict[str, Any] = {
        "study_name": study.study_name, "storage": storage, "direction": study.direction.name.lower(),
        "rank_by": rank_by, "sampler": sampler,
        "best": None if best is None else {**trial_record(best), "export": (
            f"msn-export {best.user_attrs.get('job_dir')} {best.user_attrs.get('job_dir')}/hf")},
        "trials": [trial_record(t) for t in study.get_trials(deepcopy=False)]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return record


def _tell_study(study: optuna.Study, number: int, **outcome: Any) -> None:
    """``study.tell``; the grid sampler's ``study.stop()`` on the grid's last trial (an error outside
    ``study.optimize``, raised after the trial was stored) is no error here: the search counts its own trials."""
    try:
        study.tell(number, **outcome)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards ``n_trials``: complete, pruned and failed."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))


def _trained_elsewhere(job_dir: Path) -> bool:
    """Whether another process holds ``job_dir``'s run lock (trains that trial now)."""
    from msn.utils.runlock import RunBusy, acquire_run_lock, release_run_lock

    if not job_dir.is_dir():
        return False
    try:
        acquire_run_lock(job_dir)
    except RunBusy:
        return True
    except MSNError:  # cannot lock at all (a read-only folder): the job will say so itself
        return False
    release_run_lock(job_dir)
    return False


def _job_dir(result: JobReturn, fallback: Path) -> Path:
    """The job's run directory as Hydra made it (``hydra.runtime.output_dir``), else ``fallback``."""
    output_dir = OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir") if result.hydra_cfg else None
    return Path(str(output_dir)) if output_dir else fallback


def _consecutive(batch: list[tuple[int, list[str]]]) -> Iterator[list[tuple[int, list[str]]]]:
    """The batch in runs of consecutive trial numbers: the launcher numbers a batch's jobs from its first."""
    run: list[tuple[int, list[str]]] = []
    for item in sorted(batch, key=lambda item: item[0]):
        if run and item[0] != run[-1][0] + 1:
            yield run
            run = []
        run.append(item)
    if run:
        yield run
