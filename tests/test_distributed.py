"""Data-parallel training with real gloo process groups on the CPU."""

import csv
import subprocess
import sys
from pathlib import Path

import torch

from msn.checkpoint import load_checkpoint
from tests.conftest import compose_config
from tests.dist_utils import run_distributed

# Head BN (global statistics), masking of anchor and focal views and the augmentations all on: one
# process with batch 2b and two processes with batch b must see exactly the same computation.
COMMON = ["experiment=cpu_smoke", "logger.progress=false", "model.head_batchnorm=true", "masking.ratio=0.3",
          "masking.mask_focal=true", "optim.max_steps=5", "checkpoint.every_steps=0"]


def _train_worker(rank: int, world: int, run_dir: str, overrides: list[str], dtype: str = "float32") -> int:
    import msn.train
    from msn.model import MSN

    if dtype == "float64":  # build the model in float64 (the views follow it), to remove rounding noise
        msn.train.MSN = lambda cfg: MSN(cfg).double()
    msn.train.train(compose_config([f"run_dir={run_dir}", *overrides]))
    return rank


def _final_model(run_dir: Path, world: int, batch: int, *extra: str) -> dict[str, torch.Tensor]:
    overrides = [*COMMON, f"data.batch_size={batch}", *extra]
    run_distributed(_train_worker, world_size=world, args=(str(run_dir), overrides, "float64"))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 5 and state["global_batch_size"] == 16 and state["world_size"] == world
    return state["model"]


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    """Gradient averaging, Sinkhorn, ME-MAX, head BN and masks are global: 2 x 8 images == 1 x 16 images.

    In float64: in float32 the two runs agree to ~3e-5 only, because summation order differs and Adam's
    first steps (update ~ lr * g / |g|) turn rounding noise in gradients that are zero in exact
    arithmetic (biases just before a BN) into lr-sized steps. In float64 they agree to ~1e-12.
    """
    one = _final_model(tmp_path / "one", 1, 16)
    two = _final_model(tmp_path / "two", 2, 8)
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-8, rtol=0, msg=name)
    assert not torch.equal(one["online.head.fc1.weight"], one["target.head.fc1.weight"])  # it did train

    # Control: per-process BN statistics make the 2-process run measurably different.
    local_bn = _final_model(tmp_path / "local_bn", 2, 8, "model.sync_batchnorm=false")
    assert (local_bn["online.head.fc3.weight"] - one["online.head.fc3.weight"]).abs().max() > 1e-4


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
