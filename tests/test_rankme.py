"""RankMe (label-free run selection), the collapse stop and sweeps ranked by a chosen figure: the definition on
hand-computed cases, and real cpu_smoke runs (the monitor's columns, msn-eval rankme, a run made to collapse in a
sweep that goes on past it, the summary sorted best first)."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msn.config import monitor_protocols
from msn.eval.rankme import centred_rank, effective_rank, sample_indices
from msn.sweeps.ranking import rank_value, ranked
from msn.train.collapse import CollapseWatch, default_window
from tests.conftest import metrics_rows

# --- the definition -----------------------------------------------------------------------------------------


def test_effective_rank_of_hand_computed_cases():
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0, rel=1e-5)  # 8 equal singular values: exp(log 8)
    assert effective_rank(5.0 * torch.eye(8)) == pytest.approx(8.0, rel=1e-5)  # scale does not matter
    u, v = torch.randn(100, 1), torch.randn(1, 16)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-3)  # rank 1: one non-zero singular value
    # singular values 2, 1, 1: p = 1/2, 1/4, 1/4, entropy = 1.5 log 2, RankMe = 2 ** 1.5 (eps 1e-7 aside)
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(2 ** 1.5, rel=1e-5)
    # rows orthogonally rotated: the singular values, and so the rank, do not change
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)) @ q) == pytest.approx(
        2 ** 1.5, rel=1e-5)
    assert effective_rank(torch.zeros(4, 3)) == 1.0
    # around their mean, the 8 rows of the identity span 7 directions equally: I - 1/8 has singular values 1 (x7), 0
    assert centred_rank(torch.eye(8)) == pytest.approx(7.0, rel=1e-5)
    # a shared offset dominates the paper's figure (one large singular value), not the centred one
    spread = torch.eye(8)
    assert effective_rank(spread + 10.0) < 2.0 and centred_rank(spread + 10.0) == pytest.approx(7.0, rel=1e-4)


def test_effective_rank_of_random_matrices_is_high_but_below_the_width():
    torch.manual_seed(0)
    wide = effective_rank(torch.randn(4000, 16))  # N >> D: singular values all about sqrt(N)
    assert 15.0 < wide < 16.0
    square = effective_rank(torch.randn(64, 64))  # Marchenko-Pastur spread: well below 64, well above 1
    assert 30.0 < square < 60.0


def test_the_sample_is_fixed_distinct_and_bounded():
    first, again = sample_indices(1797, 1024), sample_indices(1797, 1024)
    assert (first == again).all() and len(set(first.tolist())) == 1024 and (first == sorted(first)).all()
    assert first.max() < 1797
    assert sample_indices(64, 1024).tolist() == list(range(64))  # fewer images than asked for: all of them


def test_monitor_protocols_parses_names_and_lists():
    assert monitor_protocols("knn") == ("knn", False)
    assert monitor_protocols("rankme") == (None, True)
    assert monitor_protocols(["knn", "rankme"]) == ("knn", True)
    for bad in (["knn", "lowshot"], [], ["rankme", "rankme"]):
        with pytest.raises(ValueError, match="monitor.protocol"):
            monitor_protocols(bad)


# --- the collapse signals -----------------------------------------------------------------------------------


def rows(**columns):
    """Logged rows: each keyword a column's values, one row a step from 1."""
    n = len(next(iter(columns.values())))
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def watch(**kw):
    defaults = dict(num_prototypes=64, window_steps=3, rankme_below=1.5, after_step=0)
    return CollapseWatch(**{**defaults, **kw})


def first_collapse(w, table):
    for step, row in enumerate(table, start=1):
        message = w.update(row, step)
        if message:
            return step, message
    return None


def test_one_prototype_must_hold_for_the_whole_window():
    distinct = [5, 1, 1, 2, 1, 1, 1, 1, 3]  # broken at step 4; held from step 5: stops at 5 + 3 = 8
    step, message = first_collapse(watch(), rows(distinct_prototypes=distinct, ce=[1.0] * 9))
    assert step == 8 and "one prototype" in message and "from step 5 to step 8" in message
    assert "loss.me_max_weight=1" in message and "collapse.stop=false" in message
    assert first_collapse(watch(), rows(distinct_prototypes=[1, 1, 2, 1, 1, 2, 1, 1], ce=[1.0] * 8)) is None


