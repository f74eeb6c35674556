"""``hydra/sweeper=optuna``: msn's own Optuna sweeper (hydra_plugins/msn_optuna_sweeper, msn.sweeps.optuna).

Real searches of the cpu_smoke preset (no mocks): trials in their job folders, the study stored in SQLite and
continued by a rerun, ``study.json`` and its best trial; the search space's grammar; a bad space refused in one line.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from msn.errors import ConfigError
from msn.sweeps.optuna import SearchOptions, grid_size, judge, parse_space, session_seed

SEARCH = ["msn-pretrain", "-m", "hydra/sweeper=optuna", "experiment=cpu_smoke",
          "optim.lr=tag(log, interval(1e-4, 1e-2))", "masking.ratio=interval(0.1, 0.5)", "sweep.rank_by=loss",
          "logger.progress=false"]


def _search(tmp_path: Path, sweep: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a search of the cpu_smoke preset into ``sweep``; its output also in ``tmp_path/<n>.log`` for a failure."""
    result = subprocess.run([*SEARCH, f"hydra.sweep.dir={sweep}", *extra], cwd=tmp_path, capture_output=True,
                            text=True, timeout=timeout)
    (tmp_path / f"{len(list(tmp_path.glob('*.log')))}.log").write_text(result.stdout + result.stderr)
    return result


