"""strategy=fsdp (issue 41): FSDP2 shards the encoders per block and trains exactly what DDP trains, with real gloo
process groups on the CPU, in float64."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from msn.weights.checkpoint import load_checkpoint, newest_checkpoint
from tests.conftest import metrics_rows
from tests.dist_utils import run_distributed
from tests.test_distributed import _train_worker

# Head BN with global statistics, masks on anchor and focal views, and a clip that acts at every step (the gradient
# norm is ~1): every part of the step that a sharded model could get wrong.
COMMON = ["experiment=cpu_smoke", "logger.progress=false", "model.head_batchnorm=true", "masking.ratio=0.3",
          "masking.mask_focal=true", "optim.max_steps=5", "optim.clip_grad=0.05", "checkpoint.every_steps=3"]


def _graphs_worker(rank: int, world: int, run_dir: str, overrides: list[str]) -> int:
    """A float64 run (tests/test_distributed.py's worker); the number of graphs torch.compile made in this process."""
    from torch._dynamo.utils import counters

    _train_worker(rank, world, run_dir, overrides, "float64")
    return counters["stats"]["unique_graphs"]


def _run(run_dir: Path, world: int, *extra: str, compiled: bool | None = None) -> dict:
    """A float64 run of COMMON on ``world`` processes; ``compiled``: whether each process must have compiled graphs."""
    overrides = [*COMMON, f"data.batch_size={16 // world}", *extra]
    graphs = run_distributed(_graphs_worker, world_size=world, args=(str(run_dir), overrides))
    assert compiled is None or [n > 0 for n in graphs] == [compiled] * world, graphs
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 5 and state["world_size"] == world and state["global_batch_size"] == 16
    return state


def _assert_same(a: dict, b: dict, atol: float, moments: bool = True) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, atol=atol, rtol=0, msg=name)
    if not moments:
        return
    moments = [(i, key) for i, s in a["optimizer"]["state"].items() for key in s]
    assert len(moments) > 100
    for i, key in moments:
        torch.testing.assert_close(b["optimizer"]["state"][i][key], a["optimizer"]["state"][i][key], atol=atol, rtol=0,
                                   msg=f"optimizer state {i} {key}")


def test_fsdp_trains_what_ddp_trains_and_its_checkpoints_resume_on_any_number_of_processes(tmp_path):
    """2 processes x 5 steps of fsdp (compiled per block) == ddp to 1e-9 in every parameter, target, prototype and
    AdamW moment; the
    sharded run's step-3 checkpoint (whole tensors) continues under fsdp on 2 processes (AdamW's moments cut into
    shards again) and on 1 process, as the uninterrupted run (to AdamW's eps there: one process rescales the
    prototypes' moments to its summed gradient's scale, as tests/test_distributed.py shows for DDP)."""
    ddp = _run(tmp_path / "ddp", 2, compiled=False)
    # compiled per block (aot_eager: torch.compile's graphs, without inductor's C++ build); the target's k-NN accuracy
    # on digits at the last step, evaluated by rank 0 on a whole copy that every process gathers
    fsdp = _run(tmp_path / "fsdp", 2, "strategy=fsdp", "compile=true", "compile_backend=aot_eager",
                "monitor.every_steps=5", compiled=True)
    _assert_same(ddp, fsdp, atol=1e-9)
    monitored = [float(r["monitor"]) for r in metrics_rows(tmp_path / "fsdp") if r["monitor"] not in ("", "nan")]
    assert not torch.equal(fsdp["model"]["online.head.fc1.weight"], fsdp["model"]["target.head.fc1.weight"])
    # each process wrote its own shards; the checkpoint files are small and name them; a reader gets whole tensors
    folder = tmp_path / "fsdp" / "checkpoints"
    assert sorted(p.name for p in (folder / "shards").iterdir()) == ["step_0000003", "step_0000005"]
    for name in ("step_0000003", "step_0000005"):
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (folder / "shards" / name).iterdir()}
    shard_bytes = sum(p.stat().st_size for p in (folder / "shards" / "step_0000005").iterdir())
    assert (folder / "last.pt").stat().st_size < shard_bytes / 10
    step3 = folder / "step_0000003.pt"
    assert load_checkpoint(step3)["model"]["online.backbone.blocks.0.attn.qkv.weight"].shape == (384, 128)  # whole

    # killed while step 5's shards were written: its folder lacks DCP's .metadata, a temporary one is left; the same
    # command (resume=auto) passes over last.pt, removes the temporary folder and continues from step 3, as the
    # uninterrupted run did
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "fsdp", killed)
    (killed / "checkpoints" / "shards" / "step_0000005" / ".metadata").unlink()
    (killed / "checkpoints" / "shards" / ".step_0000006.tmp").mkdir()
    path, step, passed_over = newest_checkpoint(killed / "checkpoints")
    assert (path.name, step) == ("step_0000003.pt", 3) and "are missing or incomplete" in passed_over[0], passed_over
    (killed / "metrics.csv").write_text("\n".join((killed / "metrics.csv").read_text().splitlines()[:4]) + "\n")
    _assert_same(fsdp, _run(killed, 2, "strategy=fsdp", "monitor.every_steps=5"), atol=1e-9)
    assert not (killed / "checkpoints" / "shards" / ".step_0000006.tmp").exists()
    _assert_same(fsdp, _run(tmp_path / "one", 1, f"resume={step3}"), atol=1e-6, moments=False)

    # the run folder is read as any other: its backbone, and its Hugging Face export
    import msn
    from msn.cli.export import main as export

    backbone, _ = msn.load_backbone(tmp_path / "fsdp")
    weight = fsdp["model"]["target.backbone.blocks.1.mlp.fc2.weight"]
    torch.testing.assert_close(backbone.blocks[1].mlp.fc2.weight, weight.to(backbone.blocks[1].mlp.fc2.weight.dtype))
    assert export([str(tmp_path / "fsdp"), str(tmp_path / "hf")]) in (0, None)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # ... and the monitor measured what msn-eval measures on the saved target
    from msn.cli.evaluate import main as evaluate

    assert evaluate(["knn", str(tmp_path / "fsdp"), "--dataset", "digits", "--output", str(tmp_path / "knn.json")]) == 0
    evaluated = json.loads((tmp_path / "knn.json").read_text())["results"]["100%"]["mean"]
    assert monitored == [pytest.approx(evaluated, abs=1e-9)] and evaluated > 10, (monitored, evaluated)