def test_uniform_predictions_at_log_k_and_the_warm_up():
    log_k = math.log(64)
    ce = [log_k * 1.0005] * 10  # within 0.1 % of log K throughout, as a collapsed encoder's
    step, message = first_collapse(watch(after_step=4), rows(ce=ce, distinct_prototypes=[20] * 10))
    assert step == 8 and "uniform" in message  # rows up to the warm-up's step 4 are not read: from 5 to 8
    assert first_collapse(watch(), rows(ce=[log_k * 0.97] * 10, distinct_prototypes=[20] * 10)) is None
    # a run that learns slowly hovers 0.2-1 % under log K (a fitted digits run: k-NN 75 % at its end): not collapsed
    assert first_collapse(watch(), rows(ce=[log_k * 0.997] * 10, distinct_prototypes=[20] * 10)) is None


def test_rankme_signal_lasts_between_measurements():
    nan = math.nan
    table = rows(rankme=[9.0, nan, 1.2, nan, nan, 1.1, nan], rankme_head=[9.0, nan, 1.3, nan, nan, 1.4, nan],
                 ce=[1.0] * 7, distinct_prototypes=[9] * 7)
    step, message = first_collapse(watch(), table)
    assert step == 6 and "RankMe 1.1" in message  # measured low at 3 and 6, unmeasured between: held 3 -> 6
    assert default_window(560, 10) == 50 and default_window(100_000, 10) == 5000


# --- ranking ------------------------------------------------------------------------------------------------


def test_ranked_puts_the_best_first_and_bad_jobs_last():
    table = [{"job": "0", "status": "finished", "final_rankme": 3.0, "final_loss": 2.0},
             {"job": "1", "status": "collapsed", "final_rankme": 9.0, "final_loss": 0.1},
             {"job": "2", "status": "finished", "final_rankme": 5.0, "final_loss": 3.0},
             {"job": "3", "status": "stopped", "final_loss": 1.0},
             {"job": "4", "status": "failed"}]
    assert [r["job"] for r in ranked(table, "rankme")] == ["2", "0", "3", "1", "4"]
    assert [r["job"] for r in ranked(table, "loss")] == ["3", "0", "2", "1", "4"]
    assert rank_value({"eval/rankme/backbone": "7.5"}, "rankme") == 7.5  # an msn-eval report counts too
    assert rank_value({"final_monitor": "nan"}, "knn") is None


# --- real runs ----------------------------------------------------------------------------------------------

