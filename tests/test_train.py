import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msn.config import ConfigError
from msn.errors import DataError
from msn.train.loop import train
from msn.weights.checkpoint import CheckpointError, load_checkpoint
from tests.conftest import compose_config, metrics_rows

# metrics.csv of an MSN run, as every release wrote it (the loss's own terms sit after "loss", its diagnostics
# after the schedules): written out here, not read from the code under test.
COLUMNS = ["step", "epoch", "loss", "ce", "me_max", "entropy", "lr", "wd", "momentum", "sharpen_T",
           "distinct_prototypes", "max_target_prob", "encoder_grad_norm", "images_per_s", "monitor", "rankme",
           "rankme_head", "rankme_centred", "skipped_images"]


def _smoke(run_dir: Path, *overrides: str):
    return compose_config(["experiment=cpu_smoke", f"run_dir={run_dir}", "logger.progress=false", *overrides])


def test_cli_smoke_run_writes_metrics_and_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(["msn-pretrain", "experiment=cpu_smoke", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == ["step_0000003.pt",
                                                                                  "step_0000006.pt"]
    assert (run_dir / "config.yaml").is_file()
    rows = metrics_rows(run_dir)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert list(rows[0]) == COLUMNS
    for r in rows:
        monitored = ("monitor", "rankme", "rankme_head", "rankme_centred")
        assert all(r[c] not in ("", "nan") for c in COLUMNS if c not in monitored), r
        assert all(r[c] == "nan" for c in monitored)  # the monitor is off by default
        assert 1 <= float(r["distinct_prototypes"]) <= 16
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 6
    assert {"model", "optimizer", "step", "epoch", "rng", "config", "wandb_run_id"} <= set(state)


@pytest.mark.parametrize("pipeline", [[], ["data.augment_on=device", "data.num_workers=2"]], ids=["cpu", "device"])
def test_resumed_run_matches_uninterrupted_run(tmp_path, pipeline):
    # 64 synthetic images / batch 16 = 4 steps an epoch: step 3 is mid-epoch, step 6 in the next epoch.
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train(_smoke(full_dir, *pipeline))
    # A run that died after step 3 leaves a checkpoint of step 3 as its last.pt.
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(full_dir / "checkpoints" / "step_0000003.pt", resumed_dir / "checkpoints" / "last.pt")
    train(_smoke(resumed_dir, "resume=auto", *pipeline))

    full = load_checkpoint(full_dir / "checkpoints" / "last.pt")
    resumed = load_checkpoint(resumed_dir / "checkpoints" / "last.pt")
    assert resumed["step"] == full["step"] == 6
    for name, tensor in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, atol=0, rtol=0, msg=name)
    assert [int(r["step"]) for r in metrics_rows(resumed_dir)] == [4, 5, 6]
    assert [r["loss"] for r in metrics_rows(resumed_dir)] == [r["loss"] for r in metrics_rows(full_dir)][3:]


def test_the_photometric_stage_in_the_training_process_trains_the_same(tmp_path):
    """data.augment_on=device (here on the CPU, with 2 workers that only crop) gives the run of augment_on=cpu."""
    train(_smoke(tmp_path / "workers", "data.augment_on=cpu"))
    train(_smoke(tmp_path / "device", "data.augment_on=device", "data.num_workers=2"))
    losses = {name: [r["loss"] for r in metrics_rows(tmp_path / name)] for name in ("workers", "device")}
    assert losses["device"] == losses["workers"]
    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"] for name in ("workers", "device"))
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, atol=0, rtol=0, msg=name)