def _overflow_worker(rank: int, world: int, run_dir: str) -> str:
    """A 2-process fsdp run whose step 3 (a checkpoint's) leaves an infinite weight in rank 1's shard alone: what each
    process says."""
    import msn.train.loop
    from msn.errors import NonFiniteError
    from tests.conftest import compose_config

    real_step, calls = msn.train.loop.train_step, []

    def overflowing(model, *args, **kwargs):
        result = real_step(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3 and rank == 1:
            with torch.no_grad():
                model.online.head.fc1.weight.to_local()[0, 0] = math.inf
        return result

    msn.train.loop.train_step = overflowing
    try:
        msn.train.train(compose_config([f"run_dir={run_dir}", *COMMON, "data.batch_size=8", "strategy=fsdp"]))
    except NonFiniteError as e:
        return str(e)
    return "trained on"


def test_an_infinite_weight_in_one_process_shards_stops_every_process_and_nothing_is_saved(tmp_path):
    said = run_distributed(_overflow_worker, world_size=2, args=(str(tmp_path / "run"),))
    assert "weights hold NaN or infinity by step 3 (in another process's shards)" in said[0], said
    assert "weights hold NaN or infinity by step 3 (1 of " in said[1] and "online.head.fc1.weight" in said[1], said
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))


def _bf16_worker(rank: int, world: int) -> dict[str, list[float]]:
    """3 steps of cpu_smoke under bf16 autocast (on the CPU: what a GPU run computes, slowly), under DDP and under
    fsdp's bf16 parameters with fp32 gradient reduction; each strategy's losses on this process."""
    from torch.nn.parallel import DistributedDataParallel

    from msn.models.masking import ViewMasks
    from msn.train.builder import build_loss, build_model
    from msn.train.optim import build_optimizer
    from msn.train.schedules import StepHyperParams
    from msn.train.sharding import shard_training
    from msn.train.step import train_step
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=cpu_smoke", "model.head_batchnorm=true", "run_dir=."])
    hp = StepHyperParams(lr=1e-3, weight_decay=0.04, momentum=0.99, sharpen_T=0.25)
    losses: dict[str, list[float]] = {}
    for strategy in ("ddp", "fsdp"):
        model = build_model(cfg, device=torch.device("cpu"))
        optimizer = build_optimizer(model, cfg.optim)
        if strategy == "fsdp":
            shard_training(model, optimizer, amp_dtype=torch.bfloat16)
        step_model = model if strategy == "fsdp" else DistributedDataParallel(model)
        for step in range(3):
            g = torch.Generator().manual_seed(100 * step + rank)
            views = [torch.randn(4, 3, size, size, generator=g) for size in (16, 16, 8, 8)]
            result = train_step(step_model, build_loss(cfg.loss), optimizer, views, ViewMasks(), hp=hp, clip_grad=3.0,
                                amp_dtype=torch.bfloat16)
            losses.setdefault(strategy, []).append(float(result.out.loss.detach()))
    return losses


