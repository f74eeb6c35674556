"""MSN pretraining: ``train(cfg)`` (importable, testable); ``msn-pretrain`` (:mod:`msn.pretrain`) calls it.

One step (DESIGN.md section 3): multi-crop views -> keep-indices for the anchor view -> online ViT +
head on the anchors, EMA ViT + head on the target -> MSN loss against the prototypes -> backward ->
clip -> AdamW step with step-indexed lr / wd -> EMA update of the target.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from msn import distributed
from msn.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from msn.config import (
    ConfigError,
    MSNConfig,
    complete_message,
    progress_bar_disabled,
    resume_null_message,
    to_schema,
)
from msn.convert import ConversionError, check_compatible
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
from msn.model import MSN
from msn.optim import build_optimizer, rescale_adam_moments
from msn.rundir import last_checkpoint, resolve_resume, write_status
from msn.schedules import Schedules
from msn.seeding import stream_seed
from msn.step import StepResult, build_loss, build_mask_generator, build_schedules, train_step
from msn.weights import init_model_from

USER_ERRORS = (ConfigError, DataError, CheckpointError, ConversionError, FloatingPointError)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of a rank's global torch RNG (stochastic depth): different per rank, reproducible."""
    return stream_seed(seed, "rank", rank, step)


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
    device = resolve_device(cfg.device)
    local_rank = distributed.init_from_env()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    configure_matmul(device, cfg.tf32)
    rank, world = distributed.rank(), distributed.world_size()
    is_main = rank == 0

    base = build_dataset(cfg.data)
    transform = MultiCropTransform(cfg.data)
    dataset = MultiCropDataset(base, transform, seed=cfg.seed, finish=augment_in_workers(cfg.data.augment_on, device))
    skipped = SkippedImages(max(cfg.data.max_bad_files, int(cfg.data.max_bad_fraction * len(base))))
    steps_in_epoch = steps_per_epoch(len(base), cfg.data, world)
    _check_last_batch(len(base), cfg, world)
    total_steps = cfg.optim.epochs * steps_in_epoch
    if cfg.optim.max_steps is not None:
        total_steps = min(total_steps, cfg.optim.max_steps)
    schedules = build_schedules(cfg, total_steps, steps_in_epoch)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = MSN(cfg.model).to(device)
    torch.manual_seed(rank_seed(cfg.seed, rank))  # then per-rank streams (stochastic depth)
    optimizer = build_optimizer(model, cfg.optim, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loss_fn = build_loss(cfg.loss)
    make_masks = build_mask_generator(cfg)

    start_step, wandb_run_id = 0, None
    global_batch = cfg.data.batch_size * world
    prototype_grad_scale = float(world) if cfg.optim.prototype_grad == "sum" else 1.0
    if is_main:  # a kill -9 during an earlier save leaves its temporary file behind
        for tmp in remove_stale_temporaries(run_dir / "checkpoints"):
            print(f"removed {tmp.name}, left by an interrupted checkpoint write", flush=True)
    resume_path = resolve_resume(cfg.resume, run_dir)
    if resume_path is None and cfg.resume is None and last_checkpoint(run_dir).is_file():
        raise ConfigError(resume_null_message(run_dir))
    if resume_path is not None:
        start_step, wandb_run_id = _resume(resume_path, cfg, model, optimizer, scaler, skipped,
                                           prototype_grad_scale)
    if start_step >= total_steps:  # a finished run: say so and leave it as it is
        if is_main:
            print(complete_message(run_dir, start_step, total_steps), flush=True)
        return {}
    if cfg.init_from is not None and resume_path is None:  # a resumed run already holds its weights
        kind = init_model_from(model, cfg.init_from)
        if is_main:
            print(f"initialised the {'backbones' if kind == 'backbone' else 'model'} from {cfg.init_from}", flush=True)
    if cfg.compile:
        model.compile_encoders(cfg.compile_backend, cfg.compile_mode)

    order = EpochSampler(len(base), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                         drop_last=cfg.data.drop_last)
    # one loader iterator for the whole run: no drain and restart of the workers at epoch boundaries
    sampler = RunSampler(order, cfg.data.batch_size, cfg.data.drop_last, start_step)
    loader = build_loader(cfg.data, dataset, sampler, pin_memory=device.type == "cuda")

    logger = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        write_status(run_dir, "running", start_step, total_steps)
        layout = {"total_steps": total_steps, "steps_per_epoch": steps_in_epoch, "world_size": world,
                  "batch_size_per_process": cfg.data.batch_size, "global_batch_size": global_batch}
        (run_dir / "run.json").write_text(json.dumps(layout, indent=2) + "\n")
        logger = MetricsLogger(run_dir, cfg, start_step, wandb_run_id)
        print(f"run directory {run_dir.resolve()}: {total_steps} steps ({steps_in_epoch} an epoch), global batch "
              f"{global_batch} = {cfg.data.batch_size} per process x {world} process{'es' if world > 1 else ''} "
              f"on {device}", flush=True)
        if logger.wandb_run_id:
            print(f"wandb run {logger.wandb_run_id} ({cfg.logger.wandb.mode})", flush=True)

    nonfinite = _NonFiniteGuard(device)

    def checkpoint(step: int, names: list[str]) -> None:
        """Rank 0 writes ``names``; every rank must call this (the RNG states are gathered)."""
        if not names:
            return
        nonfinite.check()  # a step that made a NaN is never saved
        rng = rng_state()
        rng_ranks = distributed.all_gather_object(rng) if world > 1 else None
        skips = distributed.all_gather_object(skipped.state_dict()) if world > 1 else [skipped.state_dict()]
        if not is_main:
            return
        state: dict[str, Any] = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "epoch": step // steps_in_epoch, "rng": rng, "config": OmegaConf.to_yaml(cfg),
            "wandb_run_id": logger.wandb_run_id if logger else None, "world_size": world,
            "batch_size": cfg.data.batch_size, "global_batch_size": global_batch,
            "prototype_grad_scale": prototype_grad_scale,
            "skipped_images": {"paths": list(dict.fromkeys(p for s in skips for p in s["paths"])),
                               "epoch": skipped.epoch, "in_epoch": sum(s["in_epoch"] for s in skips)},
        }
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        for name in names:
            save_checkpoint(run_dir / "checkpoints" / name, state)
        if "last.pt" in names:
            write_status(run_dir, "finished" if step >= total_steps else "running", step, total_steps)

    step_model: MSN | DistributedDataParallel = model
    if world > 1:  # the target has no trainable parameters, so DDP syncs online + prototypes only
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    monitor = None
    if is_main and cfg.monitor.every_steps:
        from msn.monitor import Monitor  # deferred: evaluation pulls in scikit-learn

        monitor = Monitor(cfg.monitor.protocol, cfg.monitor.dataset, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                          amp_dtype, cfg.monitor.crop_pct)

    prototype_use = None  # targets' argmax counts since the last monitor step, for wandb's prototype histogram
    if logger is not None and logger.wandb_run is not None:
        _log_views_picture(logger, cfg, start_step, world)
        prototype_use = torch.zeros(cfg.model.num_prototypes, dtype=torch.long, device=device)

    model.train()
    param_dtype = model.prototypes.dtype  # float32, unless a test builds the model in float64
    images_per_step = global_batch
    bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="msn", file=sys.stderr,
               disable=progress_bar_disabled(cfg.logger.progress) if is_main else True)
    metrics: dict[str, float] = {}
    step = start_step
    stop, stopped_early = _StopRequest(), False
    tic, last_logged = time.perf_counter(), start_step
    try:
        for batch in loader:
            if step >= total_steps:
                break
            epoch = step // steps_in_epoch
            if batch.error is not None:  # raised in a loader worker: one line here, not the worker's traceback
                raise DataError(batch.error)
            for path in skipped.add(epoch, batch.skipped):
                bar.write(f"skipped undecodable image {path} (replaced by another image; {len(skipped.paths)} so "
                          f"far, the run stops above {skipped.limit})", file=sys.stderr)
            views = device_views(batch, transform, device, param_dtype)
            masks = make_masks(step, views[0].shape[0], views[1].shape[-1], views[-1].shape[-1], len(views) - 2,
                               rank, world, device)
            result = train_step(step_model, loss_fn, optimizer, views, masks, schedules.at(step),
                                cfg.optim.clip_grad, scaler, amp_dtype, prototype_grad_scale)
            nonfinite.update(result, step)
            if prototype_use is not None:  # on the device: no wait
                prototype_use += torch.bincount(result.out.targets.argmax(dim=1), minlength=len(prototype_use))
            step += 1
            bar.update(1)
            monitor_every = cfg.monitor.every_steps  # decided alike on every rank: logging all-reduces
            monitor_due = bool(monitor_every) and (step % monitor_every == 0 or step == total_steps)
            if step % cfg.logger.log_every == 0 or step == total_steps or monitor_due:
                nonfinite.check()  # reading the metrics waits for the device anyway
                metrics = _metrics(result, schedules, step, epoch, skipped.count(epoch))
                images_per_s = images_per_step * (step - last_logged) / max(time.perf_counter() - tic, 1e-9)
                metrics["images_per_s"] = images_per_s
                if monitor is not None and monitor_due:
                    metrics["monitor"] = monitor(model.target.backbone)
                if prototype_use is not None and (monitor_due or (not monitor_every and step == total_steps)):
                    logger.log_prototype_use(prototype_use.tolist(), step)
                    prototype_use.zero_()
                if logger is not None:
                    logger.log(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    img_s=f"{images_per_s:.0f}", protos=int(metrics["distinct_prototypes"]))
                    every = cfg.logger.console_every
                    if every and (step // every > last_logged // every or step == total_steps):
                        bar.write(_console_line(metrics, total_steps), file=sys.stdout)
                tic, last_logged = time.perf_counter(), step
            names = []
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                names.append(f"step_{step:07d}.pt")
            if step == total_steps or (cfg.checkpoint.last_every_steps and step % cfg.checkpoint.last_every_steps == 0):
                names.append("last.pt")
            # Every rank acts on a signal after the same step, even when it reached only some of them.
            stopping, saving, too_many_bad = distributed.any_rank(stop.signal is not None, stop.save_only,
                                                                  skipped.over_limit)
            if too_many_bad:
                raise skipped.error()
            if (stopping or saving) and step < total_steps and "last.pt" not in names:
                names.append("last.pt")  # saving alone: SIGTERM under submitit, training goes on
            stop.save_only = False
            checkpoint(step, names)
            if stopping and step < total_steps:  # preempted: saved above, now exit cleanly
                stopped_early = True
                if is_main:
                    write_status(run_dir, "stopped", step, total_steps)
                    again = command or f"resume={run_dir}"
                    bar.write(f"received {stop.signal or 'a stop signal (on another rank)'}: wrote "
                              f"checkpoints/last.pt at step {step} in {run_dir}; continue with: {again}",
                              file=sys.stdout)
                break
    finally:
        stop.restore()
        bar.close()
        if logger is not None:
            logger.close()
    if stopped_early:
        stop.forward()  # hand the signal on to a job manager's handler (submitit requeues the job here)
    elif is_main:
        print(_next_steps(run_dir, step), flush=True)
    return metrics


def _log_views_picture(logger: MetricsLogger, cfg: DictConfig, step: int, world: int) -> None:
    """The first views the run trains on (msn-viz views), to wandb once at the start."""
    from msn.plots.views import default_cell, trainer_views, views_picture

    views = trainer_views(cfg, step, min(4, cfg.data.batch_size), world)
    picture = views_picture(views, list(cfg.data.mean), list(cfg.data.std), default_cell(cfg.data.global_size))
    caption = f"target | anchor (dropped patches grey) | focal views, step {step}"
    logger.log_picture("views", picture, step, caption=caption)


def _next_steps(run_dir: Path, step: int) -> str:
    """What a finished run prints: where its weights are and the commands that use them."""
    return (f"run complete: {run_dir}/checkpoints/last.pt (step {step})\n"
            f"  msn-export {run_dir} {run_dir}/hf        # a Hugging Face ViTMSN folder (--format timm | msn)\n"
            f"  msn-eval lowshot {run_dir}               # low-shot accuracy (digits; --dataset PATH for yours)")


def _resume(path: Path, cfg: DictConfig, model: MSN, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, skipped: SkippedImages,
            prototype_grad_scale: float) -> tuple[int, str | None]:
    """Load ``path`` into the model, optimiser, scaler, skip record and RNG streams; return (step, wandb run id).

    Refuses a checkpoint of another global batch (the sampler, masks and schedules would not continue) or
    of another model (naming the differing keys); adapts what may change between sessions: the number of
    processes (Adam's view of the summed prototype gradient, fresh per-rank streams) and fused AdamW.
    """
    rank, world = distributed.rank(), distributed.world_size()
    global_batch = cfg.data.batch_size * world
    state = load_checkpoint(path)
    saved_batch = state.get("global_batch_size", global_batch)
    if saved_batch != global_batch:
        fix = (f"set data.batch_size={saved_batch // world}" if saved_batch % world == 0 else
               f"use a number of processes that divides {saved_batch}")
        raise CheckpointError(
            f"{path} was trained with a global batch of {saved_batch} images, this run has "
            f"{cfg.data.batch_size} x {world} processes = {global_batch}; {fix} so that the sampler, masks "
            "and schedules continue where they stopped")
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
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    if rank == 0:  # rank 0 carries the run's skip record; the epoch's count is a sum over ranks at logging
        skipped.load_state_dict(state.get("skipped_images", {}))
    per_rank = state.get("rng_ranks") or [state["rng"]]
    if len(per_rank) == world:  # same layout: every rank continues its own streams exactly
        set_rng_state(per_rank[rank])
    else:  # another number of processes: fresh per-rank streams (only stochastic depth uses them)
        torch.manual_seed(rank_seed(cfg.seed, rank, step))
    if rank == 0:
        print(f"resumed from {path} at step {step}", flush=True)
    return step, state.get("wandb_run_id")


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


class _StopRequest:
    """Turns preemption and time-limit signals into flags the loop checks after each step.

    SIGTERM, SIGUSR1 and SIGUSR2 (submitit's preemption / time-limit signal) stop the run after the
    current step with a checkpoint. Under submitit, which ignores SIGTERM and acts on SIGUSR2, a
    SIGTERM only saves ``last.pt`` and training goes on, so submitit's own flow stays intact. A
    Python handler that was installed before ours (submitit's) is called once the checkpoint is
    written (:meth:`forward`): that is how a submitit job requeues itself and then resumes.

    SIGINT (Ctrl-C) is the same for the first press: finish the step, write ``last.pt``, exit 0. A
    second press stops at once (KeyboardInterrupt), keeping only what was already saved.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

    def __init__(self) -> None:
        self.signal: str | None = None
        self.save_only = False
        self._received: int | None = None
        self._previous: dict[int, Any] = {}
        self._submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in self.SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        if self._submitit and number == signal.SIGTERM:
            self.save_only = True
            return
        if number == signal.SIGINT and self.signal is not None:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if number == signal.SIGINT:
            print("\nCtrl-C: stopping after this step with a checkpoint (press again to stop at once)",
                  file=sys.stderr, flush=True)
        self.signal, self._received = signal.Signals(number).name, number

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def forward(self) -> None:
        """Call the handler that was in place before ours for the signal received, if it is Python code."""
        handler = self._previous.get(self._received) if self._received is not None else None
        if callable(handler) and self._received != signal.SIGINT:  # Python's own SIGINT handler would raise
            handler(self._received, None)


class _NonFiniteGuard:
    """Remembers, on the device, the first step whose loss or encoder gradient norm was not finite.

    Checking waits for the device, so the loop checks only where it reads metrics anyway and before
    every checkpoint: training never waits for the GPU just for this, and a non-finite step is never saved.
    """

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, result: StepResult, step: int) -> None:
        bad = ~(torch.isfinite(result.out.loss) & torch.isfinite(result.encoder_grad_norm))
        self.first = torch.where(bad & (self.first < 0), step, self.first)

    def check(self) -> None:
        first = int(self.first.item())
        if first >= 0:
            raise FloatingPointError(
                f"the loss or the encoder's gradient became non-finite at step {first + 1}; nothing after the last "
                "checkpoint was saved; lower optim.lr or use precision=fp32")


def _metrics(result: StepResult, schedules: Schedules, step: int, epoch: int,
             skipped_in_epoch: int) -> dict[str, float]:
    """One metrics row (``msn.loggers.COLUMNS``) for the step just taken (``step`` counts finished steps).

    Loss parts are means over the global batch and the epoch's skipped images a sum over processes (one
    all-reduce; call on every rank); the prototype counts and the max target probability describe this
    rank's batch; the encoder's gradient norm (before clipping) is the same on every rank.
    """
    o, i = result.out, step - 1  # i: schedule index of that step
    parts = torch.stack([o.loss, o.ce, o.me_max, o.entropy]).detach().float()
    totals = distributed.all_reduce_sum_(torch.cat([parts, parts.new_tensor([float(skipped_in_epoch)])]))
    loss, ce, me_max, entropy = (totals[:4] / distributed.world_size()).tolist()
    return {
        "step": step, "epoch": epoch, "loss": loss, "ce": ce, "me_max": me_max, "entropy": entropy,
        "skipped_images": int(totals[4].item()),
        "lr": schedules.lr_at(i), "wd": schedules.wd_at(i),
        "momentum": schedules.momentum_at(i), "sharpen_T": schedules.sharpen_T_at(i),
        "distinct_prototypes": o.distinct_prototypes.item(), "max_target_prob": o.max_target_prob.item(),
        "encoder_grad_norm": result.encoder_grad_norm.item(),
    }


def _console_line(m: dict[str, float], total: int) -> str:
    return (f"step {int(m['step'])}/{total} epoch {int(m['epoch'])} loss {m['loss']:.4f} (ce {m['ce']:.4f} "
            f"me-max {m['me_max']:.4f}) lr {m['lr']:.2e} protos {int(m['distinct_prototypes'])} "
            f"{m['images_per_s']:.0f} img/s" + (f" monitor {m['monitor']:.1f} %" if "monitor" in m else "")
            + (f" skipped {int(m['skipped_images'])} images this epoch" if m.get("skipped_images") else ""))


def main() -> None:
    """``msn-pretrain`` (:func:`msn.pretrain.main`), for ``python -m msn.train`` and ``torchrun -m msn.train``,
    and for installs made before the command moved to :mod:`msn.pretrain`: their ``msn-pretrain`` script
    calls ``msn.train:main`` until ``pip install -e .`` runs again."""
    from msn.pretrain import main as pretrain_main

    pretrain_main()


if __name__ == "__main__":
    main()
