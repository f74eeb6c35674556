"""The run's recipe fitted at the boundary (``fit``, ``optim.scale_lr``) and its length fixed by a time budget
(``optim.budget``): the config goes in, the config with the plan's values (and ``fitted``, their record) comes out.

The rules themselves are :mod:`msn.plan`'s, torch-free and explicit; here they meet the run: its images, its
processes, its GPU's memory and the record of an earlier session. A resume applies the recorded values and
measures nothing again, so a continued run trains exactly what it started (only the images' sizes are read once
more, to say so when they changed).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from msn.config import validate
from msn.errors import DataError
from msn.plan import (
    FITTED_KEYS,
    Choice,
    Machine,
    Plan,
    budget_steps,
    cores_available,
    length_choices,
    make_plan,
    measure_images,
    override_keys,
    should_fit,
)
from msn.train.builder import Process
from msn.utils import distributed
from msn.weights.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def given_values(cfg: DictConfig) -> dict[str, Any]:
    """The fitted keys the command line set (``cfg.given``), with the config's values: the plan leaves them alone."""
    keys = override_keys(list(cfg.given))
    return {key: _plain(OmegaConf.select(cfg, key)) for key in FITTED_KEYS if key in keys}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def machine_of(process: Process) -> Machine:
    """The machine a plan is fitted to: the process's device, its share of the node's cores, the processes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cores = max(1, cores_available() // max(1, local))
    gpu = torch.cuda.get_device_name(process.device) if process.device.type == "cuda" else None
    return Machine(process.device.type, cores, process.world, gpu)


def recorded_fit(resume_path: Path | None) -> dict[str, Any] | None:
    """What an earlier session fitted (its config's ``fitted``): from the run's config.yaml beside its checkpoints,
    else from the checkpoint itself; None for a fresh start or a run that fitted nothing."""
    if resume_path is None:
        return None
    config_file = resume_path.parent.parent / "config.yaml"
    text = config_file.read_text() if config_file.is_file() else load_checkpoint(resume_path).get("config", "")
    record = (yaml.safe_load(text) or {}).get("fitted") if text else None
    return record or None


def apply_values(cfg: DictConfig, values: dict[str, Any], given: dict[str, Any]) -> None:
    """Set each fitted value of ``values`` (key -> value) that the user did not give."""
    for key, value in values.items():
        if key not in given:
            OmegaConf.update(cfg, key, value, merge=False)


def fit_run(cfg: DictConfig, *, process: Process, images: Any, resume_path: Path | None) -> Plan | None:
    """Fit ``cfg`` in place for this run and return the plan (None when the recipe is not fitted).

    A fresh run with ``fit`` active measures ``images`` (rank 0, on a fixed sample), sizes the batch on a GPU and
    makes the plan (:func:`msn.plan.make_plan`), which every rank applies; ``optim.scale_lr`` scales a preset's
    lr with the global batch. A resume applies the record of the session that started the run
    (``resume_path``'s config), so nothing is measured and chosen again. ``cfg.fitted`` records the result.
    """
    given = given_values(cfg)
    record = recorded_fit(resume_path)
    fitted = should_fit(cfg.fit, cfg.data.name, list(cfg.given))
    plan = None
    if record is not None:
        apply_values(cfg, {k: v["value"] for k, v in (record.get("values") or {}).items()}, given)
        if record.get("images") is not None:
            plan = Plan.from_record(record)
            plan.given = given
            if process.is_main:
                _say_if_resized(plan, images)
    elif fitted:
        plan = _new_plan(cfg, process, images, given)
        apply_values(cfg, plan.values(), given)
        record = plan.to_record()
    if cfg.optim.scale_lr and not fitted and "optim.lr" not in ((record or {}).get("values") or {}):
        record = record or {}
        record.setdefault("values", {}).update(_scaled_lr(cfg, process.world))
        apply_values(cfg, {k: v["value"] for k, v in record["values"].items() if k.startswith("optim.")}, {})
    if record is not None:
        cfg.fitted = record
    validate(cfg)
    return plan


def fit_composed(cfg: DictConfig, process: Process) -> Plan | None:
    """A tool's composed config (``msn-viz views OVERRIDES``) fitted as a fresh run of it would be, in place: the
    source's images are read only when the recipe is fitted."""
    if not should_fit(cfg.fit, cfg.data.name, list(cfg.given)) and not cfg.optim.scale_lr:
        return None
    from msn.data.registry import build_dataset

    return fit_run(cfg, process=process, images=build_dataset(cfg.data), resume_path=None)


def _new_plan(cfg: DictConfig, process: Process, images: Any, given: dict[str, Any]) -> Plan:
    """Rank 0 measures and plans; every rank gets its record (the same plan everywhere)."""
    record = None
    if process.is_main:
        largest = None
        if process.device.type == "cuda":
            def largest(cap: int, values: dict[str, Any]) -> int:
                from msn.train.memory import largest_batch

                trial = OmegaConf.create(OmegaConf.to_container(cfg))
                apply_values(trial, values, {})
                return largest_batch(trial, process, start=16, cap=cap)
        try:
            stats = measure_images(images)
        except ValueError as e:
            raise DataError(str(e)) from None
        plan = make_plan(stats, machine_of(process), given, budget=cfg.optim.budget,
                         largest_batch=largest, epoch_images=cfg.data.samples_per_epoch,
                         lr_base_size=cfg.optim.lr_base_size)
        record = plan.to_record()
    record = distributed.broadcast_object(record)
    plan = Plan.from_record(record)
    plan.given = given
    return plan


def _scaled_lr(cfg: DictConfig, world: int) -> dict[str, dict[str, Any]]:
    """``optim.scale_lr``: lr and start_lr times the global batch over ``optim.lr_base_size``, with their reason."""
    global_batch = cfg.data.batch_size * world
    scale = global_batch / cfg.optim.lr_base_size
    why = f"optim.scale_lr: {{:g}} x {global_batch}/{cfg.optim.lr_base_size} (the global batch)"
    return {"optim.lr": {"value": cfg.optim.lr * scale, "reason": why.format(cfg.optim.lr)},
            "optim.start_lr": {"value": cfg.optim.start_lr * scale, "reason": why.format(cfg.optim.start_lr)}}


def _say_if_resized(plan: Plan, images: Any) -> None:
    """One line when the images' sizes changed since the plan was made (the run keeps its recorded views)."""
    try:
        now = measure_images(images)
    except Exception:  # noqa: BLE001 (a source that cannot say: nothing to compare)
        return
    then = plan.images
    if (now.median_width, now.median_height) != (then.median_width, then.median_height):
        log.warning(f"the images' median size changed since this run fitted its plan ({then.median_width} x "
                    f"{then.median_height} px then, {now.median_width} x {now.median_height} px now): the run "
                    "continues with the views it was fitted with; start a new run (run_name=NEW_NAME) to fit a "
                    "plan to the new images")


class BudgetClock:
    """Fixes a run's length for ``optim.budget``: after :meth:`skip` steps (start-up, a compilation, and the
    batches the loader workers made ahead, which come faster than the steady pace) it times :attr:`TIMED` steps,
    loader included, and sets the number of steps that :attr:`SHARE` of the budget holds at that pace, counted from
    the session's start (``started``, a :func:`time.perf_counter` reading). The rest is left for checkpoints,
    logging and the pace's drift."""

    TIMED, SHARE = 20, 0.95

    def __init__(self, budget: str, budget_s: float, start_step: int, started: float, *, workers: int = 0) -> None:
        self.budget, self.budget_s, self.start_step, self.started = budget, budget_s, start_step, started
        self.skipped = self.skip(workers)
        self.timed_from: float | None = None

    @staticmethod
    def skip(workers: int) -> int:
        """Steps left out of the timing: 5, and the two batches each loader worker prepares ahead."""
        return 5 + 2 * workers

    @property
    def decides_at(self) -> int:
        return self.start_step + self.skipped + self.TIMED

    def after_step(self, step: int) -> tuple[int, float] | None:
        """``step`` steps are done: (the run's steps, seconds a step) once it decides (the same on every rank),
        else None."""
        if step == self.start_step + self.skipped:
            self.timed_from = time.perf_counter()
        if step != self.decides_at or self.timed_from is None:
            return None
        now = time.perf_counter()
        pace = (now - self.timed_from) / self.TIMED
        decision = (budget_steps(self.SHARE * self.budget_s, now - self.started, pace, step), pace)
        return distributed.broadcast_object(decision)  # rank 0's clock decides for all

    def choices(self, total: int, pace: float, per_epoch: int, cfg: DictConfig) -> list[Choice]:
        """The fitted values the decision sets (the length, and a fitted recipe's warm-up and EMA for it)."""
        timed = f"{self.decides_at - self.TIMED}-{self.decides_at}"
        return length_choices(total, per_epoch, budget=self.budget, given=given_values(cfg),
                              pace=f"{pace:.3g} s a step (timed over steps {timed})",
                              fitted=bool(cfg.fitted and cfg.fitted.get("images") is not None))


def record_length(cfg: DictConfig, choices: list[Choice], total: int, pace: float) -> None:
    """Set the decided length's values in ``cfg`` and its ``fitted`` record (a resume then reads the length)."""
    given = given_values(cfg)
    record = _plain(cfg.fitted) or {}
    record.setdefault("values", {}).update({c.key: {"value": c.value, "reason": c.reason} for c in choices
                                            if c.key not in given})
    record["length"] = {"steps": total, "seconds_per_step": round(pace, 6)}
    apply_values(cfg, {c.key: c.value for c in choices}, given)
    cfg.fitted = record


def budget_decided(cfg: DictConfig) -> bool:
    """Whether an earlier session already fixed this budget run's length (its record holds it)."""
    return bool(cfg.fitted and cfg.fitted.get("length"))


__all__ = ["BudgetClock", "apply_values", "budget_decided", "fit_composed", "fit_run", "given_values", "machine_of",
           "record_length", "recorded_fit"]
