"""One MSN training step (docs/design.md, "One step"): the step itself and the guard on its results.

:func:`train_step` receives everything that varies from step to step (views, masks, hyper-parameters);
``msn-pretrain`` (:mod:`msn.train.loop`) and ``msn-bench`` (:mod:`msn.cli.bench`) both run it. :class:`NonFiniteGuard`
watches its results without making the host wait for the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from msn.errors import NonFiniteError
from msn.models.masking import ViewMasks
from msn.models.msn import MSN
from msn.train.loss import LossOutput, MSNLoss
from msn.train.optim import set_lr_wd
from msn.train.schedules import StepHyperParams
from msn.train.sharding import is_sharded, local_shard, whole_tensor
from msn.utils import distributed
from msn.utils.device import autocast


@dataclass
class StepResult:
    """What one step reports: the loss, its terms and diagnostics, and the online encoder's gradient norm before
    clipping."""

    out: LossOutput
    encoder_grad_norm: torch.Tensor  # 0-dim, on the training device: reading it waits for the step to finish


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss or encoder gradient norm was not finite.

    Checking waits for the device, so the loop checks only where it reads metrics anyway and before
    every checkpoint: training never waits for the GPU just for this, and a non-finite step is never saved.
    """

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, result: StepResult, step: int) -> None:
        bad = ~(torch.isfinite(result.out.loss) & torch.isfinite(result.encoder_grad_norm))
        self.first = torch.where(bad & (self.first < 0), step, self.first)

    def check_weights(self, model: torch.nn.Module, step: int, last_saved: int | None) -> None:
        """Refuse to save weights holding NaN or infinity, whatever made them: an lr so large that the update
        overflows while the loss and gradient norm stay finite, bad data, too low a precision. One read back
        from the device, at checkpoints only. A sharded model (``strategy=fsdp``): each process checks its own
        shards, and all decide alike (one all-reduce)."""
        tensors = {name: local_shard(t) for name, t in model.state_dict().items() if t.is_floating_point()}
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all())
        if is_sharded(model):
            finite = not distributed.any_rank(not finite)[0]
        if finite:
            return
        bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
        which = f"{len(bad)} of {len(tensors)} tensors, e.g. {bad[0]}" if bad else "in another process's shards"
        kept = (f"checkpoints/last.pt stays at step {last_saved}" if last_saved is not None else
                "no checkpoint was written")
        raise NonFiniteError(
            f"the model's weights hold NaN or infinity by step {step} ({which}) while the loss stayed finite; nothing "
            f"was saved ({kept}); lower optim.lr or use precision=fp32")

    def check(self) -> None:
        first = int(self.first.item())
        if first >= 0:
            raise NonFiniteError(
                f"the loss or the encoder's gradient became non-finite at step {first + 1}; nothing after the last "
                "checkpoint was saved; lower optim.lr or use precision=fp32")


def train_step(
    model: MSN | DistributedDataParallel,
    loss_fn: MSNLoss,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    masks: ViewMasks,
    *,
    hp: StepHyperParams,
    clip_grad: float | None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    prototype_grad_scale: float = 1.0,
) -> StepResult:
    """One optimisation step of MSN, as the original code takes it.

    forward (online encoder on the masked anchor view and the focal views, target encoder on the target
    view) -> loss at temperature ``hp.sharpen_T`` -> backward -> clip the **online encoder's** gradients
    to norm ``clip_grad`` (the prototypes are neither clipped nor counted in the norm, as in the
    original) -> AdamW step at ``hp.lr`` / ``hp.weight_decay`` -> EMA of the target at ``hp.momentum``.

    Args:
        model: the MSN model, or it wrapped in DDP (gradients are then averaged over processes; the
            prototypes and the EMA update are reached through ``model.module``), or sharded by
            :func:`msn.train.sharding.shard_model` (the same, and each process updates its own shards).
        loss_fn: the MSN loss.
        optimizer: AdamW over :func:`msn.train.optim.param_groups`.
        views: ``[target, anchor, focal_1, ..., focal_n]``, each (B, C, S, S) on the training device.
        masks: keep-indices of the anchor (and optionally focal) views, from :class:`msn.models.masking.MaskGenerator`.
        hp: this step's lr, weight decay, EMA momentum and sharpening temperature (:meth:`Schedules.at`).
        clip_grad: max global norm of the encoder's gradients; None: no clipping.
        scaler: a GradScaler for fp16 autocast, else None.
        amp_dtype: autocast dtype (bf16 / fp16 on GPU), or None for full precision.
        prototype_grad_scale: factor on the prototypes' gradient after backward. The number of processes
            W turns DDP's average into the original's sum over processes (``optim.prototype_grad=sum``).
    """
    core = model.module if isinstance(model, DistributedDataParallel) else model
    target_view, anchor_view, focal = views[0], views[1], views[2:]
    focal_views = torch.cat(focal) if focal else None  # (n*B, C, F, F), view-major

    set_lr_wd(optimizer, hp.lr, hp.weight_decay)
    with autocast(target_view.device, amp_dtype):
        anchors, targets = model(target_view, anchor_view, focal_views, masks.anchor_keep, masks.focal_keep)
    # The loss runs in fp32 (or wider): softmax at tau=0.1, Sinkhorn and logs are precision-sensitive.
    wide = torch.promote_types(core.prototypes.dtype, torch.float32)
    out = loss_fn(anchors.to(wide), targets.to(wide), core.prototypes.to(wide), T=hp.sharpen_T)

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(out.loss).backward()
        scaler.unscale_(optimizer)
    else:
        out.loss.backward()
    if prototype_grad_scale != 1.0 and core.prototypes.grad is not None:
        core.prototypes.grad.mul_(prototype_grad_scale)
    encoder_params = [p for p in core.online.parameters() if p.requires_grad]
    max_norm = clip_grad if clip_grad is not None else math.inf
    encoder_grad_norm = whole_tensor(torch.nn.utils.clip_grad_norm_(encoder_params, max_norm))  # fsdp: of all shards
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    core.update_target(hp.momentum)
    return StepResult(out, encoder_grad_norm.detach())