def test_resume_from_path_and_truncates_rows_past_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(_smoke(run_dir))
    train(_smoke(run_dir, f"resume={run_dir / 'checkpoints' / 'step_0000003.pt'}"))
    assert [int(r["step"]) for r in metrics_rows(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_keep_leaves_the_newest_periodic_checkpoints(tmp_path):
    """``checkpoint.keep=2``: a new periodic checkpoint removes the older ones, never last.pt; a resumed run
    goes on from the kept ones (the run's name ignores the option: it changes no result)."""
    run_dir = tmp_path / "run"
    train(_smoke(run_dir, "checkpoint.every_steps=1", "checkpoint.keep=2", "optim.max_steps=4"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt", "step_0000003.pt",
                                                                             "step_0000004.pt"]
    train(_smoke(run_dir, "checkpoint.every_steps=1", "checkpoint.keep=2",
                 f"resume={run_dir / 'checkpoints' / 'step_0000003.pt'}"))  # to the preset's 6 steps
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt", "step_0000005.pt",
                                                                             "step_0000006.pt"]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 6


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        train(_smoke(tmp_path / "a", f"resume={tmp_path / 'missing.pt'}"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a checkpoint") as err:
        train(_smoke(tmp_path / "b", f"resume={bad}"))
    assert "weights_only" not in str(err.value)  # never the unsafe advice torch's own message gives
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not an msn training checkpoint"):
        train(_smoke(tmp_path / "c", f"resume={bad}"))


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    metrics = train(_smoke(tmp_path / "run", "resume=auto", "optim.max_steps=2"))
    assert metrics["step"] == 2


def test_checkpoint_loading_refuses_pickled_objects(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "msn-train-v1", "payload": Path("x")}, evil)  # an arbitrary Python object
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors .*refused") as err:
        load_checkpoint(evil)
    assert "weights_only" not in str(err.value)


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # a dependency of the package; absent only from hand-made environments
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(_smoke(run_dir, "logger=wandb", "logger.progress=false", "optim.max_steps=2", "logger.log_every=1"))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    run_id = state["wandb_run_id"]
    assert run_id
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert len(metrics_rows(run_dir)) == 2  # the CSV log is written as well
    # the views grid once at the start, the prototype use at the end (the monitor is off)
    views = list(offline[0].glob("files/media/images/pictures/views_0_*.png"))
    assert len(views) == 1
    from PIL import Image

    # cpu_smoke: 4 images x (target, anchor, 2 focal views), in cells of 96 px (3 x the 32-px global views)
    assert Image.open(views[0]).size == (4 * 96, 4 * 96)
    tables = list(offline[0].glob("files/media/table/prototypes/sorted_use_table_*.table.json"))
    assert len(tables) == 1
    counts = [count for _, count in json.loads(tables[0].read_text())["data"]]
    assert len(counts) == 32 and counts == sorted(counts, reverse=True)  # cpu_smoke: 32 prototypes
    assert sum(counts) == 2 * 16  # every target of the 2 steps of 16 images, counted once


def test_cpu_rejects_half_precision(tmp_path):
    from msn.config import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="precision=bf16 needs a GPU"):
        train(_smoke(tmp_path, "precision=bf16"))


def test_console_lines_at_the_configured_interval(tmp_path, caplog):
    train(_smoke(tmp_path / "run", "logger.console_every=2", "optim.max_steps=5"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]
    assert all("loss" in line and "(ce " in line and " me_max " in line and "lr" in line and "img/s" in line
               for line in lines)
    assert " entropy " not in lines[0]  # a term with weight 0 is logged in metrics.csv, not shown on the console


def test_train_called_from_python_prints_nothing(tmp_path, capsys, caplog):
    """A notebook's train() writes nothing to its output: the lines are log records (msn.train.*), which the
    commands print and a notebook shows only when it configures logging; no bar off a terminal (progress=auto)."""
    cfg = _smoke(tmp_path / "run", "optim.max_steps=2", "logger.console_every=1")
    cfg.logger.progress = "auto"
    train(cfg)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert any(r.getMessage().startswith("run complete:") for r in caplog.records)


def test_progress_bar_only_on_a_terminal_unless_asked(tmp_path, capsys, caplog):
    """logger.progress=auto (the default) leaves the bar out of a log file (pytest's captured stderr is not a
    terminal, as a SLURM or nohup log); true draws it anyway; the console lines come either way."""
    for progress, bar in (("auto", False), ("true", True), ("false", False)):
        overrides = ["logger.console_every=2", "optim.max_steps=3"]
        cfg = _smoke(tmp_path / progress, *overrides)  # _smoke turns the bar off: set it after
        cfg.logger.progress = progress
        train(cfg)
        captured = capsys.readouterr()
        assert ("msn: 100%" in captured.err) is bar, (progress, captured.err[-500:])
        assert "step 2/3" in caplog.text
        caplog.clear()


def _compiled_matches_eager(tmp_path: Path, backend: str) -> None:
    eager = train(_smoke(tmp_path / "eager", "optim.max_steps=2"))
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = train(_smoke(tmp_path / backend, "optim.max_steps=2", "compile=true", f"compile_backend={backend}"))
    assert counters["stats"]["unique_graphs"] > 0  # dynamo really captured the encoders
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-4)
    state = load_checkpoint(tmp_path / backend / "checkpoints" / "last.pt")
    assert not any("_orig_mod" in k for k in state["model"])  # checkpoints keep the plain parameter names


def test_compile_option_runs_and_matches_eager(tmp_path):
    """compile=true traces forward and backward (AOTAutograd, without code generation) and computes the same steps."""
    _compiled_matches_eager(tmp_path, "aot_eager")


@pytest.mark.slow
def test_compile_with_inductor_matches_eager(tmp_path):
    """The default backend, inductor, generating C++ on the CPU (about 80 s here): the same steps."""
    _compiled_matches_eager(tmp_path, "inductor")


def test_periodic_monitor_is_logged(tmp_path, monkeypatch):
    from msn.eval import features

    crops = []
    extract = features.extract_features
    monkeypatch.setattr(features, "extract_features",
                        lambda enc, *a, **k: crops.append(enc.crop_pct) or extract(enc, *a, **k))
    run_dir = tmp_path / "run"
    train(_smoke(run_dir, "monitor.every_steps=2", "logger.log_every=3", "optim.max_steps=4", "monitor.crop_pct=1.0"))
    assert crops == [1.0] * 4  # train and test features at steps 2 and 4, of the whole image as asked
    rows = {int(r["step"]): r for r in metrics_rows(run_dir)}
    assert sorted(rows) == [2, 3, 4]  # monitored steps are logged even off the log_every grid
    assert rows[3]["monitor"] in ("", "nan")
    for step in (2, 4):
        assert 0 < float(rows[step]["monitor"]) <= 100  # k-NN accuracy (%) on the digits test split


# SIGINT takes the same path as SIGTERM (test_a_second_ctrl_c_stops_at_once checks its handler in-process);
# its 26-s whole-run variant runs with -m slow to keep the default suite within CI time.
@pytest.mark.parametrize("signame", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_stop_signal_writes_a_checkpoint_and_the_run_resumes(tmp_path, signame):
    """SIGTERM, and Ctrl-C sent as a terminal sends it (to the whole process group, loader workers included)."""
    import os
    import signal
    import time

    run_dir = tmp_path / "run"
    cmd = ["msn-pretrain", "experiment=cpu_smoke", f"hydra.run.dir={run_dir}", "logger.progress=false",
           "optim.max_steps=null", "optim.epochs=100", "checkpoint.every_steps=0", "checkpoint.last_every_steps=0",
           "data.num_workers=2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (run_dir / "metrics.csv").is_file() or len(metrics_rows(run_dir)) < 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert len(metrics_rows(run_dir)) >= 2, "the run did not start in time"
    os.killpg(proc.pid, getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"received {signame}" in out
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 2 <= state["step"] < 400 and f"wrote checkpoints/last.pt at step {state['step']}" in out
    # (the rerun that continues: test_the_same_command_continues_a_stopped_run_in_its_directory)


def test_a_second_ctrl_c_stops_at_once():
    import os
    import signal

    from msn.train.signals import StopRequest

    previous = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # first press: stop after the step, with a checkpoint
        assert stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # second press: at once
    finally:
        stop.restore()
        signal.signal(signal.SIGINT, previous)
    stop.forward()  # Python's own SIGINT handler is not called again after a clean stop


def _submitit_tasks(folder: Path) -> list[int]:
    """PIDs of the submitit task processes whose job folder is under ``folder`` (read from /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if "submitit.core._submit" in cmdline and any(arg.startswith(str(folder)) for arg in cmdline):
            pids.append(int(proc.name))
    return pids


def test_submitit_job_checkpoints_requeues_and_resumes_on_its_preemption_signal(tmp_path):
    """The SLURM launcher's flow, run by submitit's local executor (no cluster here): SIGUSR2, which
    SLURM sends before a time limit, reaches both tasks; they agree on a step, rank 0 writes last.pt,
    submitit requeues the job, and the requeued job resumes and finishes."""
    import os
    import signal
    import time

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra")
    sweep = tmp_path / "sweep"
    cmd = ["msn-pretrain", "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "experiment=cpu_smoke",
           "optim.max_steps=24", "optim.epochs=100", "checkpoint.every_steps=0", "checkpoint.last_every_steps=0",
           "logger.progress=false", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = sweep / "0"
    deadline = time.time() + 180
    while time.time() < deadline and (not (run_dir / "metrics.csv").is_file() or len(metrics_rows(run_dir)) < 3):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    tasks = _submitit_tasks(sweep)
    assert len(tasks) == 2 and len(metrics_rows(run_dir)) >= 3
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    log = next(sweep.glob(".submitit/*/*_0_log.out")).read_text()
    stopped = int(log.split("received SIGUSR2: wrote checkpoints/last.pt at step ")[1].split()[0])
    assert 3 <= stopped < 24
    assert "Requeued job" in log and f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at step {stopped}" in log
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 24
    assert [int(r["step"]) for r in metrics_rows(run_dir)] == list(range(1, 25))  # no step lost or logged twice
    with (sweep / "summary.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["finished"]


def test_launcher_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra")
    from hydra import compose, initialize_config_dir

    from msn.config import CONFIG_DIR
    from msn.utils.compose import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4"])
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
        assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0
        local = compose(config_name="config", return_hydra_config=True, overrides=["hydra/launcher=local"])
        assert local.hydra.launcher._target_.endswith("LocalLauncher")


def test_stop_request_under_submitit_saves_on_sigterm_and_forwards_its_signal(monkeypatch):
    import os
    import signal

    from msn.train.signals import StopRequest

    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda number, frame: calls.append(number))  # stands in for submitit
    try:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        stop = StopRequest()
        os.kill(os.getpid(), signal.SIGTERM)  # submitit ignores SIGTERM: we only save
        assert stop.save_only and stop.signal is None
        os.kill(os.getpid(), signal.SIGUSR2)  # submitit's time-limit / preemption signal: stop
        assert stop.signal == "SIGUSR2" and calls == []
        stop.restore()
        stop.forward()  # after the checkpoint: submitit's handler runs (and would requeue)
        assert calls == [signal.SIGUSR2]
        monkeypatch.delenv("SUBMITIT_EXECUTOR")
        plain = StopRequest()
        os.kill(os.getpid(), signal.SIGTERM)  # outside submitit SIGTERM stops the run
        plain.restore()
        assert plain.signal == "SIGTERM"
        plain.forward()  # the previous SIGTERM handler is the default action: nothing is called
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_resume_with_another_global_batch_or_over_a_finished_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    train(_smoke(run_dir, "optim.max_steps=2"))
    with pytest.raises(CheckpointError, match=r"global batch of 16 images.*8 x 1 processes = 8.*data.batch_size=16"):
        train(_smoke(run_dir, "data.batch_size=8", "optim.max_steps=4"))
    with pytest.raises(ConfigError, match="already holds checkpoints/last.pt.*resume=auto"):
        train(_smoke(run_dir, "resume=null", "optim.max_steps=4"))
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2  # the finished work is intact


def test_compile_covers_the_online_encoder_and_the_target(tmp_path):
    """compile=true compiles what the step calls: the online backbone (both view sizes), the online head and
    the target encoder. A recording backend names every module dynamo captured a graph of."""
    import torch._dynamo

    captured: list[set[str]] = []

    def recording(gm, example_inputs):
        captured.append({node.name for node in gm.graph.nodes if node.op == "placeholder"})
        return gm.forward

    torch._dynamo.reset()
    torch._dynamo.register_backend(recording, name="msn_recording")
    train(_smoke(tmp_path / "run", "optim.max_steps=1", "compile=true", "compile_backend=msn_recording"))
    torch._dynamo.reset()
    # Placeholders name parameters by their path from the compiled module: the target encoder's start with
    # "self_modules_backbone", the online backbone's with "self_modules_blocks", the online head's with
    # "self_modules_fc1".
    kinds = {kind for names in captured for kind in ("backbone", "blocks", "fc1")
             if any(f"self_modules_{kind}_" in n for n in names)}
    assert kinds == {"backbone", "blocks", "fc1"}, captured
    online_backbone = [names for names in captured if any("self_modules_blocks_" in n for n in names)]
    assert len(online_backbone) >= 2  # static shapes: one graph for the anchor, one for the focal views


def test_a_non_finite_step_stops_the_run_and_is_never_saved(tmp_path, monkeypatch):
    """The non-finite check stays on the device between logging steps, but runs before every checkpoint."""
    import msn.train.loop

    real_step, calls = msn.train.loop.train_step, []

    def poisoned(model, loss_fn, optimizer, views, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the 4th step sees NaN images: its loss, gradients and update are NaN
            views = [v * float("nan") for v in views]
        return real_step(model, loss_fn, optimizer, views, *args, **kwargs)

    monkeypatch.setattr(msn.train.loop, "train_step", poisoned)
    run_dir = tmp_path / "run"
    cfg = _smoke(run_dir, "logger.log_every=10", "checkpoint.last_every_steps=1", "checkpoint.every_steps=0")
    with pytest.raises(FloatingPointError, match="non-finite at step 4; nothing after the last checkpoint"):
        train(cfg)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_wandb_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="logger=wandb needs the wandb package, which is not installed"):
        train(_smoke(tmp_path / "run", "logger=wandb", "optim.max_steps=1"))



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_monitor_runs_on_the_training_gpu(tmp_path):
    run_dir = tmp_path / "run"
    train(_smoke(run_dir, "device=cuda", "precision=bf16", "monitor.every_steps=2", "optim.max_steps=2"))
    assert 0 < float(metrics_rows(run_dir)[-1]["monitor"]) <= 100


def _folder_with_bad_files(root: Path, good: int = 30, bad: int = 2) -> list[Path]:
    """``good`` real PNGs and ``bad`` undecodable files (a truncated PNG, text named .jpg) under ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    broken = []
    for i in range(bad):
        path = root / f"broken{i}.{'png' if i % 2 == 0 else 'jpg'}"
        path.write_bytes((root / "img000.png").read_bytes()[:60] if i % 2 == 0 else b"not an image")
        broken.append(path)
    return broken


def _folder_run(run_dir: Path, root: Path, *overrides: str):
    return _smoke(run_dir, "data=folder", f"data.root={root}", "data.global_size=32", "data.focal_size=16",
                  "data.num_focal=2", "data.batch_size=8", "data.num_workers=0", "optim.max_steps=null",
                  "optim.epochs=2", *overrides)


def test_undecodable_images_are_replaced_counted_and_logged(tmp_path, caplog):
    broken = _folder_with_bad_files(tmp_path / "images")
    run_dir = tmp_path / "run"
    train(_folder_run(run_dir, tmp_path / "images", "data.max_bad_files=5"))
    rows = metrics_rows(run_dir)
    assert len(rows) == 8  # 32 images / batch 8 = 4 steps an epoch, 2 epochs: no batch lost
    per_epoch = {}
    for r in rows:
        per_epoch[int(r["epoch"])] = int(r["skipped_images"])  # running count within the epoch
    assert per_epoch == {0: 2, 1: 2}  # both bad files, met once in each epoch
    err = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    for path in broken:
        assert f"skipped undecodable image {path} (replaced by another image" in err
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert sorted(state["skipped_images"]["paths"]) == sorted(str(p) for p in broken)


def test_too_many_undecodable_images_stop_the_run_listing_them(tmp_path):
    broken = _folder_with_bad_files(tmp_path / "images", good=30, bad=3)
    with pytest.raises(DataError, match="3 undecodable images, more than the 2 allowed") as err:
        train(_folder_run(tmp_path / "run", tmp_path / "images", "data.max_bad_files=2"))
    assert all(str(p) in str(err.value) for p in broken)


def test_data_error_in_a_loader_worker_is_one_line(tmp_path):
    """Every file undecodable: the worker's DataError reaches the user as one line, not a worker traceback."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(12):
        (root / f"img{i}.jpg").write_bytes(b"not an image")
    result = subprocess.run(["msn-pretrain", "experiment=cpu_smoke", "data=folder", f"data.root={root}",
                             "data.global_size=32", "data.focal_size=16", "data.num_focal=2", "data.batch_size=4",
                             "data.num_workers=2", "logger.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msn-pretrain: error: could not decode "), lines
    assert "DataLoader worker" not in result.stderr and "Traceback" not in result.stderr


def test_the_same_command_continues_a_stopped_run_in_its_directory(tmp_path):
    """The README's promise: stop a run (SIGTERM), run the identical command again, and it continues in
    the same directory; metrics.csv then holds every step once. Run once more: it is complete, exit 0,
    and nothing in the run directory changes."""
    import os
    import signal
    import time

    cmd = ["msn-pretrain", "experiment=cpu_smoke", "logger.progress=false", "optim.max_steps=null",
           "optim.epochs=6", "checkpoint.every_steps=0", "checkpoint.last_every_steps=0"]
    run_dir = tmp_path / "outputs" / "cpu_smoke_optim.epochs-6_optim.max_steps-null"  # checkpoint.* do not name it
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (run_dir / "metrics.csv").is_file() or len(metrics_rows(run_dir)) < 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert stopped_at < 24, "the run finished before the signal: nothing was tested"
    assert f"continue with: {' '.join(cmd)}" in out  # the message gives the command that continues

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"checkpoints/last.pt at step {stopped_at}" in again.stdout  # "resumed from ... at step N"
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [run_dir.name]  # no second directory
    assert [int(r["step"]) for r in metrics_rows(run_dir)] == list(range(1, 25))  # 24 steps, each once
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "is complete (step 24 of 24): nothing to do" in done.stdout
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # not touched at all


def test_a_run_that_is_live_in_another_process_is_not_started_twice(tmp_path):
    """Two terminals, one command: the second refuses while the first holds the run's lock, and may go once the
    first died (the kernel releases a dead process's lock: a crashed run whose pid is reused does not block)."""
    import socket

    from msn.utils.runlock import acquire_run_lock

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom msn.utils.runlock import acquire_run_lock\nacquire_run_lock(sys.argv[1])\n"
        "print('locked', flush=True)\ntime.sleep(60)"), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = subprocess.run(["msn-pretrain", "experiment=cpu_smoke", f"hydra.run.dir={run}"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip() == (f"msn-pretrain: error: {run} is being trained right now by process "
                                         f"{holder.pid} on {socket.gethostname()}; wait for it to stop, or pass "
                                         "run_name=NEW_NAME for a separate run")
        assert sorted(p.name for p in run.iterdir()) == [".msn.lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed (-9): its lock went with it, and the same process can take it now (a rerun of the
    # command after kill -9: tests/test_cluster.py).
    acquire_run_lock(run).release()


def test_two_launches_of_one_command_train_it_once(tmp_path):
    """Both started at the same moment: exactly one trains (the lock is atomic), the other says so in one line,
    and the run's metrics hold each step once."""
    command = ["msn-pretrain", "experiment=cpu_smoke", "optim.max_steps=15", "optim.epochs=8",
               f"hydra.run.dir={tmp_path / 'run'}"]
    launches = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in launches]
    assert sorted(code for code, _ in results) == [0, 1], results
    refused = next(err for code, err in results if code == 1).strip().splitlines()
    # "by process PID on HOST", or "by another process" when the holder had not yet written who it is
    assert len(refused) == 1 and "is being trained right now by " in refused[0], refused
    steps = [int(r["step"]) for r in metrics_rows(tmp_path / "run")]
    assert steps == list(range(1, 16))
