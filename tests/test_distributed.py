"""Data-parallel training with real gloo process groups on the CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msn.utils.launcher import ProcessInfo, expand_nodelist, process_info
from msn.weights.checkpoint import load_checkpoint
from tests.conftest import compose_config, metrics_rows
from tests.dist_utils import clean_env, free_port, run_distributed

# Head BN (global statistics), masking of anchor and focal views and the augmentations all on: one
# process with batch 2b and two processes with batch b must see exactly the same computation.
COMMON = ["experiment=cpu_smoke", "logger.progress=false", "model.head_batchnorm=true", "masking.ratio=0.3",
          "masking.mask_focal=true", "optim.max_steps=5", "checkpoint.every_steps=0"]


def _train_worker(rank: int, world: int, run_dir: str, overrides: list[str], dtype: str = "float32",
                  prototype_grad_factor: float = 1.0) -> int:
    import msn.train.builder
    from msn.models.msn import MSN

    def build(cfg):
        model = MSN(cfg)
        if dtype == "float64":  # build the model in float64 (the views follow it), to remove rounding noise
            model = model.double()
        if prototype_grad_factor != 1.0:  # what summing over that many processes would give (one process only)
            model.prototypes.register_hook(lambda g: g * prototype_grad_factor)
        return model

    msn.train.builder.MSN = build
    msn.train.train(compose_config([f"run_dir={run_dir}", *overrides]))
    return rank


def _final_model(run_dir: Path, world: int, batch: int, *extra: str, factor: float = 1.0) -> dict[str, torch.Tensor]:
    overrides = [*COMMON, f"data.batch_size={batch}", *extra]
    run_distributed(_train_worker, world_size=world, args=(str(run_dir), overrides, "float64", factor))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 5 and state["global_batch_size"] == 16 and state["world_size"] == world
    return state["model"]


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    """Gradient averaging, Sinkhorn, ME-MAX, head BN and masks are global: 2 x 8 images == 1 x 16 images,
    and a run may change its number of processes at a resume when the global batch stays the same.

    In float64: in float32 the two runs agree to ~3e-5 only, because summation order differs and Adam's
    first steps (update ~ lr * g / |g|) turn rounding noise in gradients that are zero in exact
    arithmetic (biases just before a BN) into lr-sized steps. In float64 they agree to ~1e-12.

    With ``optim.prototype_grad=mean`` the prototypes' gradient is averaged like every other one, so the
    run does not depend on the number of processes at all (the default ``sum`` is tested below).
    """
    mean = "optim.prototype_grad=mean"
    one = _final_model(tmp_path / "one", 1, 16, mean)
    two = _final_model(tmp_path / "two", 2, 8, mean, "checkpoint.every_steps=3")
    # The 2-process run's step-3 checkpoint, continued by one process with the same global batch.
    mid = tmp_path / "two" / "checkpoints" / "step_0000003.pt"
    switched = _final_model(tmp_path / "switched", 1, 16, mean, f"resume={mid}")
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-8, rtol=0, msg=name)
        torch.testing.assert_close(switched[name], value, atol=1e-8, rtol=0, msg=name)
    assert not torch.equal(one["online.head.fc1.weight"], one["target.head.fc1.weight"])  # it did train
    for column in ("loss", "ce", "me_max"):  # the logged loss is the global batch's, not rank 0's
        logged = [[float(r[column]) for r in metrics_rows(tmp_path / d)] for d in ("one", "two")]
        assert logged[0] == pytest.approx(logged[1], abs=1e-6), column

    # Control: per-process BN statistics make the 2-process run measurably different.
    local_bn = _final_model(tmp_path / "local_bn", 2, 8, mean, "model.sync_batchnorm=false")
    assert (local_bn["online.head.fc3.weight"] - one["online.head.fc3.weight"]).abs().max() > 1e-4


def test_prototype_gradient_is_summed_over_processes_as_the_original(tmp_path):
    """``optim.prototype_grad=sum`` (default): the original all-reduce-sums the prototypes' gradient while
    DDP averages the encoder's. 2 processes x 8 images == 1 process x 16 images whose prototype gradient
    is doubled. A resume by one process rescales Adam's moments of the prototypes to the new scale: it
    then continues as the 2-process run does, up to AdamW's eps (which a scale changes, see
    tests/test_step_fidelity.py)."""
    two = _final_model(tmp_path / "two", 2, 8, "checkpoint.every_steps=3")
    doubled = _final_model(tmp_path / "doubled", 1, 16, factor=2.0)
    for name, value in doubled.items():
        torch.testing.assert_close(two[name], value, atol=1e-8, rtol=0, msg=name)
    # (that the choice matters at all, a factor on the prototypes' gradient: tests/test_step_fidelity.py)

    mid = tmp_path / "two" / "checkpoints" / "step_0000003.pt"
    assert load_checkpoint(mid)["prototype_grad_scale"] == 2.0
    switched = _final_model(tmp_path / "switched", 1, 16, f"resume={mid}")
    for name, value in two.items():
        torch.testing.assert_close(switched[name], value, atol=1e-6, rtol=0, msg=name)


# Microseconds in the directory name: ranks that named it from their own clocks would surely differ.
RUN_DIR = "hydra.run.dir=outputs/${start_time:%H-%M-%S-%f}"
SMOKE = ["experiment=cpu_smoke", "logger.progress=false"]


def _only_run_dir(cwd: Path) -> Path:
    runs = list((cwd / "outputs").iterdir())
    assert len(runs) == 1, runs  # one directory for both ranks
    return runs[0]


def test_torchrun_and_slurm_variables_form_the_same_two_process_job(tmp_path):
    a, b = tmp_path / "torchrun", tmp_path / "slurm"
    a.mkdir(), b.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "msn.train", *SMOKE]
    result = subprocess.run([*cmd, RUN_DIR], capture_output=True, text=True, timeout=300, cwd=a, env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory") == 1  # only rank 0 reports and writes
    assert "global batch 32 = 16 per process x 2 processes" in result.stdout
    run_a = _only_run_dir(a)
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == ["last.pt", "step_0000003.pt"]
    assert [int(r["step"]) for r in metrics_rows(run_a)] == [1, 2, 3, 4]  # 64 images / (2 x 16) a step

    # SLURM's variables, set by hand as srun would for 2 tasks on one node (no torchrun).
    port, procs = str(free_port()), []
    for rank in range(2):
        env = {**clean_env(), "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # as torchrun sets it
        procs.append(subprocess.Popen([sys.executable, "-m", "msn.train", *SMOKE, RUN_DIR], cwd=b, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "x 2 processes" in outs[0][0] and "run directory" not in outs[1][0]
    run_b = _only_run_dir(b)
    state_a = load_checkpoint(run_a / "checkpoints" / "last.pt")
    state_b = load_checkpoint(run_b / "checkpoints" / "last.pt")
    assert state_b["step"] == 4 and state_b["world_size"] == 2 and len(state_b["rng_ranks"]) == 2
    for name, value in state_a["model"].items():  # same group, same computation: identical weights
        assert torch.equal(state_b["model"][name], value), name

    # (resuming such a job, restarted by torchrun or rerun: tests/test_cluster.py)


def test_expand_nodelist_reads_slurm_host_lists():
    assert expand_nodelist("gpu[001-003,7],login1") == ["gpu001", "gpu002", "gpu003", "gpu7", "login1"]
    assert expand_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert expand_nodelist("node-a") == ["node-a"]
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(" ")


def test_process_info_from_each_launcher():
    assert process_info({}) is None
    assert process_info({"RANK": "0", "WORLD_SIZE": "1"}) is None  # a single process needs no group
    torchrun = process_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
                             "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert torchrun == ProcessInfo(3, 8, 1, "h0", 1234, "torchrun")  # torchrun wins inside a SLURM job
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[017-018,020-021]"}
    info = process_info(slurm)
    assert info == ProcessInfo(5, 16, 1, "gpu017", 20000 + 123456 % 20000, "slurm")
    assert process_info({**slurm, "MASTER_PORT": "29400"}).master_port == 29400
    assert process_info({**slurm, "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"}).world_size == 4
    local = process_info({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
                          "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "777"})
    assert local == ProcessInfo(1, 2, 1, "127.0.0.1", 20777, "submitit-local")
    with pytest.raises(ValueError, match="rank 4 of 4"):
        process_info({**slurm, "SLURM_PROCID": "4", "SLURM_NTASKS": "4"})


def _read_indices(rank: int, world: int, overrides: list[str]) -> torch.Tensor:
    """The sample indices this rank's real loader reads in the first epoch (what it decodes, in order)."""
    from msn.config import to_schema
    from msn.data.loader import RunSampler, build_loader
    from msn.train.builder import build_data, build_order

    cfg = to_schema(compose_config(overrides))
    data = build_data(cfg, device=torch.device("cpu"), world=world)
    seen: list[int] = []

    class Recording:  # the source itself, noting each index it is asked for
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, index):
            seen.append(int(index))
            return self.base[index]

    data.dataset.base = Recording(data.base)
    sampler = RunSampler(build_order(cfg, data, rank=rank, world=world), cfg.data.batch_size, True)
    for _, _ in zip(range(data.steps_per_epoch), build_loader(cfg.data, data.dataset, sampler), strict=False):
        pass
    return torch.tensor(seen)


