"""Multirun sweeps: one run directory per combination and the summary table."""

import csv
import json
import subprocess

import pytest
import yaml
from hydra import compose, initialize_config_dir

from msn.cli.sweep import main as sweep_main
from msn.config import CONFIG_DIR
from msn.utils.compose import register_configs
from tests.conftest import metrics_rows


def test_two_by_two_sweep_writes_four_runs_and_a_summary_and_goes_on_past_failed_jobs(tmp_path):
    # jobs 0 and 1 (optim.lr=1e30) diverge at step 2: the sweep records them and runs the jobs after them; the
    # summary lists the jobs best first by their final loss (sweep.rank_by=loss), the failed ones last
    sweep = tmp_path / "sweep"
    cmd = ["msn-pretrain", "-m", "optim.lr=1e30,1e-3", "masking.ratio=0.15,0.3", "experiment=cpu_smoke",
           "optim.max_steps=2", "logger.progress=false", f"hydra.sweep.dir={sweep}", "sweep.rank_by=loss"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"msn-pretrain: error: 2 of 4 jobs of the sweep failed (jobs 0, 1: the reasons are above and in "
        f"{sweep / 'summary.csv'}); the other jobs ran")
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["0", "1", "2", "3"]
    grid = set()
    for name in runs:  # each run has its own config, metrics and checkpoints (a failed one: none)
        cfg = yaml.safe_load((sweep / name / "config.yaml").read_text())
        grid.add((cfg["optim"]["lr"], cfg["masking"]["ratio"]))
        assert (sweep / name / "checkpoints" / "last.pt").is_file() is (name in ("2", "3"))
        assert int(metrics_rows(sweep / name)[-1]["step"]) == (2 if name in ("2", "3") else 1)
    assert grid == {(1e30, 0.15), (1e30, 0.3), (1e-3, 0.15), (1e-3, 0.3)}

    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [{k: str(r.get(k, "")) for k in rows[0]} for r in json.loads((sweep / "summary.json").read_text())]
    losses = {r["job"]: float(r["final_loss"]) for r in rows if r["status"] == "finished"}
    best, second = sorted(losses, key=losses.get)
    assert [r["job"] for r in rows] == [best, second, "0", "1"] and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    for row in rows[2:]:
        assert row["status"] == "failed" and row["reason"].startswith("the loss or the encoder's gradient became "
                                                                      "non-finite at step 2")
    for row in rows[:2]:
        cfg = yaml.safe_load((sweep / row["job"] / "config.yaml").read_text())
        assert float(row["optim.lr"]) == cfg["optim"]["lr"] and float(row["masking.ratio"]) == cfg["masking"]["ratio"]
        assert float(row["final_loss"]) == pytest.approx(float(metrics_rows(sweep / row["job"])[-1]["loss"]))
        assert row["status"] == "finished" and row["final_step"] == "2" and row["reason"] == ""
    assert len(losses) == 2 and losses[best] < losses[second]  # the overrides took effect
    # the table on the console: the overrides that differ, status, the final step and loss; the reasons below
    table = result.stdout[result.stdout.index("every job: "):].splitlines()
    assert table[0] == "every job: experiment=cpu_smoke optim.max_steps=2 logger.progress=False sweep.rank_by=loss"
    assert table[1].split() == ["rank", "job", "optim.lr", "masking.ratio", "status", "final_step", "final_loss"]
    assert table[2].split() == ["1", best, "0.001", rows[0]["masking.ratio"], "finished", "2", f"{losses[best]:.4g}"]
    assert table[4].split()[:5] == ["3", "0", "1e+30", "0.15", "failed"]
    assert table[6].startswith("job 0 failed: the loss or the encoder's gradient became non-finite")
    assert f"best job by loss (lower is better): job {best} (loss {losses[best]:.4g}, finished)" in result.stdout
    assert f"  msn-export {sweep}/{best} {sweep}/{best}/hf" in result.stdout.splitlines()


def test_summary_rebuild_adds_eval_reports_and_marks_stopped_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, steps in (("0", 4), ("1", 2)):
        run = sweep / job
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optim.lr={job}e-3"]))
        (run / "run.json").write_text(json.dumps({"total_steps": 4}))
        with (run / "metrics.csv").open("w", newline="") as f:
            # job 1 has a loss term of its own (loss.extra_terms.spread): a column between loss and lr
            terms = ["ce", "me_max"] + (["spread"] if job == "1" else [])
            writer = csv.DictWriter(f, fieldnames=["step", "epoch", "loss", *terms, "lr", "distinct_prototypes",
                                                   "monitor"])
            writer.writeheader()
            for step in range(1, steps + 1):
                writer.writerow({"step": step, "epoch": 0, "loss": 5 - step, "ce": 4, "me_max": 0.1, "lr": 1e-3,
                                 "distinct_prototypes": 9, "monitor": 50.0 + step if step == 2 else "nan",
                                 **({"spread": 0.25} if job == "1" else {})})
    (sweep / "0" / "eval_knn.json").write_text(json.dumps({"protocol": "knn", "results": {"100%": {"mean": 71.5}}}))
    (sweep / "10").mkdir()  # not a Hydra job directory: ignored
    sweep_main([str(sweep)])
    assert "2 runs" in capsys.readouterr().out
    rows = json.loads((sweep / "summary.json").read_text())
    assert [(r["job"], r["status"], r["final_step"], r["final_loss"]) for r in rows] == [
        ("0", "finished", 4, 1.0), ("1", "stopped", 2, 3.0)]
    assert rows[0]["eval/knn/100%"] == 71.5 and "eval/knn/100%" not in rows[1]
    assert rows[0]["final_monitor"] == rows[1]["final_monitor"] == 52.0
    assert rows[1]["optim.lr"] == "1e-3"
    # every term and diagnostic the loss logged, and nothing else of metrics.csv
    assert {k for k in rows[0] if k.startswith("final_")} == {"final_step", "final_loss", "final_ce", "final_me_max",
                                                              "final_distinct_prototypes", "final_monitor"}
    assert rows[0]["final_ce"] == 4.0 and rows[1]["final_spread"] == 0.25 and "final_spread" not in rows[0]
    with pytest.raises(SystemExit) as exit_:
        sweep_main([str(sweep / "10")])
    assert exit_.value.code == 1 and "msn.sweep: error: no Hydra job directories" in capsys.readouterr().err


def test_example_sweep_config_is_a_two_by_two_multirun():
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=lr_mask"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"optim.lr": "5e-4,1e-3", "masking.ratio": "0.15,0.3"}
    assert cfg.hydra.callbacks.sweep_summary._target_ == "msn.cli.sweep.SweepSummary"
