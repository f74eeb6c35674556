"""The trainer's step on random views, and the largest batch whose step fits a GPU's memory: what
``msn-bench step`` times and ``--max-batch`` reports, and what a fitted recipe (``fit``) sizes its batch by."""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig

from msn.train.builder import Process, build_parts
from msn.train.sharding import for_processes, local_shard
from msn.train.step import train_step
from msn.utils import distributed


def random_views(cfg: DictConfig, batch: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """``[target, anchor, focal...]`` random views of the configured sizes: B x 3 x S x S each."""
    d = cfg.data
    sizes = [d.global_size] * 2 + [d.focal_size] * d.num_focal
    return [torch.randn(batch, 3, s, s, device=device, dtype=dtype) for s in sizes]


class SyntheticStep:
    """The trainer's step (:func:`msn.train.step.train_step`) with the parts the trainer builds
    (:func:`msn.train.builder.build_parts`: model, AdamW, fp16's scaler, loss, masks, schedules over a
    nominal 1000-step run), on fixed random views; ``step(i)`` runs step ``i``. Several processes (``process.world``)
    take it as the trainer does: wrapped in DDP, or sharded (``strategy=fsdp``)."""

    def __init__(self, cfg: DictConfig, batch: int, process: Process) -> None:
        self.cfg, self.process = cfg, process
        self.parts = build_parts(cfg, process=process, total_steps=1000, steps_in_epoch=100)
        self.model = self.parts.model.train()
        self.step_model = for_processes(self.model, self.parts.optimizer, strategy=cfg.strategy, world=process.world,
                                        device=process.device, amp_dtype=process.amp_dtype)
        self.views = random_views(cfg, batch, process.device, torch.float32)

    def __call__(self, i: int) -> None:
        d, p = self.cfg.data, self.parts
        masks = p.make_masks(i, len(self.views[0]), anchor_size=d.global_size, focal_size=d.focal_size,
                             num_focal=d.num_focal, device=self.process.device)
        train_step(self.step_model, p.loss_fn, p.optimizer, self.views, masks, hp=p.schedules.at(i),
                   clip_grad=self.cfg.optim.clip_grad, scaler=p.scaler, amp_dtype=self.process.amp_dtype,
                   prototype_grad_scale=p.prototype_grad_scale)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds of the training state: parameters (the target's included), their gradients and the
    optimiser's state; for a sharded model its own shards. (DDP's gradient buckets and the activations are not
    counted: this is the part a strategy divides.)"""
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
               *(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))]
    return sum(local_shard(t).nbytes for t in tensors)


def computed_state_bytes(model: torch.nn.Module, *, world: int, sharded: bool) -> int:
    """What :func:`state_bytes` should be, from the parameter counts: in fp32 4 bytes per weight, 4 per gradient and
    8 for AdamW's two moments of each trainable parameter, 4 per frozen (target) weight; divided by the processes
    when sharded, except the prototypes (K x d), which every process holds whole."""
    size = model.prototypes.element_size()  # 4: fp32 (8 in the float64 tests)
    prototypes = model.prototypes.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - prototypes
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    shared = size * (4 * trainable + frozen)
    return (shared // world if sharded else shared) + 4 * size * prototypes


def largest_batch(cfg: DictConfig, process: Process, *, start: int, cap: int | None = None,
                  fits: Callable[[DictConfig, Process, int], bool] | None = None) -> int:
    """The largest batch, doubling from ``start`` (up to ``cap``; from ``cap`` when smaller), whose training step runs
    on ``process``'s GPU without running out of memory; when ``start`` does not fit, halving from it down to 2 (a
    large model on a small GPU); 0 when not even 2 images fit. The step runs in this process alone
    (:func:`msn.utils.distributed.local_only`): the other ranks need not take part. ``fits(cfg, process, batch)``:
    the trial (one real step, :func:`_fits`; another for the tests, which have no GPU)."""
    fits = fits or _fits
    batch = max(2, start if cap is None else min(start, cap))  # the head's BatchNorm needs 2 images
    with distributed.local_only():
        if not fits(cfg, process, batch):
            while batch > 2:  # 24 -> 12 -> 6 -> 3 -> 2
                batch = max(2, batch // 2)
                if fits(cfg, process, batch):
                    return batch
            return 0
        while cap is None or batch * 2 <= cap:
            if not fits(cfg, process, batch * 2):
                break
            batch *= 2
    return batch


def _fits(cfg: DictConfig, process: Process, batch: int) -> bool:
    """Whether one training step of ``batch`` images runs on the GPU without running out of memory."""
    step = None
    try:
        step = SyntheticStep(cfg, batch, process)
        step(0)
        torch.cuda.synchronize(process.device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del step  # free the model before the next size
        torch.cuda.empty_cache()
