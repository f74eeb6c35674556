"""The contract of msn as a framework: a researcher's own package (tests/plugin/msnplugin, outside msn/) adds a
dataset, a loss term and an evaluation protocol, and trains, logs and evaluates with them through the real commands,
without a line of msn changed.

The package is on PYTHONPATH, as if installed; ``MSN_PLUGINS=msnplugin`` registers its protocol and its source for
the command line (its dataset class and loss term are named by import path, as Hydra's ``_target_`` names code).
"""

import csv
import json
import math
import subprocess
import sys

import pytest

from msn.weights.checkpoint import load_checkpoint
from tests.conftest import plugin_env

VIEWS = ["data.global_size=32", "data.focal_size=16", "data.num_focal=2", "data.num_workers=0", "data.batch_size=8"]


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    """``msn-pretrain`` on the user's dataset class, with the user's loss term and the user's protocol as the
    monitor: 48 discs (one unreadable), 6 steps of 8, monitored at steps 3 and 6."""
    base = tmp_path_factory.mktemp("plugin")
    run = base / "run"
    command = ["msn-pretrain", "experiment=cpu_smoke", "data=custom",
               "data.dataset={_target_:msnplugin.datasets.Discs,n:48}", *VIEWS,
               "+loss.extra_terms.similarity={_target_:msnplugin.terms.prototype_similarity,weight:0.1}",
               "monitor.every_steps=3", "monitor.protocol=nearest_mean", "logger.progress=false",
               "logger.console_every=1", f"hydra.run.dir={run}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=base,
                            env=plugin_env(MSN_PLUGINS="msnplugin"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def test_a_users_dataset_loss_term_and_protocol_train_and_log(plugin_run):
    run, result = plugin_run
    with (run / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["step", "epoch", "loss", "ce", "me_max", "entropy", "similarity", "lr", "wd",
                                 "momentum", "sharpen_T", "distinct_prototypes", "max_target_prob",
                                 "encoder_grad_norm", "images_per_s", "monitor", "rankme", "rankme_head",
                                 "rankme_centred", "skipped_images"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:  # the user's term counts in the loss with its weight: loss = ce + me_max + 0.1 similarity
        similarity = float(r["similarity"])
        assert -1 <= similarity <= 1
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["me_max"]) + 0.1 * similarity, abs=1e-5)
    monitored = {int(r["step"]): float(r["monitor"]) for r in rows if not math.isnan(float(r["monitor"]))}
    assert sorted(monitored) == [3, 6] and all(0 <= v <= 100 for v in monitored.values())
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and all(" similarity " in line for line in lines)
    # the user's unreadable item was replaced, counted and named
    assert "skipped undecodable image msnplugin.datasets.Discs item 5 (replaced by another image" in result.stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["skipped_images"]["paths"] == ["msnplugin.datasets.Discs item 5"]
    assert state["data"]["kind"] == "custom" and state["data"]["source"] == "msnplugin.datasets.Discs(n=48)"


def test_the_users_protocol_evaluates_by_name_and_by_import_path(plugin_run, tmp_path, capsys):
    """msn-eval (its main, in this process: MSN_PLUGINS's part, importing the plugin, is the monitor's above)."""
    import msnplugin  # noqa: F401  (what MSN_PLUGINS=msnplugin does: its protocol registers)

    from msn.cli import evaluate

    run, _ = plugin_run
    assert evaluate.main(["nearest_mean", str(run), "--no-cache", "--output", str(tmp_path / "a.json")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["protocol"] == "nearest_mean" and report["settings"]["normalise"] is True
    assert list(report["results"]) == ["100%"] and 0 <= report["results"]["100%"]["mean"] <= 100

    # without MSN_PLUGINS: named by its import path, with an option of its own
    assert evaluate.main(["msnplugin.protocols.nearest_mean", str(run), "--no-cache", "--option", "normalise=false",
                          "--output", str(tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["protocol"] == "nearest_mean" and report["settings"]["normalise"] is False
    capsys.readouterr()
    assert evaluate.main(["msnplugin.protocols.nearest_mean", str(run), "--k", "3"]) == 1
    assert capsys.readouterr().err.strip() == ("msn-eval: error: msn-eval msnplugin.protocols.nearest_mean: the "
                                               "option k does not apply to the nearest_mean protocol (it takes "
                                               "normalise)")


def test_the_users_term_gets_its_own_curve(plugin_run, tmp_path):
    from msn.cli import viz
    from msn.plots.curves import find_runs, panels

    run, _ = plugin_run
    assert "similarity" in panels(find_runs([run]))
    assert viz.main(["curves", str(run), "--out", str(tmp_path / "curves.png")]) == 0


def test_msn_bench_reads_the_users_registered_source(tmp_path):
    """``data.name=discs``, registered by the plugin (msnplugin.datasets.DiscsSource): the loader benchmark reads it
    as the trainer would."""
    command = ["msn-bench", "data", "--source", "discs", "--workers", "0", "--seconds", "0.2", *VIEWS,
               "data.synthetic_size=32", "data.image_size=32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=plugin_env(MSN_PLUGINS="msnplugin"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["source"] == "discs" and report["root"] == "32 discs" and report["images"] == 32
    assert report["ours_images_per_s"] > 0


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "msn.cli.evaluate", "knn", str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env=plugin_env(MSN_PLUGINS="msnplugin.nope"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "msn-eval: error: MSN_PLUGINS=msnplugin.nope: cannot import msnplugin.nope (No module named 'msnplugin.nope'); "
        "check the module name and PYTHONPATH"]
