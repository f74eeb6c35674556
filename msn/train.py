"""MSN pretraining: ``train(cfg)`` (importable, testable); ``msn-pretrain`` (:mod:`msn.pretrain`) calls it.

One step (DESIGN.md section 3): multi-crop views -> keep-indices for the anchor view -> online ViT +
head on the anchors, EMA ViT + head on the target -> MSN loss against the prototypes -> backward ->
clip -> AdamW step with step-indexed lr / wd -> EMA update of the target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from msn import distributed
from msn.checkpoint import (
    CheckpointError,
    periodic_name,
    prune_periodic,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
)
from msn.config import (
    ConfigError,
    MSNConfig,
    complete_message,
    resume_null_message,
    to_schema,
)
from msn.convert import ConversionError
from msn.data import (
    DataError,
    EpochSampler,
    MultiCropDataset,
    MultiCropTransform,
    RunSampler,
    SkippedImages,
    augment_in_workers,
    build_dataset,
    build_loader,
    device_views,
    samples_per_replica,
    steps_per_epoch,
)
from msn.device import autocast_dtype, configure_matmul, resolve_device
from msn.loggers import MetricsLogger
from msn.loss import MSNLoss
from msn.masking import MaskGenerator
from msn.model import MSN
from msn.optim import build_optimizer
from msn.report import RunReport
from msn.resume import restore_training, training_state
from msn.rundir import last_checkpoint, resolve_resume, write_status
from msn.schedules import Schedules
from msn.seeding import rank_seed
from msn.signals import StopRequest
from msn.step import NonFiniteGuard, build_loss, build_mask_generator, build_schedules, train_step
from msn.weights import init_model_from

USER_ERRORS = (ConfigError, DataError, CheckpointError, ConversionError, FloatingPointError)


def train(cfg: DictConfig | MSNConfig, command: str | None = None) -> dict[str, float]:
    """Pretrain MSN as configured; return the last logged metrics.

    Writes ``RUN_DIR/config.yaml``, ``RUN_DIR/run.json`` (steps, batch per process and global batch),
    ``RUN_DIR/metrics.csv``, ``RUN_DIR/status.json`` and ``RUN_DIR/checkpoints/{last,step_XXXXXXX}.pt``;
    only rank 0 writes. ``command`` (the command line that started the run) is what the messages tell
    the user to run again to continue; without it they say ``resume=RUN_DIR``.
    """
    cfg = to_schema(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg))
    OmegaConf.resolve(cfg)
    run_dir = Path(cfg.run_dir)
    proc = _start_process(cfg)
    data = _build_data(cfg, proc.device, proc.world)
    parts = _build_parts(cfg, proc, data)

    resume_path = _resume_path(cfg, run_dir, proc.is_main)
    start_step, wandb_run_id = 0, None
    if resume_path is not None:
        start_step, wandb_run_id = restore_training(
            resume_path, parts.model, parts.optimizer, parts.scaler, data.skipped, batch_size=cfg.data.batch_size,
            seed=cfg.seed, rank=proc.rank, world=proc.world, prototype_grad_scale=parts.prototype_grad_scale)
    if start_step >= data.total_steps:  # a finished run: say so and leave it as it is
        if proc.is_main:
            print(complete_message(run_dir, start_step, data.total_steps), flush=True)
        return {}
    if cfg.init_from is not None and resume_path is None:  # a resumed run already holds its weights
        kind = init_model_from(parts.model, cfg.init_from)
        if proc.is_main:
            print(f"initialised the {'backbones' if kind == 'backbone' else 'model'} from {cfg.init_from}", flush=True)
    if cfg.compile:
        parts.model.compile_encoders(cfg.compile_backend, cfg.compile_mode)

    order = EpochSampler(len(data.base), num_replicas=proc.world, rank=proc.rank, shuffle=True, seed=cfg.seed,
                         drop_last=cfg.data.drop_last)
    # one loader iterator for the whole run: no drain and restart of the workers at epoch boundaries
    sampler = RunSampler(order, cfg.data.batch_size, cfg.data.drop_last, start_step)
    loader = build_loader(cfg.data, data.dataset, sampler, pin_memory=proc.device.type == "cuda")
    logger = _open_run(cfg, run_dir, proc, data, start_step, wandb_run_id) if proc.is_main else None
    nonfinite = NonFiniteGuard(proc.device)
    checkpoints = _Checkpoints(cfg, run_dir, proc, data, parts, logger, nonfinite)
    step_model: MSN | DistributedDataParallel = parts.model
    if proc.world > 1:  # the target has no trainable parameters, so DDP syncs online + prototypes only
        device_ids = [proc.device.index] if proc.device.type == "cuda" else None
        step_model = DistributedDataParallel(parts.model, device_ids=device_ids)
    report = RunReport(cfg, logger, parts.model.target.backbone, parts.schedules, data.skipped,
                       total_steps=data.total_steps, start_step=start_step, world=proc.world, device=proc.device,
                       amp_dtype=proc.amp_dtype)

    parts.model.train()
    param_dtype = parts.model.prototypes.dtype  # float32, unless a test builds the model in float64
    metrics: dict[str, float] = {}
    step, stop, stopped_early = start_step, StopRequest(), False
    try:
        for batch in loader:
            if step >= data.total_steps:
                break
            epoch = step // data.steps_per_epoch
            if batch.error is not None:  # raised in a loader worker: one line here, not the worker's traceback
                raise DataError(batch.error)
            report.skipped_images(data.skipped.add(epoch, batch.skipped))
            views = device_views(batch, data.transform, proc.device, param_dtype)
            masks = parts.make_masks(step, views[0].shape[0], views[1].shape[-1], views[-1].shape[-1],
                                     len(views) - 2, proc.rank, proc.world, proc.device)
            result = train_step(step_model, parts.loss_fn, parts.optimizer, views, masks, parts.schedules.at(step),
                                cfg.optim.clip_grad, parts.scaler, proc.amp_dtype, parts.prototype_grad_scale)
            nonfinite.update(result, step)
            step += 1
            metrics = report.after_step(result, step, epoch, nonfinite) or metrics
            if checkpoints.after_step(step, stop, data.skipped):  # preempted: saved, now exit cleanly
                stopped_early = True
                if proc.is_main:
                    write_status(run_dir, "stopped", step, data.total_steps)
                    again = command or f"resume={run_dir}"
                    report.write(f"received {stop.signal or 'a stop signal (on another rank)'}: wrote "
                                 f"checkpoints/last.pt at step {step} in {run_dir}; continue with: {again}")
                break
    finally:
        stop.restore()
        report.close()
    if stopped_early:
        stop.forward()  # hand the signal on to a job manager's handler (submitit requeues the job here)
    elif proc.is_main:
        print(_next_steps(run_dir, step), flush=True)
    return metrics


@dataclass(frozen=True)
class _Process:
    """Where this process trains: its device, autocast dtype (None: fp32), rank and the number of processes."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class _Data:
    """The run's images and views, the record of undecodable ones, and the run's length in steps."""

    base: Any  # index -> PIL image (msn.data.datasets)
    transform: MultiCropTransform
    dataset: MultiCropDataset
    skipped: SkippedImages
    steps_per_epoch: int
    total_steps: int