def _job_dirs(sweep: Path) -> list[str]:
    return sorted((p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=int)


def _summary(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_search_runs_its_trials_in_job_folders_and_a_rerun_continues_the_study(tmp_path):
    sweep = tmp_path / "search"
    result = _search(tmp_path, sweep, "hydra.sweeper.n_trials=3", "optim.max_steps=2")  # 2 of cpu_smoke's 6 steps
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"optuna search: study 'msn' in sqlite:///{sweep}/optuna.db, minimize loss (sweep.rank_by=loss)" in out
    assert f"0 of 3 trials done, 3 new to run; rerun with hydra.sweep.dir={sweep} to continue this study" in out
    assert _job_dirs(sweep) == ["0", "1", "2"]
    assert (sweep / "optuna.db").is_file() and (sweep / "multirun.yaml").is_file()

    study = json.loads((sweep / "study.json").read_text())
    assert (study["study_name"], study["direction"], study["rank_by"]) == ("msn", "minimize", "loss")
    assert [(t["number"], t["state"]) for t in study["trials"]] == [(0, "complete"), (1, "complete"), (2, "complete")]
    rows = _summary(sweep)
    losses = {r["job"]: float(r["final_loss"]) for r in rows}
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows)
    for trial in study["trials"]:  # each trial's figure is its job's final loss, read from its run folder
        assert trial["value"] == pytest.approx(losses[str(trial["number"])], rel=1e-6)
        assert trial["job_dir"] == str(sweep / str(trial["number"]))
    best = study["best"]
    assert best["value"] == pytest.approx(min(losses.values()), rel=1e-6)
    assert losses[str(best["number"])] == min(losses.values())
    assert f"best trial by loss (lower is better): trial {best['number']}" in out
    assert f"msn-export {best['job_dir']} {best['job_dir']}/hf" in out

    sampled = set()
    for job in ("0", "1", "2"):  # each job ran with its trial's values, inside the bounds
        cfg = yaml.safe_load((sweep / job / "config.yaml").read_text())
        lr, ratio = cfg["optim"]["lr"], cfg["masking"]["ratio"]
        assert 1e-4 <= lr <= 1e-2 and 0.1 <= ratio <= 0.5
        params = study["trials"][int(job)]["params"]
        assert lr == pytest.approx(params["optim.lr"], rel=1e-5)
        assert ratio == pytest.approx(params["masking.ratio"], rel=1e-5)
        sampled.add((lr, ratio))
    assert len(sampled) == 3
    before = {job: (sweep / job / "metrics.csv").read_text() for job in ("0", "1", "2")}

    # the same command with n_trials=4: the stored study is loaded and exactly one more trial runs, as job 3
    result = _search(tmp_path, sweep, "hydra.sweeper.n_trials=4", "optim.max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 of 4 trials done, 1 new to run" in result.stdout
    assert result.stdout.count("Launching 1 jobs locally") == 1 and "\t#3 : " in result.stdout
    assert _job_dirs(sweep) == ["0", "1", "2", "3"]
    assert {job: (sweep / job / "metrics.csv").read_text() for job in ("0", "1", "2")} == before
    study = json.loads((sweep / "study.json").read_text())
    assert [(t["number"], t["state"]) for t in study["trials"]] == [(n, "complete") for n in range(4)]
    assert len(_summary(sweep)) == 4
    import optuna

    assert len(optuna.load_study(study_name="msn", storage=f"sqlite:///{sweep}/optuna.db").trials) == 4
    # the resumed session drew new values (its sampler's seed mixes in the trials held)
    assert study["trials"][3]["params"] not in [t["params"] for t in study["trials"][:3]]


def test_the_search_space_grammar():
    space = parse_space(["experiment=cpu_smoke", "optim.lr=tag(log, interval(1e-4, 1e-2))",
                         "masking.ratio=interval(0.1, 0.7)", "model.num_prototypes=choice(16, 64, 256)",
                         "model.head_output_dim=16,32", "optim.warmup_epochs=range(1, 5)",
                         "optim.epochs=tag(int, interval(2, 8))", "optim.clip_grad=range(0.5, 2.0, 0.5)",
                         "model=vit_pico,vit_tiny", "data.root='a b',null"])
    d = space.dimensions
    assert d["optim.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert d["masking.ratio"] == FloatDistribution(0.1, 0.7)
    assert d["model.num_prototypes"] == CategoricalDistribution([16, 64, 256])
    assert d["model.head_output_dim"] == CategoricalDistribution([16, 32])
    assert d["optim.warmup_epochs"] == IntDistribution(1, 4)  # Python's range: 1, 2, 3, 4
    assert d["optim.epochs"] == IntDistribution(2, 8)
    assert d["optim.clip_grad"] == CategoricalDistribution([0.5, 1.0, 1.5])
    assert d["model"] == CategoricalDistribution(["vit_pico", "vit_tiny"])
    assert d["data.root"] == CategoricalDistribution(["'a b'", None])
    assert space.fixed == {"experiment": "experiment=cpu_smoke"}
    params = {"optim.lr": 0.0012520653814999472, "masking.ratio": 0.7, "model.num_prototypes": 64,
              "model.head_output_dim": 32, "optim.warmup_epochs": 3, "optim.epochs": 8, "optim.clip_grad": 1.5,
              "model": "vit_tiny", "data.root": None}
    assert space.overrides(params) == [
        "experiment=cpu_smoke", "optim.lr=0.00125207", "masking.ratio=0.7", "model.num_prototypes=64",
        "model.head_output_dim=32", "optim.warmup_epochs=3", "optim.epochs=8", "optim.clip_grad=1.5",
        "model=vit_tiny", "data.root=null"]
    # a later override of a key replaces an earlier one (the command line over hydra.sweeper.params)
    later = parse_space(["optim.lr=interval(1e-4, 1e-2)", "masking.ratio=0.3", "optim.lr=1e-3"])
    assert later.dimensions == {} and later.overrides({}) == ["masking.ratio=0.3", "optim.lr=1e-3"]
    # the jobs the check before the search composes: the first values, then each other end on its own
    corners = parse_space(["a=interval(0.1, 0.5)", "b=choice(x, y, z)", "c=1"]).corners()
    assert corners == [["a=0.1", "b=x", "c=1"], ["a=0.5", "b=x", "c=1"], ["a=0.1", "b=y", "c=1"],
                       ["a=0.1", "b=z", "c=1"]]


@pytest.mark.parametrize(("override", "says"), [
    ("optim.lr=interval(2, 1)", "optim.lr=interval(2, 1): an interval's low end must be below its high end"),
    ("optim.lr=tag(log, interval(0, 1))", "a log-scale interval must be above 0"),
    ("optim.lr=tag(loq, interval(1e-4, 1e-2))", "unknown tag loq of an interval; its tags are log, int"),
    ("optim.epochs=tag(int, interval(1.5, 4))", "an int interval needs whole-number ends"),
    ("optim.lr=interval(1)", "optim.lr=interval(1) is not a search dimension: TypeError while evaluating"),
    ("a=range(3, 3)", "the range is empty"),
    ("a=1,2,1", "a value is listed twice"),
])
def test_a_bad_search_space_names_the_override(override, says):
    with pytest.raises(ConfigError) as error:
        parse_space([override])
    assert says in str(error.value)


def test_options_outcomes_and_seeds():
    with pytest.raises(ConfigError, match="hydra.sweeper.sampler=anneal is not a sampler"):
        SearchOptions(sampler="anneal")
    with pytest.raises(ConfigError, match="hydra.sweeper.direction=up must be minimize, maximize or null"):
        SearchOptions(direction="up")
    with pytest.raises(ConfigError, match="hydra.sweeper.n_jobs=0"):
        SearchOptions(n_jobs=0)
    assert SearchOptions.from_config(params={"optim.lr": "interval(1e-4, 1e-2)", "model.num_prototypes": 64},
                                     n_trials=5).param_overrides() == ["optim.lr=interval(1e-4, 1e-2)",
                                                                       "model.num_prototypes=64"]
    row = {"status": "finished", "final_step": 6, "final_loss": 3.5, "final_rankme": 7.0}
    complete = judge(row, "loss")
    assert (complete.state, complete.value, complete.step) == ("complete", 3.5, 6) and judge(row, "rankme").value == 7
    failed = judge({**row, "status": "finished", "final_rankme": None}, "rankme")
    assert failed.state == "fail" and "it logged no rankme" in failed.reason
    collapsed = judge({**row, "status": "collapsed", "reason": "RankMe 1.1 < 1.5"}, "rankme")
    assert (collapsed.state, collapsed.value, collapsed.reason) == ("pruned", 7.0, "RankMe 1.1 < 1.5")
    failed = judge({"status": "failed", "reason": "the loss became non-finite"}, "loss")
    assert (failed.state, failed.value, failed.reason) == ("fail", None, "the loss became non-finite")
    assert judge({"status": "no metrics"}, "loss").state == "fail"
    assert judge({**row, "status": "stopped"}, "loss").state == "open"  # Ctrl-C: continued by the next session
    grid = parse_space(["a=choice(x, y)", "b=range(0, 3)", "c=1"])
    assert grid_size(SearchOptions(sampler="grid"), grid) == 6 and grid_size(SearchOptions(), grid) is None
    with pytest.raises(ConfigError, match="sampler=grid needs discrete dimensions .* a is an interval"):
        grid_size(SearchOptions(sampler="grid"), parse_space(["a=interval(0, 1)"]))
    assert session_seed(0, 0) == 0 and len({session_seed(0, 3), session_seed(0, 4), session_seed(1, 3)}) == 3


def test_a_bad_search_is_refused_in_one_line_before_any_trial(tmp_path):
    """From the command line, from hydra.sweeper.params (a sweep config of the user's), a corner of the space that
    the config refuses, and a ranking no trial can have: one line, exit code 1, no folder."""
    configs = tmp_path / "my_configs" / "sweep"
    configs.mkdir(parents=True)
    (configs / "bad.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n"
                                      "      optim.lr: interval(1)\n")
    cases = [(["optim.lr=interval(2,1)", "sweep.rank_by=loss"],
              "msn-pretrain: error: optim.lr=interval(2,1): an interval's low end must be below its high end "
              "(got 2 and 1); no job was run"),
             (["sweep=bad", "sweep.rank_by=loss"],
              "msn-pretrain: error: optim.lr=interval(1) is not a search dimension: TypeError while evaluating "
              "'interval(1)': missing a required argument: 'end'; no job was run"),
             (["masking.ratio=interval(0.1, 1.5)", "sweep.rank_by=loss"],
              "msn-pretrain: error: a corner of the search space (experiment=cpu_smoke masking.ratio=1.5 "
              "sweep.rank_by=loss): invalid config: masking.ratio=1.5 must lie in [0, 1); no job was run"),
             (["optim.lr=interval(1e-4, 1e-2)"],
              "msn-pretrain: error: sweep.rank_by=rankme_centred: no trial would log it with monitor.every_steps=0"),
             (["optim.lr=interval(1)", "sweep.rank_by=loss"],  # Hydra itself refuses it on the command line
              "msn-pretrain: error: interval(1): missing a required argument: 'end' (TypeError); interval(low, high), "
              "choice(a, b, ...) and range(start, stop[, step]) take the arguments of Hydra's override grammar")]
    for args, says in cases:
        sweep = tmp_path / "sweep"
        cmd = ["msn-pretrain", "--config-dir", "my_configs", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
               "experiment=cpu_smoke", f"hydra.sweep.dir={sweep}", *args]
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, (args, result.stderr[-2000:])
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(says), (
            args, result.stderr)
        assert not sweep.exists()
    # an interval without the Optuna sweeper: Hydra's basic sweeper cannot list it; the line says what to add
    result = subprocess.run(["msn-pretrain", "-m", "experiment=cpu_smoke", "optim.lr=interval(1e-4, 1e-2)",
                             f"hydra.sweep.dir={tmp_path / 'grid'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == (
        "msn-pretrain: error: optim.lr=interval(1e-4, 1e-2): an interval is searched, not run as a list of jobs: add "
        "hydra/sweeper=optuna, or list values (a,b,c); no job was run")


def test_the_plugin_module_is_cheap_and_hydra_finds_it():
    """Hydra imports every module under hydra_plugins when any Hydra app starts: ours loads neither optuna nor
    torch, and hydra_plugins stays a namespace package (the submitit launcher's plugin is found beside ours)."""
    code = ("import sys\nimport hydra_plugins.msn_optuna_sweeper as m\n"
            "assert not {'optuna', 'torch'} & set(sys.modules), sorted({'optuna', 'torch'} & set(sys.modules))\n"
            "import hydra_plugins\nassert getattr(hydra_plugins, '__file__', None) is None\n"
            "from hydra.core.plugins import Plugins\n"
            "print('hydra_plugins.msn_optuna_sweeper.OptunaSweeper' in Plugins.instance().class_name_to_class)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]


@pytest.mark.slow
def test_a_trial_killed_mid_run_is_continued_from_its_checkpoint_by_the_rerun(tmp_path):
    """SIGKILL the search while trial 1 trains (after its first checkpoint): the rerun continues trial 1 in its own
    folder from checkpoints/last.pt with its own values, then runs the trial still to go."""
    sweep = tmp_path / "search"
    extra = ["hydra.sweeper.n_trials=3", "optim.max_steps=16", "optim.epochs=4", "checkpoint.last_every_steps=2",
             f"hydra.sweep.dir={sweep}"]
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen([*SEARCH, *extra], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (sweep / "1" / "checkpoints" / "last.pt").is_file():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    killed_at = json.loads((sweep / "1" / "status.json").read_text())["step"]
    assert json.loads((sweep / "1" / "status.json").read_text())["status"] == "running" and killed_at < 16
    study = json.loads((sweep / "study.json").read_text())  # written after trial 0; trial 1 open
    assert [(t["number"], t["state"]) for t in study["trials"]] == [(0, "complete"), (1, "running")]
    lr = yaml.safe_load((sweep / "1" / "config.yaml").read_text())["optim"]["lr"]

    result = _search(tmp_path, sweep, *extra[:-1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("1 of 3 trials done, 1 left open by an interrupted session to continue here (trial 1), 1 new to run"
            in result.stdout)
    assert f"resumed from {sweep / '1' / 'checkpoints' / 'last.pt'} at step {killed_at}" in result.stdout
    assert yaml.safe_load((sweep / "1" / "config.yaml").read_text())["optim"]["lr"] == lr
    steps = [int(r["step"]) for r in csv.DictReader((sweep / "1" / "metrics.csv").open())]
    assert sorted(set(steps)) == list(range(1, 17)), steps  # steps 1 to 16, the first ones before the kill
    study = json.loads((sweep / "study.json").read_text())
    assert [(t["number"], t["state"]) for t in study["trials"]] == [(n, "complete") for n in range(3)]
    assert _job_dirs(sweep) == ["0", "1", "2"]


@pytest.mark.slow
def test_a_collapsed_trial_is_pruned_with_its_figure_and_a_grid_search_stops_at_its_size(tmp_path):
    """A trial stopped by the collapse check is reported and pruned (not failed, not best); a grid of two values
    runs two trials whatever n_trials says; rank_by rankme maximizes."""
    sweep = tmp_path / "search"
    result = subprocess.run(["msn-pretrain", "-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid",
                             "hydra.sweeper.n_trials=5", "experiment=cpu_smoke", "optim.lr=1e-3,2e-3",
                             "monitor.every_steps=1", "monitor.protocol=rankme", "collapse.rankme_below=1000",
                             "collapse.window_steps=1", "logger.progress=false", "sweep.rank_by=rankme",
                             f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the grid holds 2 trials: n_trials 5 -> 2" in result.stdout
    assert "maximize rankme (sweep.rank_by=rankme)" in result.stdout
    study = json.loads((sweep / "study.json").read_text())
    assert study["direction"] == "maximize" and study["best"] is None
    assert sorted(t["params"]["optim.lr"] for t in study["trials"]) == [1e-3, 2e-3]
    rows = {r["job"]: r for r in _summary(sweep)}
    for trial in study["trials"]:
        row = rows[str(trial["number"])]
        assert (trial["state"], trial["status"], row["status"]) == ("pruned", "collapsed", "collapsed")
        assert trial["value"] == pytest.approx(float(row["final_rankme"]), rel=1e-6)
        assert f"trial {trial['number']} (optim.lr={row['optim.lr']}): pruned, rankme " in result.stdout