@pytest.mark.parametrize("source", ["webdataset", "hf", "custom"])
def test_two_processes_read_disjoint_shares_of_shards_and_datasets(tmp_path, source):
    """Each of 2 gloo processes reads its own half of every epoch of WebDataset shards, a Hugging Face dataset or a
    dataset class of the user's own, together all of it once; and 2 x 8 images train what 1 x 16 do, as for
    folders."""
    import datasets

    from msn.data.shard_writer import write_shards
    from tests.test_sources import _images

    images = _images(tmp_path / "images")
    if source == "webdataset":
        written = write_shards(images, tmp_path / "shards", per_shard=10)
        data = ["data=webdataset", f'data.shards="{written.pattern}"']
    elif source == "custom":  # tests/plugin/msnplugin: the user's class reading the same files
        data = ["data=custom", f"data.dataset={{_target_:msnplugin.datasets.ImageFiles,root:{images}}}"]
    else:
        files = sorted(images.rglob("*.jpg"))
        table = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in files]})
        table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
        data = ["data=hf", f"data.path={tmp_path / 'saved'}"]
    views = ["data.global_size=32", "data.focal_size=16", "data.num_focal=2", "data.num_workers=0"]
    overrides = [*COMMON, *data, *views, "data.batch_size=8", "optim.epochs=3", f"run_dir={tmp_path / 'r'}"]
    shares = run_distributed(_read_indices, world_size=2, args=(overrides,))
    assert [len(s) for s in shares] == [16, 16]
    assert set(shares[0].tolist()).isdisjoint(shares[1].tolist())
    assert sorted(shares[0].tolist() + shares[1].tolist()) == list(range(32))

    extra = [*data, *views, "optim.epochs=3", "optim.prototype_grad=mean"]
    one = _final_model(tmp_path / "one", 1, 16, *extra)
    two = _final_model(tmp_path / "two", 2, 8, *extra)
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-8, rtol=0, msg=name)