@dataclass
class _Parts:
    """What the step trains and how: the model, AdamW, fp16's loss scaler, the loss, masks and schedules."""

    model: MSN
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loss_fn: MSNLoss
    make_masks: MaskGenerator
    schedules: Schedules
    prototype_grad_scale: float  # the processes' prototype gradients are summed (world) or averaged (1)


def _start_process(cfg: DictConfig) -> _Process:
    """Join the process group when launched by torchrun / SLURM and pick this process's device and precision."""
    device = resolve_device(cfg.device)
    local_rank = distributed.init_from_env()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    configure_matmul(device, cfg.tf32)
    return _Process(device, amp_dtype, distributed.rank(), distributed.world_size())


def _build_data(cfg: DictConfig, device: torch.device, world: int) -> _Data:
    """The dataset and its multi-crop views; the run lasts optim.epochs epochs, or optim.max_steps steps."""
    base = build_dataset(cfg.data)
    transform = MultiCropTransform(cfg.data)
    dataset = MultiCropDataset(base, transform, seed=cfg.seed, finish=augment_in_workers(cfg.data.augment_on, device))
    skipped = SkippedImages(max(cfg.data.max_bad_files, int(cfg.data.max_bad_fraction * len(base))))
    steps_in_epoch = steps_per_epoch(len(base), cfg.data, world)
    _check_last_batch(len(base), cfg, world)
    total_steps = cfg.optim.epochs * steps_in_epoch
    if cfg.optim.max_steps is not None:
        total_steps = min(total_steps, cfg.optim.max_steps)
    return _Data(base, transform, dataset, skipped, steps_in_epoch, total_steps)


