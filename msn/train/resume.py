"""A training run's state: what ``last.pt`` holds, and putting it back into a new process to continue."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from msn.data.loader import SkippedImages
from msn.errors import CheckpointError
from msn.models.msn import MSN
from msn.train.optim import rescale_adam_moments
from msn.utils.seeding import seed_global_stream
from msn.weights.checkpoint import load_checkpoint, set_rng_state
from msn.weights.convert import check_compatible

log = logging.getLogger(__name__)


def training_state(*, model_state: dict[str, Any], optimizer_state: dict[str, Any],
                   scaler: torch.amp.GradScaler | None,
                   cfg: DictConfig, step: int, steps_per_epoch: int, world: int, prototype_grad_scale: float,
                   skips: list[dict[str, Any]], skipped_epoch: int, rng: dict[str, Any],
                   rng_ranks: list[dict[str, Any]] | None, wandb_run_id: str | None,
                   data_identity: dict[str, Any] | None = None, shards: str | None = None) -> dict[str, Any]:
    """Everything a run needs to continue exactly after ``step``, as rank 0 saves it: the model's and the
    optimiser's state dicts, ``rng`` its own
    RNG states (:func:`msn.weights.checkpoint.rng_state`), ``rng_ranks`` every rank's (None for one process) and
    ``skips`` every rank's skip record (:meth:`SkippedImages.state_dict`); ``data_identity`` what the run trains
    on (:func:`msn.data.registry.data_identity`), which a resume checks; ``shards`` the folder of a sharded save's
    tensors (:mod:`msn.weights.sharded`; ``model_state`` and the optimiser's state are then empty here)."""
    state: dict[str, Any] = {
        "model": model_state, "optimizer": optimizer_state, "step": step,
        "epoch": step // steps_per_epoch, "rng": rng, "config": OmegaConf.to_yaml(cfg),
        "wandb_run_id": wandb_run_id, "world_size": world,
        "batch_size": cfg.data.batch_size, "global_batch_size": cfg.data.batch_size * world,
        "prototype_grad_scale": prototype_grad_scale,
        "skipped_images": {"paths": list(dict.fromkeys(p for s in skips for p in s["paths"])),
                           "epoch": skipped_epoch, "in_epoch": sum(s["in_epoch"] for s in skips)},
    }
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    if data_identity is not None:
        state["data"] = data_identity
    if shards is not None:
        state["shards"] = shards
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def _layout_change(saved_world: int, world: int, batch_size: int, *, rescaled: bool) -> str:
    """What a resume on another number of processes (same global batch) says it changed, and what it did not."""
    global_batch = batch_size * world
    line = (f"continuing a run of {saved_world} process{'es' if saved_world > 1 else ''} x "
            f"{global_batch // saved_world} images on {world} process{'es' if world > 1 else ''} x {batch_size} "
            f"images (the global batch, {global_batch}, as before): the data order, views and masks belong to the "
            "global batch and continue unchanged; the per-process random streams (stochastic depth only) start afresh")
    if rescaled:
        line += "; Adam's moments of the prototypes were rescaled to their summed gradient's new scale"
    return line


def restore_training(path: Path, *, model: MSN, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, skipped: SkippedImages, batch_size: int, seed: int,
                     rank: int, world: int, prototype_grad_scale: float,
                     data: dict[str, Any] | None = None) -> tuple[int, str | None]:
    """Load ``path`` into the model, optimiser, scaler, skip record and RNG streams; return (step, wandb run id).

    Refuses a checkpoint of another global batch (the sampler, masks and schedules would not continue) or
    of another model (naming the differing keys); adapts what may change between sessions: the number of
    processes (Adam's view of the summed prototype gradient, fresh per-rank streams) and fused AdamW.
    """
    global_batch = batch_size * world
    state = load_checkpoint(path)
    saved_batch = state.get("global_batch_size", global_batch)
    if saved_batch != global_batch:
        fix = (f"set data.batch_size={saved_batch // world}" if saved_batch % world == 0 else
               f"use a number of processes that divides {saved_batch}")
        raise CheckpointError(
            f"{path} was trained with a global batch of {saved_batch} images, this run has "
            f"{batch_size} x {world} processes = {global_batch}; {fix} so that the sampler, masks "
            "and schedules continue where they stopped")
    saved_data = state.get("data")  # checkpoints of earlier versions do not say
    # The same images may live elsewhere now (a copy on a node's local disk): a new path alone is only said;
    # another kind of source, another number of images or another epoch length is another run.
    compared = ("kind", "images", "samples_per_epoch", "list_file")
    # (checkpoints of the bundled sets recorded an empty source before sources named themselves: not a move)
    moved = bool(saved_data and saved_data.get("source")) and saved_data.get("source") != (data or {}).get("source")
    if data is not None and rank == 0 and moved:
        log.info(f"resuming a run trained on {saved_data.get('source')} with {data.get('source')} "
                 f"({data.get('images')} images, as before)")
    if data is not None and saved_data is not None and any(saved_data.get(k) != data.get(k) for k in compared):
        differs = "; ".join(f"{key}: {saved_data.get(key)!r} then, {data.get(key)!r} now"
                            for key in compared if saved_data.get(key) != data.get(key))
        raise CheckpointError(f"{path} belongs to a run on other data ({differs}): its sampler and schedules would not "
                              f"continue; to train on this data from its weights start a new run with init_from={path} "
                              "and run_name=NEW_NAME, or restore the data it was trained on")
    if data is not None and saved_data is not None and None not in (saved_data.get("fingerprint"), data.get(
            "fingerprint")) and saved_data["fingerprint"] != data["fingerprint"]:  # (older checkpoints: not recorded)
        raise CheckpointError(f"{path} belongs to a run on other shards: {data.get('source')} holds other samples, or "
                              "the same in another order, than when it was saved (the sampler would not continue the "
                              "run); resume with the shards it trained on, or start a new run with "
                              f"init_from={path} and run_name=NEW_NAME")
    check_compatible(model.state_dict(), state["model"], f"resume={path} (resume with the config that run was "
                     "trained with)")
    model.load_state_dict(state["model"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its optimiser state does not fit this model ({e})") from None
    for group in optimizer.param_groups:  # fused or not follows this run's device, not the checkpoint's
        group["fused"] = optimizer.defaults["fused"]
    saved_scale = float(state.get("prototype_grad_scale", 1.0))  # older checkpoints: DDP's average
    if saved_scale != prototype_grad_scale:  # another number of processes: keep Adam's view of the scale
        rescale_adam_moments(optimizer, model.prototypes, prototype_grad_scale / saved_scale)
    saved_world = int(state.get("world_size", world))
    if saved_world != world and rank == 0:
        log.info(_layout_change(saved_world, world, batch_size, rescaled=saved_scale != prototype_grad_scale))
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    if rank == 0:  # rank 0 carries the run's skip record; the epoch's count is a sum over ranks at logging
        skipped.load_state_dict(state.get("skipped_images", {}))
    per_rank = state.get("rng_ranks") or [state["rng"]]
    if len(per_rank) == world:  # same layout: every rank continues its own streams exactly
        set_rng_state(per_rank[rank])
    else:  # another number of processes: fresh per-rank streams (only stochastic depth uses them)
        seed_global_stream(seed, rank, step)
    if rank == 0:
        log.info(f"resumed from {path} at step {step}")
    return step, state.get("wandb_run_id")