# ------------------------------------------------------------------------------------ the tests' own launcher
def _sum_of_ranks(rank: int, world: int) -> int:
    import torch.distributed as dist

    total = torch.tensor([rank])
    dist.all_reduce(total)
    return int(total)


def test_a_group_whose_children_never_join_is_killed_and_launched_again(tmp_path, monkeypatch, capfd):
    """run_distributed's guard against a hung rendezvous: both children of the first launch block before joining,
    as in CI, where rank 0 had been forked while another thread held glibc's resolver lock and waited for it
    forever, and rank 1 for rank 0's store (no timeout of torch's ends either wait). The launcher kills that group
    after ``join_within`` seconds and the second launch forms and runs. Without the guard this test would hang: an
    alarm fails it instead, and its children are killed."""
    import multiprocessing
    import signal
    import time

    import torch.distributed as dist

    real_init = dist.init_process_group

    def init_blocking_once(*args, rank: int, **kwargs):  # runs in the forked children
        first = tmp_path / f"rank{rank}-blocked"
        if not first.exists():
            first.touch()
            time.sleep(3600)
        return real_init(*args, rank=rank, **kwargs)

    def too_long(*_):
        raise TimeoutError("run_distributed waited for a group that never formed")

    monkeypatch.setattr(dist, "init_process_group", init_blocking_once)
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    try:
        assert run_distributed(_sum_of_ranks, world_size=2, join_within=3) == [1, 1]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for child in multiprocessing.active_children():
            child.kill()
    assert (tmp_path / "rank0-blocked").exists() and (tmp_path / "rank1-blocked").exists()
    assert "run_distributed: ranks [0, 1] never joined the group" in capfd.readouterr().err