def _build_parts(cfg: DictConfig, proc: _Process, data: _Data) -> _Parts:
    """The model (the same initial weights on every rank), its optimiser, loss, masks and schedules."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = MSN(cfg.model).to(proc.device)
    torch.manual_seed(rank_seed(cfg.seed, proc.rank))  # then per-rank streams (stochastic depth)
    return _Parts(
        model=model,
        optimizer=build_optimizer(model, cfg.optim, fused=proc.device.type == "cuda"),
        scaler=torch.amp.GradScaler("cuda") if proc.amp_dtype == torch.float16 else None,
        loss_fn=build_loss(cfg.loss),
        make_masks=build_mask_generator(cfg),
        schedules=build_schedules(cfg, data.total_steps, data.steps_per_epoch),
        prototype_grad_scale=float(proc.world) if cfg.optim.prototype_grad == "sum" else 1.0,
    )


def _resume_path(cfg: DictConfig, run_dir: Path, is_main: bool) -> Path | None:
    """The checkpoint this run continues (``resume``: auto, a run directory or a file), or None for a fresh start.

    ``resume=null`` over a run directory that already holds a checkpoint is refused: nothing finished is
    overwritten by a fresh start."""
    if is_main:  # a kill -9 during an earlier save leaves its temporary file behind
        for tmp in remove_stale_temporaries(run_dir / "checkpoints"):
            print(f"removed {tmp.name}, left by an interrupted checkpoint write", flush=True)
    path = resolve_resume(cfg.resume, run_dir)
    if path is None and cfg.resume is None and last_checkpoint(run_dir).is_file():
        raise ConfigError(resume_null_message(run_dir))
    return path


def _open_run(cfg: DictConfig, run_dir: Path, proc: _Process, data: _Data, start_step: int,
              wandb_run_id: str | None) -> MetricsLogger:
    """Rank 0: write the run's config, layout and status, open its metrics log and say where it runs."""
    global_batch = cfg.data.batch_size * proc.world
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    write_status(run_dir, "running", start_step, data.total_steps)
    layout = {"total_steps": data.total_steps, "steps_per_epoch": data.steps_per_epoch, "world_size": proc.world,
              "batch_size_per_process": cfg.data.batch_size, "global_batch_size": global_batch}
    (run_dir / "run.json").write_text(json.dumps(layout, indent=2) + "\n")
    logger = MetricsLogger(run_dir, cfg, start_step, wandb_run_id)
    print(f"run directory {run_dir.resolve()}: {data.total_steps} steps ({data.steps_per_epoch} an epoch), global "
          f"batch {global_batch} = {cfg.data.batch_size} per process x {proc.world} "
          f"process{'es' if proc.world > 1 else ''} on {proc.device}", flush=True)
    if logger.wandb_run_id:
        print(f"wandb run {logger.wandb_run_id} ({cfg.logger.wandb.mode})", flush=True)
    return logger


