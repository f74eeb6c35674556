"""The one builder of the trainer's parts, from a validated config: the process's device and precision, the
data and its views, the model, optimiser, loss, masks and schedules.

``msn-pretrain`` (:func:`msn.train.train`), ``msn-bench step`` / ``e2e`` (:mod:`msn.benchmarks.step`) and
``msn-viz views`` (:mod:`msn.train.views`) all build what they train or show here, so a benchmark times and
a picture shows exactly what a run trains. This module is where the config is adapted to the explicit
arguments of the library's classes (the pattern of timm's ``create_optimizer_v2(model, **kwargs)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from msn.config import LossConfig
from msn.data.device_decode import DeviceDecoder, decode_on_device
from msn.data.loader import (
    EpochSampler,
    MultiCropDataset,
    SkippedImages,
    epoch_length,
    samples_per_replica,
    steps_per_epoch,
)
from msn.data.multicrop import MultiCropTransform, ViewBatch, augment_in_workers
from msn.data.registry import ImageDataset, build_dataset, data_identity
from msn.errors import ConfigError
from msn.models.masking import MaskGenerator
from msn.models.msn import MSN
from msn.train.loss import MSNLoss
from msn.train.optim import build_optimizer
from msn.train.schedules import Schedules
from msn.utils import distributed
from msn.utils.device import autocast_dtype, resolve_device
from msn.utils.seeding import seeded_global_rng


@dataclass(frozen=True)
class Process:
    """Where this process trains: its device, autocast dtype (None: fp32), rank and the number of processes."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainingData:
    """The run's images and views, the record of undecodable ones, and the run's length in steps."""

    base: ImageDataset  # index -> PIL image, from the data.name source (msn.data.sources)
    epoch_len: int  # images an epoch takes from base (data.samples_per_epoch, else all)
    transform: MultiCropTransform
    dataset: MultiCropDataset
    skipped: SkippedImages
    steps_per_epoch: int
    total_steps: int
    identity: dict[str, Any]  # what the run trains on, as a resume compares it (msn.data.registry.data_identity)
    decode: Callable[[Any], ViewBatch]  # a loader batch -> its crops; decodes on the device (data.decode_on=device)


@dataclass
class TrainingParts:
    """What the step trains and how: the model, AdamW, fp16's loss scaler, the loss, masks and schedules."""

    model: MSN
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loss_fn: MSNLoss
    make_masks: MaskGenerator
    schedules: Schedules
    prototype_grad_scale: float  # the processes' prototype gradients are summed (world) or averaged (1)


def local_process(cfg: DictConfig) -> Process:
    """One process (no process group): ``cfg.device`` and ``cfg.precision`` resolved on this machine."""
    device = resolve_device(cfg.device)
    return Process(device, autocast_dtype(cfg.precision, device))


def joined_process(cfg: DictConfig) -> Process:
    """Join the process group when launched by torchrun / SLURM (else one process) and pick this process's device
    (``cuda:LOCAL_RANK``) and precision."""
    device = resolve_device(cfg.device)
    local_rank = distributed.init_from_env()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return Process(device, autocast_dtype(cfg.precision, device), distributed.rank(), distributed.world_size())


def build_data(cfg: DictConfig, *, device: torch.device, world: int, base: ImageDataset | None = None
               ) -> TrainingData:
    """The dataset and its multi-crop views; the run lasts ``optim.epochs`` epochs, or ``optim.max_steps`` steps.
    ``base``: the source's dataset when already built (the plan measured it), else built here.

    Raises :class:`~msn.errors.DataError` when the data cannot be read or the batch does not fit it.
    """
    base = build_dataset(cfg.data) if base is None else base
    transform = MultiCropTransform(cfg.data)
    on_device = decode_on_device(cfg.data.decode_on, cfg.data.augment_on, device, base)
    in_workers = not on_device and augment_in_workers(cfg.data.augment_on, device)  # cut on the device: finished there
    dataset = MultiCropDataset(base, transform, seed=cfg.seed, finish=in_workers, decode=not on_device)
    skipped = SkippedImages(max(cfg.data.max_bad_files, int(cfg.data.max_bad_fraction * len(base))))
    epoch_len = epoch_length(len(base), cfg.data)
    steps_in_epoch = steps_per_epoch(epoch_len, cfg.data, world)
    check_last_batch(epoch_len, batch_size=cfg.data.batch_size, world=world, drop_last=cfg.data.drop_last,
                     head_batchnorm=cfg.model.head_batchnorm, sync_batchnorm=cfg.model.sync_batchnorm)
    total_steps = cfg.optim.epochs * steps_in_epoch
    if cfg.optim.max_steps is not None:
        total_steps = min(total_steps, cfg.optim.max_steps)
    return TrainingData(base, epoch_len, transform, dataset, skipped, steps_in_epoch, total_steps,
                        data_identity(cfg.data, len(base), epoch_len, getattr(base, "fingerprint", None)),
                        DeviceDecoder(dataset, device) if on_device else _as_it_is)


