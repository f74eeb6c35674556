"""Silent or destructive failures a careless or hostile user found, each with the behaviour that replaces it:
what is saved is always finite, a run is trained once and is the run it says it is, a user's files are left
alone, refusals come before any file is written, and the command line (not the library) owns the signals."""

import math
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import msn.train.loop
from msn.config import ConfigError, to_schema
from msn.data.loader import loader_workers
from msn.errors import CheckpointError, NonFiniteError
from msn.train import train
from msn.utils.runname import run_directory
from msn.weights.checkpoint import load_checkpoint
from tests.conftest import compose_config, metrics_rows


def _smoke(run_dir: Path, *overrides: str):
    return compose_config(["experiment=cpu_smoke", f"run_dir={run_dir}", "logger.progress=false", *overrides])


def _cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["msn-pretrain", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_weights_that_became_non_finite_are_never_saved(tmp_path, monkeypatch):
    """The step before a checkpoint leaves NaN weights while its loss and gradient norm are finite (what an
    overflowing update does): nothing is saved, and the message says so."""
    real_step, calls = msn.train.loop.train_step, []

    def overflowing(model, *args, **kwargs):
        result = real_step(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # cpu_smoke checkpoints after step 3
            with torch.no_grad():
                model.online.head.fc1.weight[0, 0] = math.inf
        return result

    monkeypatch.setattr(msn.train.loop, "train_step", overflowing)
    with pytest.raises(NonFiniteError, match=r"weights hold NaN or infinity by step 3 .*\(no checkpoint was written\)"):
        train(_smoke(tmp_path / "run"))
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate=1.5 must lie in [0, 1)"),
    ("data.global_scale=[0.3,1.5]", "data.global_scale=[0.3, 1.5] must be two increasing positive numbers [low, high] "
                                    "of at most 1"),
    ("data.focal_scale=[0.3,0.05]", "data.focal_scale=[0.3, 0.05] must be two increasing positive numbers [low, high] "
                                    "of at most 1"),
])
def test_values_that_trained_nonsense_or_crashed_late_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_schema(compose_config([override, f"run_dir={tmp_path}"]))


