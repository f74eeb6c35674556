"""The run's recipe fitted at the boundary (``fit``, ``optim.scale_lr``) and its length fixed by a time budget
(``optim.budget``): the config goes in, the config with the plan's values (and ``fitted``, their record) comes out.

The rules themselves are :mod:`msn.plan`'s, torch-free and explicit; here they meet the run: its images, its
processes, its GPU's memory and the record of an earlier session. A resume applies the recorded values and
measures nothing again, so a continued run trains exactly what it started (only the sample's image headers are read
once more, to say so when the sizes changed).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from msn.config import budget_seconds, validate
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
    median_size,
    override_keys,
    should_fit,
)
from msn.train.builder import Process
from msn.utils import distributed
from msn.weights.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


MODEL_KEYS = ("model.arch", "model.patch_size", "model.img_size", "model.head_hidden_dim", "model.head_output_dim",
              "model.num_prototypes")  # what init_from's weights fix


def given_values(cfg: DictConfig) -> dict[str, Any]:
    """The fitted keys the command line set (``cfg.given``), with the config's values: the plan leaves them alone.
    With ``init_from`` the model's keys count as given: the weights it loads fix the model's shape."""
    keys = override_keys(list(cfg.given or []))
    if cfg.init_from is not None:
        keys.update(MODEL_KEYS)
    return {key: _plain(OmegaConf.select(cfg, key)) for key in FITTED_KEYS if key in keys}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def machine_of(process: Process) -> Machine:
    """The machine a plan is fitted to: the process's device, its share of the node's cores, the processes."""
    affinity = cores_available()
    # a job manager that binds each process to its own cores (SLURM's --cpus-per-task) already shares them out;
    # else the node's processes share what each of them sees
    shared = affinity >= (os.cpu_count() or affinity)
    local = _processes_on_this_node() if process.world > 1 else 1
    cores = max(1, affinity // local) if shared else affinity
    gpu = torch.cuda.get_device_name(process.device) if process.device.type == "cuda" else None
    return Machine(process.device.type, cores, process.world, gpu)


def _processes_on_this_node() -> int:
    """The run's processes on this node: torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node, submitit's tasks."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SUBMITIT_LOCAL_NTASKS"):
        value = os.environ.get(name, "")
        digits = value.split("(")[0].split(",")[0]  # SLURM writes "8(x2)" for 8 tasks on each of 2 nodes
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def recorded_fit(resume_path: Path | None) -> dict[str, Any] | None:
    """What an earlier session fitted (its config's ``fitted``): from the run's config.yaml beside its checkpoints,
    else from the checkpoint itself; None for a fresh start or a run that fitted nothing."""
    if resume_path is None:
        return None
    config_file = resume_path.parent.parent / "config.yaml"  # RUN_DIR/checkpoints/X.pt: RUN_DIR/config.yaml
    beside = resume_path.parent.name == "checkpoints" and config_file.is_file()
    text = config_file.read_text() if beside else load_checkpoint(resume_path).get("config", "")
    record = (yaml.safe_load(text) or {}).get("fitted") if text else None
    return record or None


def apply_values(cfg: DictConfig, values: dict[str, Any], given: dict[str, Any]) -> None:
    """Set each fitted value of ``values`` (key -> value) that the user did not give."""
    for key, value in values.items():
        if key not in given:
            OmegaConf.update(cfg, key, value, merge=False)


def fit_run(cfg: DictConfig, *, process: Process, images: Any, resume_path: Path | None,
            measure_gpu: bool = True) -> Plan | None:
    """Fit ``cfg`` in place for this run and return the plan (None when the recipe is not fitted).

    A fresh run with ``fit`` active measures ``images`` (rank 0, on a fixed sample), sizes the batch on a GPU and
    makes the plan (:func:`msn.plan.make_plan`), which every rank applies; ``optim.scale_lr`` scales a preset's
    lr with the global batch. A resume applies the record of the session that started the run
    (``resume_path``'s config), so nothing is measured and chosen again; a run started without a plan keeps its
    values. ``cfg.fitted`` records the result. ``measure_gpu=False``: no memory search (a tool that draws views).
    """
    given = given_values(cfg)
    record = recorded_fit(resume_path)
    fitted = should_fit(cfg.fit, cfg.data.name, None if cfg.given is None else list(cfg.given))
    plan: Plan | None = None
    if record is not None:
        values = record.get("values") or {}
        apply_values(cfg, {k: v["value"] for k, v in values.items()}, given)
        if record.get("scaled_lr"):  # derived from the user's own lr: recorded, whether given or not
            apply_values(cfg, {k: values[k]["value"] for k in ("optim.lr", "optim.start_lr") if k in values}, {})
        if record.get("images") is not None:
            plan = Plan.from_record(record)
            plan.given = given
            if process.is_main:
                _say_if_resized(plan, images)
    elif fitted and resume_path is not None:  # a run started before fitting existed: it keeps what it trained with
        if process.is_main:
            log.info(f"{resume_path} was trained with the values as configured (no fitted plan recorded): the run "
                     "continues with them")
        fitted = False
    elif fitted:
        plan = _new_plan(cfg, process, images, given, measure_gpu=measure_gpu)
        apply_values(cfg, plan.values(), given)
        record = plan.to_record()
    # optim.scale_lr: a preset's lr (or one fitted=false) scaled by the global batch; a fitted recipe scales its own
    # by its rule, so there it scales the lr values the user gave
    scaled = [k for k in ("optim.lr", "optim.start_lr") if not fitted or k in given]
    if cfg.optim.scale_lr and scaled and not (record or {}).get("scaled_lr"):
        if resume_path is not None:  # scaled now, the lr would drop mid-run: a run's lr is decided when it starts
            if process.is_main:
                log.warning("optim.scale_lr=true: this run started without it, and a resume keeps its lr; start a "
                            "new run (run_name=NEW_NAME) to train with the scaled lr")
        else:
            record = record or {}
            record.setdefault("values", {}).update({k: v for k, v in _scaled_lr(cfg, process.world).items()
                                                    if k in scaled})
            record["scaled_lr"] = True
            apply_values(cfg, {k: record["values"][k]["value"] for k in scaled}, {})
    if record is not None:
        cfg.fitted = record
    validate(cfg)
    return plan


