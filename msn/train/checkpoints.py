"""Checkpoints during a run: which are due after a step, stopping on a signal or on too many bad images, and
writing them (every rank takes part: the RNG states and skip records are gathered; rank 0 writes)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from msn.data.loader import SkippedImages
from msn.train.builder import Process, TrainingData, TrainingParts
from msn.train.loggers import MetricsLogger
from msn.train.resume import training_state
from msn.train.sharding import is_sharded, share_rank0_buffers
from msn.train.signals import StopRequest
from msn.train.step import NonFiniteGuard
from msn.utils import distributed
from msn.utils.rundir import write_status
from msn.utils.runlock import current_run_lock
from msn.weights.checkpoint import periodic_name, prune_periodic, rng_state, save_checkpoint, shards_referenced
from msn.weights.sharded import prune_shards, save_shards


class CheckpointPolicy:
    """After each step: which checkpoints are due, whether a signal or too many bad images stop the run, and
    writing them (every rank takes part: the RNG states and skip records are gathered; rank 0 writes)."""

    def __init__(self, cfg: DictConfig, *, run_dir: Path, process: Process, data: TrainingData,
                 parts: TrainingParts, logger: MetricsLogger | None, nonfinite: NonFiniteGuard) -> None:
        self.cfg, self.run_dir, self.proc, self.data, self.parts = cfg, run_dir, process, data, parts
        self.logger, self.nonfinite = logger, nonfinite
        self.last_saved: int | None = None  # the step of the last checkpoint this run wrote

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
        world, p = self.proc.world, self.parts
        self.nonfinite.check()  # a step that made a NaN is never saved ...
        self.nonfinite.check_weights(p.model, step, self.last_saved)  # ... nor weights that became one
        folder = self.run_dir / "checkpoints"
        model_state, optimizer_state, shards = p.model.state_dict(), p.optimizer.state_dict(), None
        if is_sharded(p.model):  # each process writes its own shards; the checkpoint files name their folder
            share_rank0_buffers(p.model)
            shards = save_shards(folder, step, model_state, optimizer_state["state"], is_main=self.proc.is_main)
            model_state, optimizer_state = {}, {**optimizer_state, "state": {}}
        rng = rng_state()
        rng_ranks = distributed.all_gather_object(rng) if world > 1 else None
        skipped = self.data.skipped
        skips = distributed.all_gather_object(skipped.state_dict()) if world > 1 else [skipped.state_dict()]
        if not self.proc.is_main:
            self.last_saved = step  # (what rank 0 writes now: every rank can say where the last checkpoint is)
            return
        lock = current_run_lock(self.run_dir)
        if lock is not None:  # the folder is still this run's (not removed, not taken over by a second launch)
            lock.verify()
        state = training_state(
            model_state=model_state, optimizer_state=optimizer_state, scaler=p.scaler, cfg=self.cfg, step=step,
            steps_per_epoch=self.data.steps_per_epoch, world=world, prototype_grad_scale=p.prototype_grad_scale,
            skips=skips, skipped_epoch=skipped.epoch, rng=rng, rng_ranks=rng_ranks,
            wandb_run_id=self.logger.wandb_run_id if self.logger else None,
            data_identity=self.data.identity, shards=shards)
        for name in names:
            save_checkpoint(folder / name, state)
        self.last_saved = step
        if self.cfg.checkpoint.keep and periodic_name(step) in names:  # only once the new one is safely written
            prune_periodic(folder, step, self.cfg.checkpoint.keep)
        if shards is not None:  # the shards no checkpoint names any more (an older last.pt's, pruned periodic ones)
            prune_shards(folder, shards_referenced(folder))
        if "last.pt" in names:
            total = self.data.total_steps
            write_status(self.run_dir, "finished" if step >= total else "running", step, total)