COLLAPSING = ["experiment=cpu_smoke", "logger.progress=false", "loss.sinkhorn=false", "optim.max_steps=16",
              "optim.epochs=4", "optim.lr=0.1", "optim.ema_momentum=0.9", "optim.final_ema_momentum=0.9",
              "collapse.window_steps=4", "monitor.every_steps=4", "monitor.protocol=rankme",
              "checkpoint.every_steps=1", "checkpoint.last_every_steps=5"]  # at the stop a periodic one, no last.pt


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two jobs: without ME-MAX (job 0) the target sends every image to one prototype from step 8 or 9 (the
    CPU's rounding decides: 8 where this test was written, 9 on a later machine with AVX-512) and the run stops 4
    steps later; with it (job 1) the run finishes. RankMe is monitored every 4 steps."""
    root = tmp_path_factory.mktemp("rankme")
    out = root / "sweep"
    cmd = ["msn-pretrain", "-m", "loss.me_max_weight=0,1", *COLLAPSING, f"hydra.sweep.dir={out}"]
    with (root / "stdout").open("w") as so, (root / "stderr").open("w") as se:
        result = subprocess.run(cmd, cwd=root, stdout=so, stderr=se, text=True, timeout=300)
    return root, out, result.returncode, (root / "stdout").read_text(), (root / "stderr").read_text()


def test_a_collapsing_run_stops_and_the_sweep_goes_on_ranked_by_rankme(sweep):
    root, out, code, stdout, stderr = sweep
    assert code == 0, stderr[-3000:]  # a collapse is a result of the sweep, not a failure of it
    status = json.loads((out / "0" / "status.json").read_text())
    onset, stop = collapse_steps(out / "0")
    assert 8 <= onset <= 9 and stop == onset + 4 and stop % 5  # a stop with a periodic checkpoint and no last.pt
    assert status["status"] == "collapsed" and status["step"] == stop
    assert status["reason"].startswith("the run collapsed: the target sends every image of the batch to one "
                                       f"prototype (distinct_prototypes 1) from step {onset} to step {stop}")
    assert torch.load(out / "0" / "checkpoints" / "last.pt", weights_only=False)["step"] == stop  # written for it
    assert f"msn-pretrain: error: {status['reason']}" in stderr.splitlines()  # one line, no traceback
    assert "Traceback" not in stderr
    assert json.loads((out / "1" / "status.json").read_text())["status"] == "finished"

    with (out / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["rank"]) for r in summary] == [("1", "finished", "1"), ("0", "collapsed", "2")]
    assert summary[1]["reason"] == status["reason"]
    last = metrics_rows(out / "1")[-1]
    for column in ("rankme", "rankme_head", "rankme_centred"):
        assert float(summary[0][f"final_{column}"]) == pytest.approx(float(last[column]))
    # ranked by default by the backbone's RankMe around its mean (docs/studies.md)
    best = f"job 1 (rankme_centred {float(last['rankme_centred']):.4g}, finished)"
    assert f"best job by rankme_centred (higher is better): {best}" in stdout
    assert f"  msn-export {out}/1 {out}/1/hf" in stdout.splitlines()
    assert "1 of 2 jobs collapsed and were stopped early (job 0)" in stdout


def test_rankme_is_logged_on_monitor_steps_and_msn_eval_measures_the_same(sweep):
    root, out, *_ = sweep
    logged = {int(r["step"]): r for r in metrics_rows(out / "1")}
    measured = [s for s, r in logged.items() if r["rankme"] != "nan"]
    assert measured == [4, 8, 12, 16]
    for s in measured:  # between 1 and the sample's 64 images
        for column in ("rankme", "rankme_head", "rankme_centred"):
            assert 1.0 <= float(logged[s][column]) <= 64
    assert all(logged[s]["rankme"] == logged[s]["rankme_centred"] == "nan" for s in logged if s not in measured)

    result = subprocess.run(["msn-eval", "rankme", str(out / "1")], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "1" / "eval_rankme_train.json").read_text())
    # the same 64 training images and the same target as the run's last monitor step
    assert report["results"]["backbone"]["mean"] == pytest.approx(float(logged[16]["rankme"]), rel=1e-6)
    assert report["results"]["head"]["mean"] == pytest.approx(float(logged[16]["rankme_head"]), rel=1e-6)
    assert report["results"]["backbone_centred"]["mean"] == pytest.approx(float(logged[16]["rankme_centred"]),
                                                                          rel=1e-6)
    assert report["settings"]["images"] == 64
    assert "  backbone" in result.stdout and "effective rank" in result.stdout

    # a labelled protocol's options mean nothing to rankme: refused, not ignored
    refused = subprocess.run(["msn-eval", "rankme", str(out / "1"), "--shots", "5"], cwd=root, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "msn-eval: error: msn-eval rankme takes no --shots (it needs no labels: --dataset, --images, --crop-pct, "
        "--batch-size, --device, --precision)"]


def collapse_steps(run: Path) -> tuple[int, int]:
    """The step from which a run's target sent every image to one prototype, and its last step (from metrics.csv)."""
    rows = [(int(r["step"]), float(r["distinct_prototypes"])) for r in metrics_rows(run)]
    onset = rows[-1][0]
    for step, distinct in reversed(rows):
        if distinct != 1:
            break
        onset = step
    return onset, rows[-1][0]


def rerun_collapsed(root, out):
    """The command that continues the sweep's collapsed job 0 in its folder."""
    return [sys.executable, "-m", "msn.cli.pretrain", "loss.me_max_weight=0", *COLLAPSING, f"resume={out / '0'}"]


def test_a_collapsed_run_is_not_trained_on_unless_asked(sweep):
    root, out, *_ = sweep
    refused = subprocess.run(rerun_collapsed(root, out), cwd=root, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"msn-pretrain: error: {out / '0'} stopped at step {collapse_steps(out / '0')[1]}: the run collapsed")
    assert json.loads((out / "0" / "status.json").read_text())["status"] == "collapsed"  # nothing trained


@pytest.mark.slow
def test_a_collapsed_run_trains_on_with_collapse_stop_false(sweep):
    root, out, *_ = sweep
    trained_on = subprocess.run([*rerun_collapsed(root, out), "collapse.stop=false"], cwd=root, capture_output=True,
                                text=True, timeout=120)
    assert trained_on.returncode == 0, trained_on.stderr[-2000:]
    assert json.loads((out / "0" / "status.json").read_text())["status"] == "finished"
    assert int(metrics_rows(out / "0")[-1]["step"]) == 16
