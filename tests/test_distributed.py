"""Data-parallel training with real gloo process groups on the CPU."""

import csv
import subprocess
import sys
from pathlib import Path

import torch

from msn.checkpoint import load_checkpoint
from tests.conftest import compose_config
from tests.dist_utils import run_distributed

# No head BN (SyncBatchNorm is not wired yet) and no masking (masks are drawn per rank), so that one
# process with batch 2b and two processes with batch b see exactly the same computation.
COMMON = ["experiment=cpu_smoke", "logger.progress=false", "model.head_batchnorm=false", "masking.ratio=0",
          "optim.max_steps=5", "checkpoint.every_steps=0"]


def _train_worker(rank: int, world: int, run_dir: str, overrides: list[str]) -> int:
    from msn.train import train

    train(compose_config([f"run_dir={run_dir}", *overrides]))
    return rank


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_distributed(_train_worker, world_size=1, args=(str(one), [*COMMON, "data.batch_size=16"]))
    run_distributed(_train_worker, world_size=2, args=(str(two), [*COMMON, "data.batch_size=8"]))
    a = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(two / "checkpoints" / "last.pt")["model"]
    assert a["prototypes"].shape == b["prototypes"].shape
    # 119 of 121 tensors agree to 1e-5; summation order differs between the runs and AdamW divides by
    # sqrt(v), which magnifies rounding noise in near-zero gradients (e.g. the key bias, which softmax
    # ignores) to ~1.5e-5 after 5 steps.
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=3e-5, rtol=1e-4, msg=name)
    assert load_checkpoint(one / "checkpoints" / "last.pt")["step"] == 5
    # the runs did train: the weights moved away from their (shared) initialisation
    fresh = load_checkpoint(one / "checkpoints" / "last.pt")
    assert not torch.equal(fresh["model"]["online.head.fc1.weight"], fresh["model"]["target.head.fc1.weight"])


def test_torchrun_writes_one_run_directory_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "msn.train",
           "experiment=cpu_smoke", f"hydra.run.dir={run_dir}", "logger.progress=false"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory") == 1  # only rank 0 reports and writes
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt", "step_0000003.pt"]
    with (run_dir / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]  # 64 images / (2 x 16) a step
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 4
    resumed = subprocess.run([*cmd, "resume=auto", "optim.epochs=3", "optim.max_steps=null"], capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 6
    assert Path(run_dir / "checkpoints" / "step_0000006.pt").is_file()
