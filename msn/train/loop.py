"""MSN pretraining: :func:`train` (importable, testable); ``msn-pretrain`` (:mod:`msn.cli.pretrain`) calls it.

One step (docs/design.md, "One step"): multi-crop views -> keep-indices for the anchor view -> online ViT +
head on the anchors, EMA ViT + head on the target -> MSN loss against the prototypes -> backward ->
clip -> AdamW step with step-indexed lr / wd -> EMA update of the target.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from msn.config import MSNConfig, budget_seconds, to_schema
from msn.data.loader import RunSampler, build_loader, loader_workers
from msn.data.multicrop import device_views
from msn.data.registry import build_dataset
from msn.errors import ConfigError, DataError, JobError, RunCollapsed
from msn.train.builder import (
    Process,
    TrainingData,
    TrainingParts,
    build_data,
    build_order,
    build_parts,
    build_schedules,
    joined_process,
    warmup_steps,
)
from msn.train.checkpoints import CheckpointPolicy
from msn.train.failures import collective_failure, lost_peer_message, stop_workers, watchdog_for
from msn.train.fitting import BudgetClock, budget_decided, changed_budget_note, fit_run, record_length
from msn.train.loggers import MetricsLogger
from msn.train.report import RunReport
from msn.train.resume import restore_training
from msn.train.sharding import for_processes
from msn.train.signals import StopRequest
from msn.train.step import NonFiniteGuard, train_step
from msn.utils.compose import compose_config
from msn.utils.rundir import (
    complete_message,
    has_checkpoints,
    metrics_columns,
    read_status,
    resolve_resume,
    resume_null_message,
    write_status,
)
from msn.utils.runlock import acquire_run_lock, holds_run_lock
from msn.utils.seeding import seed_global_stream
from msn.weights.checkpoint import newest_checkpoint, remove_stale_temporaries
from msn.weights.read import init_model_from

log = logging.getLogger(__name__)


def train(cfg: DictConfig | MSNConfig | list[str] | tuple[str, ...], command: str | None = None, *,
          stop: StopRequest | None = None) -> dict[str, float]:
    """Pretrain MSN as configured; return the last logged metrics.

    ``cfg``: a composed config (:class:`~msn.config.MSNConfig`, or the DictConfig Hydra composes), or
    msn-pretrain's overrides (``["experiment=cpu_smoke", "optim.lr=5e-4"]``), composed as the command would
    (:func:`msn.utils.compose.compose_config`): the run writes where ``msn-pretrain OVERRIDES`` would, and either
    continues the other's run.

    Writes ``RUN_DIR/config.yaml``, ``RUN_DIR/run.json`` (steps, batch per process and global batch),
    ``RUN_DIR/metrics.csv``, ``RUN_DIR/status.json`` and ``RUN_DIR/checkpoints/{last,step_XXXXXXX}.pt``;
    only rank 0 writes, holding the run directory's lock (:mod:`msn.utils.runlock`) for the run's life.
    ``command`` (the command line that started the run) is what the messages tell the user to run again to
    continue; without it they say ``resume=RUN_DIR``. ``stop``: the stop signals' flags, from the command line
    that installed their handlers (:class:`StopRequest`); a library call leaves its host's signals alone.
    """
    if isinstance(cfg, list | tuple):
        cfg = compose_config(list(cfg))
    cfg = to_schema(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg))
    OmegaConf.resolve(cfg)
    run_dir = Path(cfg.run_dir)
    proc = joined_process(cfg)
    if cfg.plan:
        show_plan(cfg, proc, run_dir)
        return {}
    lock = acquire_run_lock(run_dir) if proc.is_main and not holds_run_lock(run_dir) else None
    try:
        return _train(cfg, command, proc, run_dir, stop or StopRequest(install=False))
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, command: str | None, proc: Process, run_dir: Path, stop: StopRequest
           ) -> dict[str, float]:
    """The run itself: fit the recipe, set up the data, parts and the resume, open the run, step until done or
    stopped."""
    started = time.perf_counter()  # a time budget (optim.budget) counts from here
    resume_path = _resume_path(cfg, run_dir, proc.is_main)
    images = build_dataset(cfg.data)
    plan = fit_run(cfg, process=proc, images=images, resume_path=resume_path)  # fit / optim.scale_lr: in place
    data = build_data(cfg, device=proc.device, world=proc.world, base=images)
    for note in getattr(data.base, "notes", ()) if proc.is_main else ():  # what the data scan skipped, and why
        log.info(note)
    if plan is not None and proc.is_main:
        log.info("\n".join(plan.lines()))
    parts = build_parts(cfg, process=proc, total_steps=data.total_steps, steps_in_epoch=data.steps_per_epoch)
    seed_global_stream(cfg.seed, proc.rank)  # per-rank stochastic depth; a resume restores the saved state

    start_step, wandb_run_id = 0, None
    if resume_path is not None:
        start_step, wandb_run_id = restore_training(
            resume_path, model=parts.model, optimizer=parts.optimizer, scaler=parts.scaler, skipped=data.skipped,
            batch_size=cfg.data.batch_size, seed=cfg.seed, rank=proc.rank, world=proc.world,
            prototype_grad_scale=parts.prototype_grad_scale,
            data=data.identity)
    if resume_path is not None and cfg.collapse.stop:
        _refuse_collapsed(run_dir)
    budget = None
    if proc.is_main and (note := changed_budget_note(cfg)) is not None:
        log.warning(note)
    if cfg.optim.budget is not None and not budget_decided(cfg):  # the length is fixed once the steps are timed
        budget = BudgetClock(cfg.optim.budget, budget_seconds(cfg.optim.budget), start_step, started,
                             workers=loader_workers(cfg.data.num_workers))
        data.total_steps = max(data.total_steps, budget.decides_at + 1)  # the length is open until decided
    if start_step >= data.total_steps:  # a finished run: say so and leave it as it is
        if proc.is_main:
            log.info(complete_message(run_dir, start_step, data.total_steps, resume_path))
        return {}
    if cfg.init_from is not None and resume_path is None:  # a resumed run already holds its weights
        kind = init_model_from(parts.model, cfg.init_from)
        if proc.is_main:
            log.info(f"initialised the {'backbones' if kind == 'backbone' else 'model'} from {cfg.init_from}")
    sharded = proc.world > 1 and cfg.strategy == "fsdp"
    if cfg.compile:
        parts.model.compile_encoders(cfg.compile_backend, cfg.compile_mode, per_block=sharded)

    order = build_order(cfg, data, rank=proc.rank, world=proc.world)
    # one loader iterator for the whole run: no drain and restart of the workers at epoch boundaries
    sampler = RunSampler(order, cfg.data.batch_size, cfg.data.drop_last, start_step)
    loader = build_loader(cfg.data, data.dataset, sampler, pin_memory=proc.device.type == "cuda")
    columns = metrics_columns(parts.loss_fn.term_names, parts.loss_fn.diagnostic_names)
    logger = (_open_run(cfg, run_dir, proc, data, columns=columns, start_step=start_step, wandb_run_id=wandb_run_id,
                        timed_from=budget.timed_start if budget is not None else None)
              if proc.is_main else None)
    short_warmup = _warmup_note(cfg, data) if budget is None else None
    if short_warmup and proc.is_main:
        log.warning(f"warning: {short_warmup}")
    nonfinite = NonFiniteGuard(proc.device)
    checkpoints = CheckpointPolicy(cfg, run_dir=run_dir, process=proc, data=data, parts=parts, logger=logger,
                                   nonfinite=nonfinite)
    step_model = for_processes(parts.model, parts.optimizer, strategy=cfg.strategy, world=proc.world,
                               device=proc.device, amp_dtype=proc.amp_dtype)
    report = RunReport(cfg, logger=logger, target=parts.model.target, schedules=parts.schedules,
                       skipped=data.skipped, total_steps=data.total_steps, start_step=start_step, world=proc.world,
                       device=proc.device, amp_dtype=proc.amp_dtype, images=data.base,
                       warmup_steps=warmup_steps(cfg.optim.warmup_epochs, data.steps_per_epoch))
    watchdog = watchdog_for(cfg, proc, run_dir, checkpoints, stop, start_step)

    parts.model.train()
    param_dtype = parts.model.prototypes.dtype  # float32, unless a test builds the model in float64
    metrics: dict[str, float] = {}
    step, stopped_early, batches = start_step, False, None
    try:
        batches = iter(loader)  # forks the loader's workers: before the watchdog's thread exists
        watchdog.beat("data", step)
        watchdog.start()
        for batch in batches:
            if step >= data.total_steps:
                break
            watchdog.beat("step", step)
            epoch = step // data.steps_per_epoch
            if batch.error is not None:  # raised in a loader worker: one line here, not the worker's traceback
                raise DataError(batch.error)
            batch = data.decode(batch)  # data.decode_on=device: decoded and cut here; else cut by the workers
            report.skipped_images(data.skipped.add(epoch, batch.skipped), batch.skip_kinds)
            report.decoded_on_cpu(epoch, batch.cpu_decoded, batch.batch_size)
            views = device_views(batch, data.transform, proc.device, param_dtype)
            masks = parts.make_masks(step, views[0].shape[0], anchor_size=views[1].shape[-1],
                                     focal_size=views[-1].shape[-1], num_focal=len(views) - 2, rank=proc.rank,
                                     world_size=proc.world, device=proc.device)
            result = train_step(step_model, parts.loss_fn, parts.optimizer, views, masks,
                                hp=parts.schedules.at(step), clip_grad=cfg.optim.clip_grad, scaler=parts.scaler,
                                amp_dtype=proc.amp_dtype, prototype_grad_scale=parts.prototype_grad_scale)
            nonfinite.update(result, step)
            step += 1
            if budget is not None and (decision := budget.after_step(step)) is not None:
                _fix_length(cfg, decision, budget, data=data, parts=parts, report=report, run_dir=run_dir,
                            is_main=proc.is_main)
                budget = None
            elif budget is not None:  # the timing may have been extended: the run goes on at least until it decides
                data.total_steps = max(data.total_steps, budget.decides_at + 1)
            metrics = report.after_step(result, step, epoch, nonfinite) or metrics
            if checkpoints.after_step(step, stop, data.skipped):  # preempted: saved, now exit cleanly
                stopped_early = True
                if proc.is_main:
                    write_status(run_dir, "stopped", step, data.total_steps)
                    again = command or f"resume={run_dir}"
                    report.write(f"received {stop.signal or 'a stop signal (on another rank)'}: wrote "
                                 f"checkpoints/last.pt at step {step} in {run_dir}; continue with: {again}")
                break
            if report.collapsed is not None:
                _stop_collapsed(report.collapsed, step, checkpoints, run_dir, data.total_steps, proc.is_main)
            watchdog.beat("data", step)
    except RuntimeError as e:  # another rank died or its connection broke: one line, not a trace
        if proc.world == 1 or not collective_failure(e):
            raise
        raise JobError(lost_peer_message(e, proc, step, checkpoints.last_saved or start_step, run_dir)) from None
    finally:
        watchdog.stop()
        report.close()
        stop_workers(batches)
    if stopped_early:
        stop.forward()  # hand the signal on to a job manager's handler (submitit requeues the job here)
    elif proc.is_main:
        log.info(_next_steps(run_dir, step, cfg, short_warmup))
    return metrics


def _fix_length(cfg: DictConfig, decision: tuple[int, float], budget: BudgetClock, *, data: TrainingData,
                parts: TrainingParts, report: RunReport, run_dir: Path, is_main: bool) -> None:
    """``optim.budget``: the run has timed its steps; fix its length (and a fitted recipe's warm-up and EMA for it),
    rebuild the schedules over it and record it (config.yaml, run.json, status.json), so a resume continues it."""
    total, pace = decision
    record_length(cfg, budget.choices(total, pace, data.steps_per_epoch, cfg), total, pace)
    data.total_steps = total
    parts.schedules = build_schedules(cfg, total_steps=total, steps_in_epoch=data.steps_per_epoch)
    report.set_length(total, parts.schedules, warmup_steps=warmup_steps(cfg.optim.warmup_epochs, data.steps_per_epoch))
    if is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        layout = json.loads((run_dir / "run.json").read_text())
        (run_dir / "run.json").write_text(json.dumps({**layout, "total_steps": total}, indent=2) + "\n")
        write_status(run_dir, "running", budget.decides_at, total)
        report.write(f"optim.budget={budget.budget}: {pace:.3g} s a step (steps {budget.timed_start}-"
                     f"{budget.decides_at}), so the run makes {total:,} steps; its schedules span them from here")
        short_warmup = _warmup_note(cfg, data)  # a preset's warm-up in epochs may outlast the steps the budget holds
        if short_warmup:
            report.write(f"warning: {short_warmup}")


def _stop_collapsed(reason: str, step: int, checkpoints: CheckpointPolicy, run_dir: Path, total_steps: int,
                    is_main: bool) -> None:
    """End a run that collapsed after ``step``: ``last.pt`` (every rank takes part), ``status.json`` set to
    ``collapsed`` with ``reason``, and :class:`RunCollapsed` (one line, exit code 1; a sweep goes on)."""
    if "last.pt" not in checkpoints.due(step):  # (a periodic checkpoint of this step is not last.pt)
        checkpoints.save(step, ["last.pt"])
    line = f"{reason} (wrote {run_dir}/checkpoints/last.pt at step {step})"
    if is_main:
        write_status(run_dir, "collapsed", step, total_steps, reason=line)
    raise RunCollapsed(line)


def _refuse_collapsed(run_dir: Path) -> None:
    """A rerun of a run that stopped because it collapsed says so rather than train it into the same state."""
    status = read_status(run_dir)
    if status is not None and status.get("status") == "collapsed":
        raise RunCollapsed(f"{run_dir} stopped at step {status.get('step')}: "
                           f"{status.get('reason', 'the run collapsed (its metrics.csv shows how)')}; change the "
                           "recipe (a new run), or pass collapse.stop=false to train this one on")


def show_plan(cfg: DictConfig, proc: Process, run_dir: Path) -> None:
    """``plan=true``: print what the run would train (the fitted values with their reasons, or that the recipe is
    used as configured) and its length, without training or writing anything."""
    resume_path = None
    if cfg.resume is not None and (run_dir / "checkpoints").is_dir():  # an existing run: its recorded plan
        newest = newest_checkpoint(run_dir / "checkpoints")
        resume_path = newest[0] if newest else None
    images = build_dataset(cfg.data)
    plan = fit_run(cfg, process=proc, images=images, resume_path=resume_path)
    if not proc.is_main:
        return
    if plan is not None:
        log.info("\n".join(plan.lines()))
    else:
        log.info(f"fit={cfg.fit}: the recipe is used as configured (fit=true fits it to the data and the machine)")
    m, d, o = cfg.model, cfg.data, cfg.optim
    per_epoch = max(1, len(images) // (d.batch_size * proc.world))
    length = f"{o.epochs} epochs of {per_epoch:,} steps" + (f", at most {o.max_steps:,}" if o.max_steps else "")
    if o.budget is not None and not budget_decided(cfg):
        timed = BudgetClock.skip(loader_workers(d.num_workers))
        length = (f"as many steps as optim.budget={o.budget} holds (timed from step {timed}, for at least "
                  f"{BudgetClock.TIMED} steps and {BudgetClock.TIMED_SHARE:.0%} of the budget)")
    log.info(f"would train {m.arch or 'a ViT'} (patch {m.patch_size}, native {m.img_size} px) on 2 x {d.global_size} "
             f"px + {d.num_focal} x {d.focal_size} px views of {len(images):,} images, {d.batch_size} a step per "
             f"process, lr {o.lr:.3g}: {length}; run it without plan=true")


def _resume_path(cfg: DictConfig, run_dir: Path, is_main: bool) -> Path | None:
    """The checkpoint this run continues (``resume``: auto, a run directory or a file), or None for a fresh start.

    ``resume=null`` over a run directory that already holds a checkpoint is refused: nothing finished is
    overwritten by a fresh start."""
    if is_main:  # a kill -9 during an earlier save leaves its temporary file behind
        for tmp in remove_stale_temporaries(run_dir / "checkpoints"):
            log.info(f"removed {tmp.name}, left by an interrupted checkpoint write")
    if cfg.resume is None:
        if has_checkpoints(run_dir):
            raise ConfigError(resume_null_message(run_dir))
        return None
    if cfg.resume != "auto" and not Path(str(cfg.resume)).expanduser().is_dir():
        return resolve_resume(cfg.resume, run_dir)  # one checkpoint file, named by the user
    folder = run_dir if cfg.resume == "auto" else Path(str(cfg.resume)).expanduser()
    newest = newest_checkpoint(folder / "checkpoints")
    if newest is None:
        return resolve_resume(cfg.resume, run_dir)  # auto: a fresh start; a run directory: its error
    path, step, passed_over = newest
    if is_main and (passed_over or path.name != "last.pt"):
        skipped = f"; passed over {', '.join(passed_over)}" if passed_over else ""
        log.info(f"resuming from {path} (step {step}), the newest readable checkpoint of the run{skipped}")
    return path


def _open_run(cfg: DictConfig, run_dir: Path, proc: Process, data: TrainingData, *, columns: list[str],
              start_step: int, wandb_run_id: str | None, timed_from: int | None = None) -> MetricsLogger:
    """Rank 0: write the run's config, layout and status, open its metrics log and say where it runs."""
    global_batch = cfg.data.batch_size * proc.world
    run_dir.mkdir(parents=True, exist_ok=True)
    write_status(run_dir, "running", start_step, data.total_steps)  # first: it marks the folder as an msn run
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    layout = {"total_steps": data.total_steps, "steps_per_epoch": data.steps_per_epoch, "world_size": proc.world,
              "batch_size_per_process": cfg.data.batch_size, "global_batch_size": global_batch}
    (run_dir / "run.json").write_text(json.dumps(layout, indent=2) + "\n")
    logger = MetricsLogger(run_dir, cfg, columns, start_step, wandb_run_id)
    length = (f"{data.total_steps} steps" if timed_from is None else
              f"as many steps as optim.budget={cfg.optim.budget} holds (timed from step {timed_from})")
    log.info(f"run directory {run_dir.resolve()}: {length} ({data.steps_per_epoch} an epoch), global batch "
             f"{global_batch} = {cfg.data.batch_size} per process x {proc.world} "
             f"process{'es' if proc.world > 1 else ''} on {proc.device}")
    log.info(_what_trains(cfg, data))
    if logger.wandb_run_id:
        log.info(f"wandb run {logger.wandb_run_id} ({cfg.logger.wandb.mode})")
    return logger


def _what_trains(cfg: DictConfig, data: TrainingData) -> str:
    """The model, its native size and the views it trains on; a hint when they do not fit together (the default
    32-px vit_pico on a folder's 224-px views trains at about an image a second on a CPU)."""
    m, d = cfg.model, cfg.data
    arch = m.arch or f"ViT {m.embed_dim} wide, {m.depth} deep"
    focal = f" + {d.num_focal} x {d.focal_size} px" if d.num_focal else ""
    line = (f"training {arch} (patch {m.patch_size}, native {m.img_size} px) on views of 2 x {d.global_size} px"
            f"{focal} of {len(data.base)} {d.name} images")
    if d.global_size > 2 * m.img_size:
        line += (f"; note: the model's native size is {m.img_size} px and its views are {d.global_size} px: for the "
                 "paper's ViT-S/16 at 224 px pass experiment=msn_vits16 (or model=vit_small model.patch_size=16 "
                 "model.img_size=224)")
    return line


def _warmup_note(cfg: DictConfig, data: TrainingData) -> str | None:
    """A line when the run ends inside the learning-rate warm-up it was configured with (``optim.max_steps``
    below ``optim.warmup_epochs``' steps): the warm-up is then squeezed into the run (msn.train.builder), so
    the lr reaches optim.lr only at the last step and never decays; else None."""
    warmup = warmup_steps(cfg.optim.warmup_epochs, data.steps_per_epoch)
    if cfg.optim.warmup_epochs <= 0 or warmup < data.total_steps:
        return None
    capped = cfg.optim.max_steps is not None
    cap = f"optim.max_steps={cfg.optim.max_steps}" if capped else f"optim.epochs={cfg.optim.epochs}"
    return (f"the run ends inside its learning-rate warm-up: {data.total_steps} steps ({cap}) against "
            f"{warmup} warm-up steps (optim.warmup_epochs={cfg.optim.warmup_epochs:g} x {data.steps_per_epoch}), so "
            f"the warm-up is shortened to the run: lr rises to optim.lr={cfg.optim.lr:g} at the last step and "
            f"never decays; lower optim.warmup_epochs or raise {cap.split('=')[0]} for a whole schedule")


def _eval_suggestion(run_dir: Path, cfg: DictConfig) -> str:
    """The ``msn-eval`` command that fits the data the run trained on: its own labelled set when msn-eval knows
    it (digits, fashion_mnist, the monitor's dataset), else a labelled folder of the user's (``--dataset``)."""
    name, monitored = cfg.data.name, str(cfg.monitor.dataset)
    if name == "digits":
        return f"msn-eval lowshot {run_dir}               # low-shot accuracy on digits, the data it trained on"
    if name == "fashion_mnist":  # msn-eval reads the idx files of a data.root as it reads Debian's copy
        where = cfg.data.get("root") or "fashion_mnist"
        return (f"msn-eval lowshot {run_dir} --dataset {where} --crop-pct 1   # low-shot accuracy on "
                "Fashion-MNIST's test split, the data it trained on")
    if monitored != "digits":  # the user already named a labelled set for this run
        return f"msn-eval lowshot {run_dir} --dataset {monitored}   # low-shot accuracy on monitor.dataset"
    root = cfg.data.get("root")
    labelled = None
    if name == "folder" and root and Path(str(root)).name == "train" and (Path(str(root)).parent / "val").is_dir():
        labelled = Path(str(root)).parent  # data.root=/data/imagenet/train: /data/imagenet has train/ and val/
    if labelled is not None:
        return f"msn-eval lowshot {run_dir} --dataset {labelled}   # low-shot accuracy on its train/ and val/"
    what = "synthetic images (no labels)" if name == "synthetic" else f"its {name} data"
    return (f"msn-eval lowshot {run_dir} --dataset LABELLED_DIR   # it trained on {what}: evaluate on a labelled "
            "folder with train/ and val/ (ImageFolder layout), or --dataset digits | fashion_mnist")


def _next_steps(run_dir: Path, step: int, cfg: DictConfig, note: str | None = None) -> str:
    """What a finished run prints: where its weights are, the commands that use them (an evaluation on the data
    it trained on) and ``note``, a warning to repeat at the end (a run that ended inside its warm-up)."""
    return (f"run complete: {run_dir}/checkpoints/last.pt (step {step})"
            + (f"; note: {note}" if note else "") + "\n"
            f"  msn-export {run_dir} {run_dir}/hf        # a Hugging Face ViTMSN folder (--format timm | msn)\n"
            f"  {_eval_suggestion(run_dir, cfg)}")
