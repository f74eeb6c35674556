"""What a training run tells while it runs: metrics rows (metrics.csv, wandb), console lines, the progress
bar, the periodic monitor, and wandb's prototype histogram and picture of the first views."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from msn.config import monitor_protocols, progress_bar_disabled
from msn.data.loader import SkippedImages
from msn.models.msn import MSNEncoder
from msn.train.collapse import CollapseWatch, default_window
from msn.train.loggers import MetricsLogger
from msn.train.schedules import Schedules
from msn.train.sharding import gather_into, is_sharded, local_shard
from msn.train.step import NonFiniteGuard, StepResult
from msn.utils import distributed
from msn.utils.seeding import seeded_global_rng

log = logging.getLogger(__name__)


class RunReport:
    """The run's reporting, called after every step by every rank; rank 0 (``logger`` given) writes.

    Logging steps (every ``logger.log_every``, the last step and monitor steps) all-reduce the loss parts,
    so every rank must call :meth:`after_step`. The monitors (``monitor.every_steps``: a labelled protocol, RankMe
    or both, ``monitor.protocol``) run on rank 0 only, on ``target`` (the EMA encoder: backbone and head), in the
    training precision ``amp_dtype``; RankMe reads its fixed sample of ``images`` (the run's base dataset) once.
    With ``collapse.stop`` the logged rows feed a :class:`~msn.train.collapse.CollapseWatch` after the warm-up's
    ``warmup_steps``; :attr:`collapsed` is then its message, the same on every rank.
    """

    def __init__(self, cfg: DictConfig, *, logger: MetricsLogger | None, target: MSNEncoder, schedules: Schedules,
                 skipped: SkippedImages, total_steps: int, start_step: int, world: int, device: torch.device,
                 amp_dtype: torch.dtype | None, images: Any = None, warmup_steps: int = 0) -> None:
        self.cfg, self.logger, self.target, self.schedules, self.skipped = cfg, logger, target, schedules, skipped
        self.total_steps, self.images_per_step, self.world = total_steps, cfg.data.batch_size * world, world
        is_main = logger is not None
        self.monitor, self.rankme = None, None
        self.whole_target: MSNEncoder | None = None  # strategy=fsdp: rank 0's whole copy of the target, monitored
        labelled, rankme = monitor_protocols(cfg.monitor.protocol)
        if is_main and cfg.monitor.every_steps and labelled is not None:
            from msn.eval.monitor import Monitor  # deferred: evaluation pulls in scikit-learn

            self.monitor = Monitor(labelled, cfg.monitor.dataset, image_size=cfg.model.img_size,
                                   mean=cfg.data.mean, std=cfg.data.std, amp_dtype=amp_dtype,
                                   crop_pct=cfg.monitor.crop_pct, options=cfg.monitor.options)
        if is_main and cfg.monitor.every_steps and rankme and images is not None:
            from msn.eval.rankme import RankMeMonitor

            self.rankme = RankMeMonitor(images, images=cfg.monitor.rankme_images, image_size=cfg.model.img_size,
                                        mean=cfg.data.mean, std=cfg.data.std, crop_pct=cfg.monitor.crop_pct,
                                        amp_dtype=amp_dtype)
        self.collapse = None
        self.collapsed: str | None = None  # the collapse message, once a signal held for its window
        if cfg.collapse.stop:
            window = cfg.collapse.window_steps or default_window(total_steps, cfg.logger.log_every)
            self.collapse = CollapseWatch(num_prototypes=cfg.model.num_prototypes, window_steps=window,
                                          rankme_below=cfg.collapse.rankme_below,
                                          after_step=min(warmup_steps, total_steps // 2))
        self.prototype_use = None  # targets' argmax counts since the last monitor step, for wandb's histogram
        if logger is not None and logger.wandb_run is not None:
            _log_views_picture(logger, cfg, start_step, world)
            self.prototype_use = torch.zeros(cfg.model.num_prototypes, dtype=torch.long, device=device)
        # A pseudo-terminal that reports a size of 0 x 0 (script, some CI and container consoles) makes tqdm hide
        # the bar (its row is "below" a 0-row screen): a fixed 100 x 24 there, the terminal's own size elsewhere.
        sized = sys.stderr.isatty() and min(os.get_terminal_size(sys.stderr.fileno())) > 0
        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=sized, ncols=None if sized else 100,
                        nrows=None if sized else 24, desc="msn", file=sys.stderr,
                        disable=progress_bar_disabled(cfg.logger.progress) if is_main else True)
        self.tic, self.last_logged, self.start_step = time.perf_counter(), start_step, start_step
        self.first_step_done: float | None = None  # the pace and ETA count from here: start-up left out
        self.cpu_decoded: list[int] = [0, 0, 0]  # data.decode_on=device: [epoch, images decoded on the CPU, seen]
        self.cpu_decoded_said = False

    def _monitored_target(self) -> MSNEncoder:
        """The target the monitors evaluate on rank 0. A sharded one (``strategy=fsdp``) is gathered into a whole copy
        there (every rank takes part), since rank 0 alone cannot run a model whose weights all ranks hold."""
        if not is_sharded(self.target):
            return self.target
        if self.logger is not None and self.whole_target is None:  # built once, not drawing from the run's RNG
            with seeded_global_rng(0):
                self.whole_target = MSNEncoder(self.cfg.model).to(local_shard(next(self.target.parameters())).device)
        gather_into(self.target, self.whole_target)
        return self.whole_target if self.whole_target is not None else self.target

    def set_length(self, total_steps: int, schedules: Schedules, *, warmup_steps: int) -> None:
        """The run's length was fixed while it ran (``optim.budget``): its new steps and schedules, for the bar, the
        ETA, the logged hyper-parameters and the collapse watch's default window."""
        self.total_steps, self.schedules = total_steps, schedules
        self.bar.total = total_steps
        self.bar.refresh()
        if self.collapse is not None:
            if self.cfg.collapse.window_steps is None:
                self.collapse.window = default_window(total_steps, self.cfg.logger.log_every)
            self.collapse.after_step = min(warmup_steps, total_steps // 2)

    def skipped_images(self, paths: list[str], kinds: dict[str, str] | None = None) -> None:
        """Say which bad images this batch replaced, each as what it is (``kinds``: path -> ``sample without an
        image member ...``; by default an undecodable image)."""
        for path in paths:
            kind = (kinds or {}).get(path, "undecodable image")
            log.warning(f"skipped {kind} {path} (replaced by another image; {len(self.skipped.paths)} distinct bad "
                        f"images so far in the run, which stops above {self.skipped.limit})")

    def decoded_on_cpu(self, epoch: int, count: int | None, batch: int) -> None:
        """With ``data.decode_on=device``, count this process's images decoded on the CPU all the same; say so
        the first time and, at the end of each epoch that had some, how many (``count`` None: nothing to say)."""
        if count is None or self.logger is None:
            return
        last, total, seen = self.cpu_decoded
        if epoch != last:
            if total:
                log.info(f"epoch {last}: {total} of {seen} images were decoded on the CPU (data.decode_on=device)")
            total = seen = 0
        if count and not self.cpu_decoded_said:
            self.cpu_decoded_said = True
            log.info(f"data.decode_on=device: {count} of a batch's {batch} images were decoded on the CPU (not JPEG, a "
                     "CMYK or cut-short JPEG, or refused by the device's decoder); the others on the device")
        self.cpu_decoded = [epoch, total + count, seen + batch]

    def after_step(self, result: StepResult, step: int, epoch: int,
                   nonfinite: NonFiniteGuard) -> dict[str, float] | None:
        """Count the step (``step`` finished steps); on logging steps return its metrics row, else None."""
        if self.prototype_use is not None:  # on the device: no wait
            self.prototype_use += torch.bincount(result.out.targets.argmax(dim=1), minlength=len(self.prototype_use))
        self.bar.update(1)
        cfg, total = self.cfg, self.total_steps
        if step == self.start_step + 1:
            self.first_step_done = time.perf_counter()
        if step == self.start_step + 1 and self.logger is not None and cfg.logger.console_every > 1:
            seconds = time.perf_counter() - self.tic
            every, rows = cfg.logger.console_every, cfg.logger.log_every
            self.write(f"first step ({step} of {total}) done in {seconds:.1f} s, start-up included; a line every "
                       f"{every} steps (logger.console_every), metrics.csv a row every {rows}")
        monitor_every = cfg.monitor.every_steps  # decided alike on every rank: logging all-reduces
        monitor_due = bool(monitor_every) and (step % monitor_every == 0 or step == total)
        if not (step % cfg.logger.log_every == 0 or step == total or monitor_due):
            return None
        nonfinite.check()  # reading the metrics waits for the device anyway
        metrics = metrics_row(result, self.schedules, step, epoch, self.skipped.count(epoch))
        now = time.perf_counter()
        images_per_s = self.images_per_step * (step - self.last_logged) / max(now - self.tic, 1e-9)
        metrics["images_per_s"] = images_per_s
        target = self._monitored_target() if monitor_due else self.target
        if self.monitor is not None and monitor_due:
            metrics["monitor"] = self.monitor(target.backbone)
        if self.rankme is not None and monitor_due:
            metrics.update(self.rankme(target))
        if self.collapse is not None:
            self.watch_collapse(metrics, step)
        if self.prototype_use is not None and (monitor_due or (not monitor_every and step == total)):
            self.logger.log_prototype_use(self.prototype_use.tolist(), step)
            self.prototype_use.zero_()
        if self.logger is not None:
            self.logger.log(metrics)
            shown = {"loss": metrics["loss"], **{name: metrics[name] for name in active_terms(result)}}
            self.bar.set_postfix({**{k: f"{v:.4f}" for k, v in shown.items()}, "lr": f"{metrics['lr']:.2e}",
                                  "img_s": f"{images_per_s:.0f}",
                                  **{k: f"{metrics[k]:.4g}" for k in result.out.diagnostics}})
            every = cfg.logger.console_every
            if every and (step // every > self.last_logged // every or step == total):
                self.write(console_line(metrics, total, active_terms(result), list(result.out.diagnostics),
                                        s_per_step=self.seconds_per_step(step, now)))
        self.tic, self.last_logged = time.perf_counter(), step
        return metrics

    def watch_collapse(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0 reads the row into the collapse watch; every rank learns its verdict (:attr:`collapsed`)."""
        verdict = self.collapse.update(metrics, step) if self.logger is not None else None
        if self.world > 1:  # every rank stops after the same step
            verdict = distributed.broadcast_object(verdict)
        self.collapsed = verdict

    def seconds_per_step(self, step: int, now: float) -> float | None:
        """The run's mean time a step since its first step (start-up, compilation and the loader's first batches
        left out, so that the ETA does not start far too high); None at the first step, which has only its
        start-up to go by (its own line says how long that took)."""
        done = step - self.start_step - 1
        if self.first_step_done is None or done < 1:
            return None
        return (now - self.first_step_done) / done

    def write(self, line: str) -> None:
        """A line of the run's log (``msn.train.report``, INFO): the commands print it above the progress bar."""
        log.info(line)

    def close(self) -> None:
        self.bar.close()
        if self.logger is not None:
            self.logger.close()


def metrics_row(result: StepResult, schedules: Schedules, step: int, epoch: int,
                skipped_in_epoch: int) -> dict[str, float]:
    """One metrics row (:func:`msn.utils.rundir.metrics_columns`) for the step just taken (``step`` counts finished
    steps): the loss and every term it returned, the schedules, its diagnostics, the encoder's gradient norm.

    The loss and its terms are means over the global batch and the epoch's skipped images a sum over processes
    (one all-reduce; call on every rank); the diagnostics (distinct prototypes, max target probability) describe
    this rank's batch; the encoder's gradient norm (before clipping) is the same on every rank.
    """
    o, i = result.out, step - 1  # i: schedule index of that step
    names = list(o.terms)
    parts = torch.stack([o.loss, *(o.terms[n] for n in names)]).detach().float()
    totals = distributed.all_reduce_sum_(torch.cat([parts, parts.new_tensor([float(skipped_in_epoch)])]))
    means = (totals[:-1] / distributed.world_size()).tolist()
    return {
        "step": step, "epoch": epoch, "loss": means[0], **dict(zip(names, means[1:], strict=True)),
        "lr": schedules.lr_at(i), "wd": schedules.wd_at(i),
        "momentum": schedules.momentum_at(i), "sharpen_T": schedules.sharpen_T_at(i),
        **{name: value.item() for name, value in o.diagnostics.items()},
        "encoder_grad_norm": result.encoder_grad_norm.item(), "skipped_images": int(totals[-1].item()),
    }


def active_terms(result: StepResult) -> list[str]:
    """The terms that count in the loss (a non-zero weight), in order: what the console and the bar show."""
    return [name for name in result.out.terms if result.out.weights.get(name, 0.0) != 0.0]


def console_line(m: dict[str, float], total: int, terms: list[str], diagnostics: list[str], *,
                 s_per_step: float | None = None) -> str:
    """The console's line for a metrics row: step, epoch, the loss and its ``terms``, lr, the ``diagnostics``
    (distinct prototypes, ...), speed; with ``s_per_step`` (the run's mean time a step) the pace and the time
    left (``ETA``), which a log file has no progress bar to show."""
    shown = " ".join(f"{name} {m[name]:.4f}" for name in terms)
    figures = " ".join(f"{name} {m[name]:.4g}" for name in diagnostics)
    pace = ""
    if s_per_step is not None:
        left = max(total - int(m["step"]), 0) * s_per_step
        pace = f" {s_per_step:.3g} s/step ETA {duration(left)}" if left else f" {s_per_step:.3g} s/step"
    return (f"step {int(m['step'])}/{total} epoch {int(m['epoch'])} loss {m['loss']:.4f} ({shown}) lr {m['lr']:.2e} "
            f"{figures} {m['images_per_s']:.0f} img/s{pace}"
            + (f" monitor {m['monitor']:.1f} %" if "monitor" in m else "")
            + (f" rankme {m['rankme']:.3g} (head {m['rankme_head']:.3g}, centred {m['rankme_centred']:.3g})"
               if "rankme" in m else "")
            + (f" replaced {int(m['skipped_images'])} draws of bad images this epoch" if m.get("skipped_images")
               else ""))


def duration(seconds: float) -> str:
    """A time span as a person reads it: ``40 s``, ``6 min 05 s``, ``2 h 05 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _log_views_picture(logger: MetricsLogger, cfg: DictConfig, step: int, world: int) -> None:
    """The first views the run trains on (msn-viz views), to wandb once at the start."""
    from msn.plots.views import default_cell, views_picture
    from msn.train.views import trainer_views

    tv = trainer_views(cfg, step, min(4, cfg.data.batch_size), world)
    picture = views_picture(tv.views, tv.dropped, mean=list(cfg.data.mean), std=list(cfg.data.std),
                            cell=default_cell(cfg.data.global_size))
    caption = f"target | anchor (dropped patches grey) | focal views, step {step}"
    logger.log_picture("views", picture, step, caption=caption)