def fit_composed(cfg: DictConfig, process: Process) -> Plan | None:
    """A tool's composed config (``msn-viz views OVERRIDES``) fitted as a fresh run of it would be, in place: the
    source's images are read only when the recipe is fitted."""
    given = None if cfg.given is None else list(cfg.given)
    if not should_fit(cfg.fit, cfg.data.name, given) and not cfg.optim.scale_lr:
        return None
    from msn.data.registry import build_dataset

    return fit_run(cfg, process=process, images=build_dataset(cfg.data), resume_path=None, measure_gpu=False)


def _new_plan(cfg: DictConfig, process: Process, images: Any, given: dict[str, Any], *, measure_gpu: bool) -> Plan:
    """Rank 0 measures and plans; every rank gets its record (the same plan everywhere), or its error."""
    record: dict[str, Any] | None = None
    if process.is_main:
        try:
            record = _make_plan(cfg, process, images, given, measure_gpu=measure_gpu).to_record()
        except (DataError, ValueError) as e:
            record = {"error": str(e)}
    record = distributed.broadcast_object(record)
    if "error" in record:  # every rank stops with rank 0's line, none waits for the others
        raise DataError(record["error"])
    plan = Plan.from_record(record)
    plan.given = given
    return plan


def _make_plan(cfg: DictConfig, process: Process, images: Any, given: dict[str, Any], *, measure_gpu: bool) -> Plan:
    """The plan for this run's images and machine (rank 0): sizes measured, the GPU's largest batch searched."""
    largest = None
    if measure_gpu and process.device.type == "cuda":
        def largest(cap: int, values: dict[str, Any]) -> int:
            from msn.train.memory import largest_batch

            trial = OmegaConf.create(OmegaConf.to_container(cfg))
            apply_values(trial, {**values, "model.num_prototypes": 1024}, {})  # the most prototypes a plan picks
            return largest_batch(trial, process, start=16, cap=cap)
    stats = measure_images(images)
    world = process.world
    if stats.count < 2 * world:
        raise DataError(f"{stats.count} image{'s' if stats.count != 1 else ''} for {world} process"
                        f"{'es' if world > 1 else ''}: a step needs at least 2 images in each (the head's BatchNorm); "
                        "add images or use fewer processes")
    return make_plan(stats, machine_of(process), given, budget=cfg.optim.budget, largest_batch=largest,
                     epoch_images=cfg.data.samples_per_epoch, lr_base_size=cfg.optim.lr_base_size)


def _scaled_lr(cfg: DictConfig, world: int) -> dict[str, dict[str, Any]]:
    """``optim.scale_lr``: lr and start_lr times the global batch over ``optim.lr_base_size``, with their reason."""
    global_batch = cfg.data.batch_size * world
    scale = global_batch / cfg.optim.lr_base_size
    why = f"optim.scale_lr: {{:g}} x {global_batch}/{cfg.optim.lr_base_size} (the global batch)"
    return {"optim.lr": {"value": cfg.optim.lr * scale, "reason": why.format(cfg.optim.lr)},
            "optim.start_lr": {"value": cfg.optim.start_lr * scale, "reason": why.format(cfg.optim.start_lr)}}


def _say_if_resized(plan: Plan, images: Any) -> None:
    """One line when the images' sizes changed since the plan was made (the run keeps its recorded views): read
    from the sample's headers, no pixels decoded."""
    try:
        now = median_size(images)
    except Exception:  # noqa: BLE001 (a source that cannot say: nothing to compare)
        return
    then = plan.images
    if now is not None and now != (then.median_width, then.median_height):
        log.warning(f"the images' median size changed since this run fitted its plan ({then.median_width} x "
                    f"{then.median_height} px then, {now[0]} x {now[1]} px now): the run "
                    "continues with the views it was fitted with; start a new run (run_name=NEW_NAME) to fit a "
                    "plan to the new images")