def _as_it_is(batch: ViewBatch) -> ViewBatch:
    """TrainingData.decode when the loader workers decode: the batch is already cut."""
    return batch


def build_order(cfg: DictConfig, data: TrainingData, *, rank: int, world: int) -> EpochSampler:
    """This process's share of every epoch's order: a pure function of (seed, epoch), as for every source."""
    return EpochSampler(len(data.base), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                        drop_last=cfg.data.drop_last, epoch_len=data.epoch_len)


def build_model(cfg: DictConfig, *, device: torch.device) -> MSN:
    """The MSN model with the same initial weights on every rank: initialised from ``cfg.seed``, without
    touching the caller's global random stream."""
    with seeded_global_rng(cfg.seed):  # timm's and torch's initialisers draw from the global generator
        model = MSN(cfg.model)
    return model.to(device)


def build_parts(cfg: DictConfig, *, process: Process, total_steps: int, steps_in_epoch: int) -> TrainingParts:
    """The model, its optimiser, loss, masks and schedules for a run of ``total_steps`` steps."""
    model = build_model(cfg, device=process.device)
    return TrainingParts(
        model=model,
        optimizer=build_optimizer(model, cfg.optim, fused=process.device.type == "cuda"),
        scaler=torch.amp.GradScaler("cuda") if process.amp_dtype == torch.float16 else None,
        loss_fn=build_loss(cfg.loss),
        make_masks=build_mask_generator(cfg),
        schedules=build_schedules(cfg, total_steps=total_steps, steps_in_epoch=steps_in_epoch),
        prototype_grad_scale=float(process.world) if cfg.optim.prototype_grad == "sum" else 1.0,
    )


def warmup_steps(warmup_epochs: float, steps_in_epoch: int) -> int:
    """The lr warm-up's steps: ``int(warmup_epochs x steps an epoch)``, truncated as the original code does (a fitted
    plan's ``optim.warmup_epochs`` is chosen so that this gives the steps it states: :func:`msn.plan.rules.warmup`)."""
    return int(warmup_epochs * steps_in_epoch)


def build_schedules(cfg: DictConfig, total_steps: int, steps_in_epoch: int) -> Schedules:
    """Schedules over the run's ``total_steps`` (epochs x steps per epoch, or the optim.max_steps cap)."""
    o, loss = cfg.optim, cfg.loss
    return Schedules(
        total_steps=total_steps,
        warmup_steps=min(warmup_steps(o.warmup_epochs, steps_in_epoch), total_steps),
        lr=o.lr, start_lr=o.start_lr, final_lr=o.final_lr,
        weight_decay=o.weight_decay, final_weight_decay=o.final_weight_decay,
        momentum=o.ema_momentum, final_momentum=o.final_ema_momentum,
        sharpen_T=loss.sharpen_T,
        final_sharpen_T=loss.sharpen_T if loss.final_sharpen_T is None else loss.final_sharpen_T,
        stretch=o.schedule_stretch,
    )


def build_loss(loss: DictConfig | LossConfig) -> MSNLoss:
    """The MSN loss with the ``loss.*`` settings (its user terms, ``loss.extra_terms``, built)."""
    return MSNLoss(loss)


def build_mask_generator(cfg: DictConfig) -> MaskGenerator:
    """The masks of the ``masking.*`` settings for the configured patch size and seed."""
    m = cfg.masking
    return MaskGenerator(m.ratio, m.per_sample, m.mask_focal, cfg.model.patch_size, cfg.seed)


def check_last_batch(num_images: int, *, batch_size: int, world: int, drop_last: bool, head_batchnorm: bool,
                     sync_batchnorm: bool) -> None:
    """With ``drop_last=false`` an epoch may end in a batch of one image, which the head's BatchNorm cannot
    normalise (it would crash at the end of every epoch): refuse it before training."""
    if drop_last or not head_batchnorm:
        return
    last = samples_per_replica(num_images, world, False) % batch_size
    if last == 1 and (world == 1 or not sync_batchnorm):
        raise ConfigError(f"with data.drop_last=false the last batch of every epoch holds 1 image ({num_images} "
                          f"images, data.batch_size={batch_size}) and the head's BatchNorm needs at least 2; "
                          "set data.drop_last=true or another data.batch_size")
