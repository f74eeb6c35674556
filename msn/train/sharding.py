"""``strategy=fsdp``: the online encoder and its EMA target sharded per transformer block with FSDP2.

Under data parallelism (``strategy=ddp``) every process holds the whole online encoder, its AdamW moments and the
target. FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps 1/W of each parameter, gradient and AdamW moment per
process (W processes) and gathers a block's parameters only while that block runs: the layout DINOv2/v3 train with.

The layout, and why:

* ``fully_shard`` on every transformer block, then on the backbone (patch embedding, tokens, final norm) and on the
  head, for the online encoder and the target alike. :class:`msn.models.msn.MSN` calls the backbone and the head
  itself (once per view size), so they are the units that gather, not the encoder around them.
* Both sides get the same layout, so ``target = m * target + (1 - m) * online`` (:meth:`MSN.update_target`) runs on
  each process's own shards: the EMA needs no communication.
* The target has no backward, which is where FSDP frees a gathered root; it is freed right after its forward.
* The prototypes (K x d, small) stay whole on every process, as under DDP: their gradient is averaged over the
  processes when backward has accumulated it, so ``optim.prototype_grad`` (sum / mean) means what it means under
  DDP.
* ``precision=bf16``: FSDP's ``MixedPrecisionPolicy`` computes with bf16 parameters and reduces gradients in fp32;
  the sharded parameters and AdamW stay fp32.

Each process saves its own shards (:mod:`msn.weights.sharded`); a reader gets whole tensors, so a run saved by 2
processes resumes on 1 or 4, under either strategy, and ``msn-export`` / ``msn-eval`` read it as any other run.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from msn.errors import ConfigError
from msn.models.msn import MSN

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5: no DTensor, and so nothing sharded (fsdp_modules says why)
    DTensor = None


def fsdp_modules() -> Any:
    """``torch.distributed.fsdp`` with FSDP2's ``fully_shard`` (public from torch 2.6), else a ConfigError."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: F401
    except ImportError:
        raise ConfigError(f"strategy=fsdp needs torch>=2.6 (FSDP2's fully_shard); this is torch {torch.__version__}: "
                          "upgrade torch or use strategy=ddp") from None
    import torch.distributed.fsdp as fsdp

    return fsdp


def shard_model(model: MSN, *, amp_dtype: torch.dtype | None) -> None:
    """Shard ``model``'s online encoder and target in place (see the module's docstring); needs a process group.

    ``amp_dtype``: bf16 computes with bf16 parameters and reduces gradients in fp32; None computes in the
    parameters' own dtype (fp32, or float64 in the equality tests)."""
    fsdp = fsdp_modules()
    policy = (fsdp.MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype is not None
              else fsdp.MixedPrecisionPolicy())
    for encoder in (model.online, model.target):
        for block in encoder.backbone.blocks:
            fsdp.fully_shard(block, mp_policy=policy)
        for part in (encoder.backbone, encoder.head):
            fsdp.fully_shard(part, mp_policy=policy)
    for part in (model.target.backbone, model.target.head):  # no backward to free the gathered root
        part.register_forward_hook(_reshard_after_forward)
    world = dist.get_world_size()

    def average_over_processes(prototypes: torch.Tensor) -> None:  # as DDP's all-reduce of the gradient
        dist.all_reduce(prototypes.grad)
        prototypes.grad.div_(world)

    model.prototypes.register_post_accumulate_grad_hook(average_over_processes)
    # The backbone returns the CLS token, a view of its tokens; FSDP warns that an in-place op on such a view would
    # skip its backward hook. The head only reads it (Linear, then BatchNorm on a new tensor), so this is safe.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")


def _reshard_after_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
    module.reshard()


def share_rank0_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (the head's BatchNorm running statistics) on every process, as DDP keeps them (it broadcasts
    them before each forward): with ``model.sync_batchnorm=false`` each process's differ, and a save must hold one
    copy, rank 0's. A collective. (Training never reads them: BatchNorm normalises a batch by its own statistics.)"""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP-sharded parameters (DTensors)."""
    return any(_is_dtensor(p) for p in model.parameters())


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: its local shard for a DTensor, else ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def whole_tensor(t: Any) -> Any:
    """A DTensor gathered into the whole tensor (a collective: every process calls it in the same order)."""
    return t.full_tensor() if _is_dtensor(t) else t


def for_processes(model: MSN, optimizer: torch.optim.Optimizer, *, strategy: str, world: int, device: torch.device,
                  amp_dtype: torch.dtype | None) -> MSN | DistributedDataParallel:
    """What the step trains on ``world`` processes: ``model`` itself on one; wrapped in DDP (``strategy=ddp``; the
    target has no trainable parameters, so DDP syncs the online encoder and the prototypes only); or sharded in place,
    ``optimizer`` following it (``strategy=fsdp``, :func:`shard_training`). Call it once the weights are loaded."""
    if world == 1:
        return model
    if strategy == "fsdp":
        shard_training(model, optimizer, amp_dtype=amp_dtype)
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_training(model: MSN, optimizer: torch.optim.Optimizer, *, amp_dtype: torch.dtype | None) -> None:
    """Shard ``model`` (:func:`shard_model`) and point ``optimizer`` at the sharded parameters, its state (a resumed
    run's AdamW moments: whole tensors) cut into this process's shards.

    Sharding comes after the weights are loaded (resume, ``init_from``), so that every loader keeps reading whole
    tensors; ``fully_shard`` replaces each parameter with a sharded one, which the optimiser's groups then hold."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    state = optimizer.state_dict()  # keyed by position in the groups: the same positions after the swap
    shard_model(model, amp_dtype=amp_dtype)
    params = dict(model.named_parameters())
    for group, group_names in zip(optimizer.param_groups, groups, strict=True):
        group["params"] = [params[name] for name in group_names]
    by_position = [params[name] for group_names in groups for name in group_names]
    state["state"] = {i: {k: _like(v, by_position[i]) for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.state.clear()
    optimizer.load_state_dict(state)


def _like(value: Any, param: torch.Tensor) -> Any:
    """An optimiser state tensor of ``param``'s shape, sharded as ``param`` is (AdamW's ``step`` stays as it is)."""
    if not _is_dtensor(param) or not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def gather_into(sharded: torch.nn.Module, whole: torch.nn.Module | None) -> None:
    """Copy ``sharded``'s weights and buffers, gathered tensor by tensor, into ``whole`` (the same module unsharded,
    on the process that evaluates it); a process with ``whole=None`` takes part in the gathers only. A collective:
    every process calls it."""
    state = {name: whole_tensor(t).detach() for name, t in sharded.state_dict().items()}
    if whole is not None:
        whole.load_state_dict(state)