class _Checkpoints:
    """After each step: which checkpoints are due, whether a signal or too many bad images stop the run, and
    writing them (every rank takes part: the RNG states and skip records are gathered; rank 0 writes)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, proc: _Process, data: _Data, parts: _Parts,
                 logger: MetricsLogger | None, nonfinite: NonFiniteGuard) -> None:
        self.cfg, self.run_dir, self.proc, self.data, self.parts = cfg, run_dir, proc, data, parts
        self.logger, self.nonfinite = logger, nonfinite

    def due(self, step: int) -> list[str]:
        """The checkpoints the schedule asks for after ``step`` (finished steps)."""
        every, last_every = self.cfg.checkpoint.every_steps, self.cfg.checkpoint.last_every_steps
        names = [periodic_name(step)] if every and step % every == 0 else []
        if step == self.data.total_steps or (last_every and step % last_every == 0):
            names.append("last.pt")
        return names

    def after_step(self, step: int, stop: StopRequest, skipped: SkippedImages) -> bool:
        """Write what is due after ``step``; True when the run must stop here (its ``last.pt`` written)."""
        names = self.due(step)
        # Every rank acts on a signal after the same step, even when it reached only some of them.
        stopping, saving, too_many_bad = distributed.any_rank(stop.signal is not None, stop.save_only,
                                                              skipped.over_limit)
        if too_many_bad:
            raise skipped.error()
        unfinished = step < self.data.total_steps
        if (stopping or saving) and unfinished and "last.pt" not in names:
            names.append("last.pt")  # saving alone: SIGTERM under submitit, training goes on
        stop.save_only = False
        self.save(step, names)
        return stopping and unfinished

    def save(self, step: int, names: list[str]) -> None:
        """Rank 0 writes ``names``; every rank must call this (the RNG states are gathered)."""
        if not names:
            return
        self.nonfinite.check()  # a step that made a NaN is never saved
        world, p = self.proc.world, self.parts
        rng = rng_state()
        rng_ranks = distributed.all_gather_object(rng) if world > 1 else None
        skipped = self.data.skipped
        skips = distributed.all_gather_object(skipped.state_dict()) if world > 1 else [skipped.state_dict()]
        if not self.proc.is_main:
            return
        state = training_state(p.model, p.optimizer, p.scaler, self.cfg, step, self.data.steps_per_epoch, world,
                               p.prototype_grad_scale, skips, skipped.epoch, rng, rng_ranks,
                               self.logger.wandb_run_id if self.logger else None)
        folder = self.run_dir / "checkpoints"
        for name in names:
            save_checkpoint(folder / name, state)
        if self.cfg.checkpoint.keep and periodic_name(step) in names:  # only once the new one is safely written
            prune_periodic(folder, step, self.cfg.checkpoint.keep)
        if "last.pt" in names:
            total = self.data.total_steps
            write_status(self.run_dir, "finished" if step >= total else "running", step, total)


def _next_steps(run_dir: Path, step: int) -> str:
    """What a finished run prints: where its weights are and the commands that use them."""
    return (f"run complete: {run_dir}/checkpoints/last.pt (step {step})\n"
            f"  msn-export {run_dir} {run_dir}/hf        # a Hugging Face ViTMSN folder (--format timm | msn)\n"
            f"  msn-eval lowshot {run_dir}               # low-shot accuracy (digits; --dataset PATH for yours)")


def _check_last_batch(num_images: int, cfg: DictConfig, world: int) -> None:
    """With ``drop_last=false`` an epoch may end in a batch of one image, which the head's BatchNorm cannot
    normalise (it would crash at the end of every epoch): refuse it before training."""
    if cfg.data.drop_last or not cfg.model.head_batchnorm:
        return
    last = samples_per_replica(num_images, world, False) % cfg.data.batch_size
    if last == 1 and (world == 1 or not cfg.model.sync_batchnorm):
        raise ConfigError(f"with data.drop_last=false the last batch of every epoch holds 1 image ({num_images} "
                          f"images, data.batch_size={cfg.data.batch_size}) and the head's BatchNorm needs at least 2; "
                          "set data.drop_last=true or another data.batch_size")


def main() -> None:
    """``msn-pretrain`` (:func:`msn.pretrain.main`), for ``python -m msn.train`` and ``torchrun -m msn.train``,
    and for installs made before the command moved to :mod:`msn.pretrain`: their ``msn-pretrain`` script
    calls ``msn.train:main`` until ``pip install -e .`` runs again."""
    from msn.pretrain import main as pretrain_main

    pretrain_main()


if __name__ == "__main__":
    main()