def test_bf16_trains_under_both_strategies_with_the_heads_global_batchnorm():
    """bf16 autocast on 2 processes with the head's global BatchNorm: its statistics are kept in fp32 (the bf16 batch
    mean made the fp32 running mean's update fail, under DDP too), and fsdp's bf16 weights with fp32 reduction train
    as DDP's autocast does, to bf16's rounding."""
    for losses in run_distributed(_bf16_worker, world_size=2):
        assert losses["fsdp"] == pytest.approx(losses["ddp"], abs=0.05), losses
        assert all(math.isfinite(v) for v in losses["ddp"])


def _bench_worker(rank: int, world: int, strategy: str) -> dict:
    from msn.benchmarks.step import bench_step
    from msn.cli.bench import compose_bench_config

    overrides = ["experiment=cpu_smoke", f"strategy={strategy}"]
    report = bench_step(compose_bench_config(overrides), overrides=overrides, steps=1, warmup=1)
    return {key: report[key] for key in ("processes", "strategy", "state_gib_per_process",
                                         "state_gib_per_process_computed")}


def test_msn_bench_step_measures_each_process_s_share_of_the_training_state():
    """What a process holds of weights, gradients and AdamW state, measured on its tensors after a step and computed
    from the parameter counts: fsdp halves DDP's on 2 processes, except the prototypes, which stay whole."""
    ddp = run_distributed(_bench_worker, world_size=2, args=("ddp",))[0]
    fsdp = run_distributed(_bench_worker, world_size=2, args=("fsdp",))[0]
    assert (ddp["processes"], ddp["strategy"], fsdp["strategy"]) == (2, "ddp", "fsdp")
    for report in (ddp, fsdp):
        assert report["state_gib_per_process"] == pytest.approx(report["state_gib_per_process_computed"], rel=0.01)
    prototypes = 16 * 32 * 64 / 2**30  # cpu_smoke's K x d, with gradient and two moments, whole on each process
    assert fsdp["state_gib_per_process"] - prototypes == pytest.approx(
        (ddp["state_gib_per_process"] - prototypes) / 2, rel=0.01)


@pytest.mark.parametrize("override, words", [
    ("precision=fp16", "strategy=fsdp runs precision=fp32 or bf16"),
])
def test_what_fsdp_does_not_run_is_refused_before_the_run(override, words):
    from msn.config import validate
    from msn.errors import ConfigError
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=words):
        validate(compose_config(["experiment=cpu_smoke", "strategy=fsdp", override]))


@pytest.mark.slow
def test_fsdp_with_activation_checkpointing_and_per_process_batchnorm_trains_what_ddp_trains(tmp_path):
    for extra in ("model.grad_checkpointing=true", "model.sync_batchnorm=false"):
        name = extra.split("=")[0]
        ddp = _run(tmp_path / f"ddp_{name}", 2, extra)
        _assert_same(ddp, _run(tmp_path / f"fsdp_{name}", 2, "strategy=fsdp", extra), atol=1e-9)


@pytest.mark.slow
def test_fsdp_compiled_by_inductor_trains_what_ddp_trains(tmp_path):
    """compile=true with torch.compile's default backend, inductor (C++ on a CPU: about a minute to build), each
    block compiled under fsdp."""
    ddp = _run(tmp_path / "ddp", 2, compiled=False)
    _assert_same(ddp, _run(tmp_path / "fsdp", 2, "strategy=fsdp", "compile=true", compiled=True), atol=1e-9)


@pytest.mark.slow
def test_a_two_process_fsdp_checkpoint_continues_on_four(tmp_path):
    """The same global batch on 4 processes (4 images each): the 2-process run's step-3 shards are read whole and
    sharded 4 ways, and it ends as the uninterrupted 2-process run (to AdamW's eps: the summed prototype gradient's
    scale changes with the number of processes, and Adam's moments are rescaled to it)."""
    two = _run(tmp_path / "two", 2, "strategy=fsdp")
    step3 = tmp_path / "two" / "checkpoints" / "step_0000003.pt"
    four = _run(tmp_path / "four", 4, "strategy=fsdp", f"resume={step3}")
    _assert_same(two, four, atol=1e-6, moments=False)
