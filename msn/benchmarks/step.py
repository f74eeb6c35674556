"""msn-bench step: measure the training step on this machine.

    msn-bench step OVERRIDES... [--steps N] [--warmup N] [--reference] [--max-batch]

OVERRIDES are Hydra overrides as for msn-pretrain, for example
    msn-bench step experiment=msn_vits16 data.batch_size=128 precision=bf16 compile=true device=cuda
The views are random tensors of the configured sizes (1 target + 1 anchor at data.global_size,
data.num_focal focal views at data.focal_size), already on the device: the figure is the step alone
(the input pipeline: msn-bench data; both together: msn-bench e2e).

Reported: step time, images/s, peak memory (the GPU's allocator, or the process's peak RSS on a CPU; with
``model.grad_checkpointing=true`` also the peak of the same step without it, meaningful on a GPU),
FLOPs per image counted by torch's FLOP counter on one eager step, the FLOP/s of a large matmul in
the step's precision measured in the same run, and the model FLOPs utilisation (MFU) against it.
--reference also times the original MSN step (msn.benchmarks.reference: a plain re-implementation from the
paper's description) with the same shapes, precision and device, and prints the ratio.
--max-batch doubles data.batch_size until the GPU runs out of memory and reports the largest that fit.
"""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from msn.benchmarks.reference import ReferenceMSN
from msn.config import ConfigError, model_arch
from msn.train.builder import build_schedules, joined_process, local_process
from msn.train.memory import SyntheticStep, computed_state_bytes, largest_batch, random_views, state_bytes
from msn.train.sharding import is_sharded


def _cpu_name() -> str:
    """The CPU's model name and the threads torch uses, for the report."""
    name = platform.processor() or "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("model name")), "")
        name = line.partition(":")[2].strip() or name
    return f"{name} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(fn: Callable[[int], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of ``fn(i)`` over ``steps`` calls after ``warmup`` calls (device synchronised around the block)."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    tic = time.perf_counter()
    for i in range(warmup, warmup + steps):
        fn(i)
    _sync(device)
    return (time.perf_counter() - tic) / steps


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on ``device`` (the MFU denominator, measured, not quoted)."""
    n, calls = (8192, 20) if device.type == "cuda" else (1024, 8)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _seconds_per_call(lambda i: a @ b, calls, 3, device)
    return 2 * n**3 / seconds


def count_flops(step: Callable[[int], Any]) -> int:
    """FLOPs of one call of ``step`` (forward and backward), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(0)
    return counter.get_total_flops()


def bench_step(cfg: DictConfig, *, overrides: list[str], steps: int = 10, warmup: int = 3,
               reference: bool = False) -> dict[str, Any]:
    """Time the training step of ``cfg`` (composed from ``overrides``, which the report repeats); see the
    module docstring for what is reported. TF32 is the caller's choice (``msn-bench`` sets ``cfg.tf32``)."""
    process = joined_process(cfg)  # under torchrun: every process runs the step, as the trainer's do
    if reference and process.world > 1:
        raise ConfigError("--reference times one process: run msn-bench step --reference without torchrun")
    device, amp_dtype = process.device, process.amp_dtype
    batch = int(cfg.data.batch_size)

    ours = SyntheticStep(cfg, batch, process)
    flops = count_flops(ours)  # eager, before any compile
    if cfg.compile:
        ours.model.compile_encoders(cfg.compile_backend, cfg.compile_mode)
        warmup = max(warmup, 3)  # compilation happens in the first calls (one graph per view size)
    _reset_peak(device)
    seconds = _seconds_per_call(ours, steps, warmup, device)
    peak = _peak_gib(device)
    sharded = is_sharded(ours.model)
    peak_flops = matmul_flops(device, amp_dtype or torch.float32)
    report: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__, "precision": cfg.precision, "compile": bool(cfg.compile),
        "overrides": overrides, "batch": batch, "step_s": seconds, "img_s": batch / seconds, "peak_mem_gib": peak,
        "flops_per_image": flops / batch, "matmul_tflops": peak_flops / 1e12,
        "mfu": flops / seconds / peak_flops, "grad_checkpointing": bool(cfg.model.grad_checkpointing),
        "processes": process.world, "strategy": cfg.strategy if process.world > 1 else "one process",
        "state_gib_per_process": state_bytes(ours.model, ours.parts.optimizer) / 2**30,
        "state_gib_per_process_computed": computed_state_bytes(ours.model, world=process.world,
                                                               sharded=sharded) / 2**30,
    }
    del ours
    if cfg.model.grad_checkpointing:  # the same step keeping every activation, for the memory it saves
        plain = cfg.copy()
        plain.model.grad_checkpointing = False
        step = SyntheticStep(plain, batch, process)
        _reset_peak(device)
        _seconds_per_call(step, 1, 1, device)
        report["peak_mem_gib_without_checkpointing"] = _peak_gib(device)
        del step
    if reference:
        m = cfg.model
        ref = ReferenceMSN(model_arch(m), patch_size=m.patch_size, img_size=m.img_size, hidden_dim=m.head_hidden_dim,
                           out_dim=m.head_output_dim, num_prototypes=m.num_prototypes, device=device)
        views = random_views(cfg, batch, device, torch.float32)
        schedules = build_schedules(cfg, total_steps=1000, steps_in_epoch=100)

        def ref_step(i: int) -> None:
            hp = schedules.at(i)
            ref.step(views, mask_ratio=cfg.masking.ratio, lr=hp.lr, wd=hp.weight_decay, momentum=hp.momentum,
                     T=hp.sharpen_T, tau=cfg.loss.tau, clip_grad=cfg.optim.clip_grad or float("inf"),
                     amp_dtype=amp_dtype)

        _reset_peak(device)
        ref_seconds = _seconds_per_call(ref_step, steps, warmup, device)
        report.update(reference_img_s=batch / ref_seconds, reference_peak_mem_gib=_peak_gib(device),
                      reference_flops_per_image=count_flops(ref_step) / batch, ratio=ref_seconds / seconds)
    return report


def max_batch(cfg: DictConfig) -> int:
    """The largest ``data.batch_size`` (doubling from ``cfg``'s, halving when it does not fit) whose training step
    fits in GPU memory."""
    process = local_process(cfg)
    if process.device.type != "cuda":
        raise ConfigError("--max-batch needs a GPU (device=cuda or auto on a machine with one)")
    return largest_batch(cfg, process, start=int(cfg.data.batch_size))