@pytest.mark.parametrize(("args", "message"), [
    (["device=cuda"], "device=cuda but no CUDA device is available"),
    (["precision=fp16", "device=cpu"], "precision=fp16 needs a GPU"),
    (["init_from=/no/such/weights.pth.tar"], "init_from=/no/such/weights.pth.tar does not exist"),
    (["monitor.every_steps=2", "monitor.dataset=/no/such/folder"], "monitor.dataset=/no/such/folder is not digits"),
    (["model.drop_path_rate=1.5"], "model.drop_path_rate=1.5 must lie in [0, 1)"),
], ids=["cuda", "fp16", "init_from", "monitor", "drop_path"])
def test_refusals_come_before_any_file_is_written(tmp_path, args, message):
    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _cli("experiment=cpu_smoke", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_sweep_checks_every_job_before_the_first_runs(tmp_path):
    result = _cli("-m", "experiment=cpu_smoke", "optim.lr=1e-3,-1", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                  cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert "job 1 of the sweep (experiment=cpu_smoke optim.lr=-1)" in lines[0]
    assert "optim.lr=-1.0 must be > 0" in lines[0]
    assert not list((tmp_path / "sweep").glob("*/checkpoints"))  # job 0 never trained


@pytest.mark.parametrize(("args", "message"), [
    (["model=vit_smal"], "model=vit_smal is not an option of model; did you mean model=vit_small?"),
    (["modle=vit_tiny"], "modle is not a config group or key of msn-pretrain; did you mean model?"),
    (["optim.lrr=1"], "optim.lrr is not a config group or key of msn-pretrain; did you mean optim.lr?"),
    (["optim.lr=abc"], "optim.lr=abc: expected a number (float)"),
    (["data.root=/data/猫"], "quote a value with spaces, braces or non-ASCII letters for Hydra"),
], ids=["option", "group", "key", "type", "unquoted"])
def test_hydras_errors_are_one_line_naming_the_fix(tmp_path, args, message):
    result = _cli(*args, cwd=tmp_path, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("msn-pretrain: error: ") and message in lines[0], lines[0]
    assert "HYDRA_FULL_ERROR" not in result.stderr and "+optim" not in result.stderr


def test_a_chosen_checkpoint_of_a_finished_run_is_resumed_not_called_complete(tmp_path):
    run = tmp_path / "run"
    train(compose_config(["experiment=cpu_smoke", "logger.progress=false", f"run_dir={run}"]))  # finished
    rewind = _cli("experiment=cpu_smoke", f"hydra.run.dir={run}", f"resume={run}/checkpoints/step_0000003.pt",
                  cwd=tmp_path)
    assert rewind.returncode == 0, rewind.stderr[-2000:]
    assert "is complete" not in rewind.stdout and "at step 3" in rewind.stdout


def test_a_metrics_file_with_a_second_header_never_stops_a_resume(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(_smoke(full))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_0000003.pt", resumed / "checkpoints" / "last.pt")
    rows = (full / "metrics.csv").read_text().splitlines()
    header = rows[0]
    (resumed / "metrics.csv").write_text("\n".join([header, *rows[1:4], header, *rows[2:5], "garbage,line", ""]))
    (resumed / "status.json").write_text('{"status": "running", "step": 3, "total_steps": 6}')
    train(_smoke(resumed, "resume=auto"))
    assert [int(r["step"]) for r in metrics_rows(resumed)] == [1, 2, 3, 4, 5, 6]


def test_run_folder_names_are_short_unique_and_stable():
    assert run_directory("o", None, "data.root=/x/猫", None) != run_directory("o", None, "data.root=/x/犬", None)
    short = run_directory("o", None, "data.root=/tmp/newcomer/myjpegs,data=folder", None)
    assert short.startswith("o/data.root-myjpegs-") and short.endswith("_data-folder")
    assert run_directory("o", None, "data.root=/a/images", None) != run_directory("o", None, "data.root=/b/images",
                                                                                None)
    assert run_directory("o", None, "optim.lr=1,optim.lr=2", None) == "o/optim.lr-2"  # Hydra takes the last
    assert run_directory("o", None, "experiment=cpu_smoke,optim.lr=0.001", None) == "o/cpu_smoke_optim.lr-0.001"


def test_run_folders_have_one_name_only(tmp_path):
    """The fallback to folders named before names were shortened (an unreleased layout) is gone: such a folder is
    not picked up; the run's folder is its short, unique name."""
    (tmp_path / "data.root=_tmp_newcomer_myjpegs").mkdir()
    named = run_directory(str(tmp_path), None, "data.root=/tmp/newcomer/myjpegs", None)
    assert Path(named).name.startswith("data.root-myjpegs-") and not Path(named).exists()


def _jpegs(folder: Path, count: int, first: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def test_keys_under_a_node_that_names_no_run_do_not_name_it_either():
    """Hydra leaves ``monitor.options`` out of a run's name (exclude_keys) but not ``+monitor.options.k``: the same
    command with another monitor option must continue the same run, not start another."""
    from msn.utils.compose import compose_config as compose_run

    plain = compose_run(["experiment=cpu_smoke", "optim.lr=0.01"]).run_dir
    assert plain == "outputs/cpu_smoke_optim.lr-0.01"
    assert compose_run(["experiment=cpu_smoke", "optim.lr=0.01", "+monitor.options.k=10"]).run_dir == plain
    assert compose_run(["experiment=cpu_smoke", "optim.lr=0.01", "monitor.options={k:10}"]).run_dir == plain
    assert run_directory("out", None, "+monitor.options.k=10,optim.lr=0.01", None, ["monitor.options"]) == \
        "out/optim.lr-0.01"


def test_an_earlier_checkpoint_of_a_bundled_set_resumes_without_a_moved_data_note(tmp_path, caplog):
    """Checkpoints of digits / synthetic / Fashion-MNIST runs written before sources named themselves recorded an
    empty source: a resume of one is no move of the data."""
    from msn.weights.checkpoint import save_checkpoint

    run = tmp_path / "run"
    train(_smoke(run, "optim.max_steps=2", "checkpoint.last_every_steps=2"))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["data"]["source"] == "synthetic"
    state["data"]["source"] = ""
    save_checkpoint(run / "checkpoints" / "last.pt", {k: v for k, v in state.items() if k != "format"})
    caplog.clear()
    train(_smoke(run, "optim.max_steps=3", "resume=auto"))
    assert "resumed from" in caplog.text and "resuming a run trained on" not in caplog.text


def test_a_resume_on_changed_data_says_what_changed(tmp_path):
    images = _jpegs(tmp_path / "images", 16)
    overrides = ["data=folder", f"data.root={images}", "data.global_size=32", "data.focal_size=16",
                 "data.num_focal=2", "data.batch_size=8", "data.num_workers=0", "optim.max_steps=null",
                 "optim.epochs=2"]
    run = tmp_path / "run"
    train(_smoke(run, *overrides, "checkpoint.every_steps=2"))
    shutil.copy(run / "checkpoints" / "step_0000002.pt", run / "checkpoints" / "last.pt")
    _jpegs(images, 8, first=16)  # 8 images added since
    with pytest.raises(CheckpointError, match=r"belongs to a run on other data \(images: 16 then, 24 now; "
                                              r"samples_per_epoch: 16 then, 24 now\)"):
        train(_smoke(run, *overrides, "resume=auto"))


def test_a_folder_of_someone_elses_files_is_refused(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "config.yaml").write_text("my: own config\n")
    (project / "metrics.csv").write_text("epoch,accuracy\n1,0.5\n")
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    result = _cli("experiment=cpu_smoke", f"hydra.run.dir={project}", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert "holds config.yaml, metrics.csv but no msn run" in lines[0]
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before


def test_train_as_a_library_leaves_its_hosts_signals_alone(tmp_path, monkeypatch):
    host_handler = signal.getsignal(signal.SIGINT)
    seen, real_step = [], msn.train.loop.train_step

    def recording(*args, **kwargs):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(msn.train.loop, "train_step", recording)
    term_handler = signal.getsignal(signal.SIGTERM)
    train(_smoke(tmp_path / "run"))
    assert seen and all(s == (host_handler, term_handler) for s in seen)


def test_resume_continues_from_the_newest_checkpoint_after_a_full_disk(tmp_path, caplog):
    """A full disk stopped the run after step_0000003.pt was written and before last.pt was: the same command
    continues from step 3 (it used to start again at step 0), and says so."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(_smoke(full))
    (stopped / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_0000003.pt", stopped / "checkpoints" / "step_0000003.pt")
    (stopped / "status.json").write_text('{"status": "running", "step": 0, "total_steps": 6}')
    caplog.clear()
    train(_smoke(stopped, "resume=auto"))
    assert f"resuming from {stopped}/checkpoints/step_0000003.pt (step 3)" in caplog.text
    for name, tensor in load_checkpoint(full / "checkpoints" / "last.pt")["model"].items():
        torch.testing.assert_close(load_checkpoint(stopped / "checkpoints" / "last.pt")["model"][name], tensor,
                                   atol=0, rtol=0)


def test_the_start_says_what_trains_and_points_to_the_paper_preset(tmp_path, caplog):
    images = _jpegs(tmp_path / "images", 4)
    train(_smoke(tmp_path / "run", "data=folder", f"data.root={images}", "data.batch_size=2", "data.num_focal=1",
                 "data.num_workers=0", "optim.max_steps=1"))
    out = caplog.text
    assert "training vit_pico (patch 8, native 32 px) on views of 2 x 224 px + 1 x 96 px of 4 folder images" in out
    assert "pass experiment=msn_vits16" in out
    assert "first step (1 of 1) done in" in out  # before the step-50 line (logger.console_every)


def test_the_folder_default_uses_no_more_loader_workers_than_cores():
    cfg = compose_config(["data=folder", "data.root=/x", "run_dir=."])
    assert cfg.data.num_workers is None
    assert loader_workers(None) == min(8, len(__import__("os").sched_getaffinity(0)))
    assert loader_workers(3) == 3


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux's script for a pseudo-terminal")
def test_a_terminal_shows_the_progress_bar(tmp_path):
    """In a pseudo-terminal (here one that reports a size of 0 x 0, as script's does) the default
    logger.progress=auto draws the bar."""
    log = tmp_path / "typescript"
    command = f"msn-pretrain experiment=cpu_smoke hydra.run.dir={tmp_path / 'run'} logger.console_every=0"
    subprocess.run(["script", "-qec", command, str(log)], cwd=tmp_path, capture_output=True, timeout=300,
                   stdin=subprocess.DEVNULL)
    screen = log.read_text(errors="replace")
    assert "msn: 100%" in screen and "6/6" in screen, screen[-1500:]


def test_a_digits_fraction_that_equals_a_shot_count_says_so(tmp_path):
    """1 % of digits' ~126 training images a class is one image: the "1%" row repeats the "1" row, and says so."""
    from msn.eval.evaluate import evaluate, format_table

    train(_smoke(tmp_path / "run"))
    report = evaluate("lowshot", tmp_path / "run", dataset="digits", shots=(1, 2), fraction=0.01, splits=1,
                      cache_dir=None)
    note = "1% of the labels is 1 image per class here: the same setting as the '1' row"
    assert report["results"]["1%"]["note"] == note
    assert "note" not in report["results"]["1"]
    assert "(1% of the labels is 1 image per class here" in format_table(report)