class BudgetClock:
    """Fixes a run's length for ``optim.budget``: after :meth:`skip` steps (start-up, a compilation, and the
    batches the loader workers made ahead, which come faster than the steady pace) it times the steps, loader
    included: at least :attr:`TIMED` of them and :attr:`TIMED_SHARE` of the budget (at most :attr:`TIMED_MAX_S`
    seconds; a pace timed over a few seconds drifted by 10-15 % on a shared 2-core machine). It then sets the number
    of steps that :attr:`SHARE` of the budget holds at that pace, counted from the session's start (``started``, a
    :func:`time.perf_counter` reading); the rest is left for checkpoints and logging. Rank 0's clock decides, and
    every rank learns when and what (two small broadcasts)."""

    TIMED, TIMED_SHARE, TIMED_MAX_S, SHARE = 20, 0.05, 60.0, 0.95

    def __init__(self, budget: str, budget_s: float, start_step: int, started: float, *, workers: int = 0) -> None:
        self.budget, self.budget_s, self.start_step, self.started = budget, budget_s, start_step, started
        self.timed_start = start_step + distributed.broadcast_object(self.skip(workers))  # rank 0's, on every rank
        self.decides_at = self.timed_start + self.TIMED  # pushed back once the first TIMED steps give the pace
        self.timed_from: float | None = None
        self.extended = False

    @staticmethod
    def skip(workers: int) -> int:
        """Steps left out of the timing: 5, and the two batches each loader worker prepares ahead."""
        return 5 + 2 * workers

    def after_step(self, step: int) -> tuple[int, float] | None:
        """``step`` steps are done: (the run's steps, seconds a step) once it decides (the same on every rank),
        else None."""
        if step == self.timed_start:
            self.timed_from = time.perf_counter()
        if step != self.decides_at or self.timed_from is None:
            return None
        now = time.perf_counter()
        pace = (now - self.timed_from) / (step - self.timed_start)
        if not self.extended:  # time long enough for a steady pace: TIMED_SHARE of the budget
            self.extended = True
            want = min(self.TIMED_MAX_S, self.TIMED_SHARE * self.budget_s) - (now - self.timed_from)
            self.decides_at += distributed.broadcast_object(max(0, math.ceil(want / max(pace, 1e-9) - 1e-6)))
            if step != self.decides_at:
                return None
        decision = (budget_steps(self.SHARE * self.budget_s, now - self.started, pace, step), pace)
        return distributed.broadcast_object(decision)

    def choices(self, total: int, pace: float, per_epoch: int, cfg: DictConfig) -> list[Choice]:
        """The fitted values the decision sets (the length, and a fitted recipe's warm-up and EMA for it)."""
        return length_choices(total, per_epoch, budget=self.budget, given=given_values(cfg),
                              pace=f"{pace:.3g} s a step (timed over steps {self.timed_start}-{self.decides_at})",
                              fitted=bool(cfg.fitted and cfg.fitted.get("images") is not None))


def record_length(cfg: DictConfig, choices: list[Choice], total: int, pace: float) -> None:
    """Set the decided length's values in ``cfg`` and its ``fitted`` record (a resume then reads the length)."""
    given = given_values(cfg)
    record = _plain(cfg.fitted) or {}
    record.setdefault("values", {}).update({c.key: {"value": c.value, "reason": c.reason} for c in choices
                                            if c.key not in given})
    record["length"] = {"steps": total, "seconds_per_step": round(pace, 6), "budget": cfg.optim.budget}
    apply_values(cfg, {c.key: c.value for c in choices}, given)
    cfg.fitted = record


def budget_decided(cfg: DictConfig) -> bool:
    """Whether an earlier session already fixed this budget run's length (its record holds it)."""
    return bool(cfg.fitted and cfg.fitted.get("length"))


def changed_budget_note(cfg: DictConfig) -> str | None:
    """One line when a resume names another ``optim.budget`` than the one that fixed the run's length: the length
    stays (the schedules were spanned over it), and the line says how to train on. None otherwise."""
    length = (cfg.fitted or {}).get("length") or {}
    then, now = length.get("budget"), cfg.optim.budget
    if then is None or now is None or budget_seconds(str(then)) == budget_seconds(str(now)):
        return None
    return (f"optim.budget={now} is not this run's: optim.budget={then} fixed its length at {length['steps']:,} steps "
            "when it timed them, and a resume keeps that length; to train longer, resume without optim.budget and "
            "with optim.max_steps=N, or start a new run (run_name=NEW_NAME)")


__all__ = ["BudgetClock", "apply_values", "budget_decided", "changed_budget_note", "fit_composed", "fit_run",
           "given_values", "machine_of", "record_length", "recorded_fit"]
