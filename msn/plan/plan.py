"""The plan: every value the user did not give, fitted by :mod:`msn.plan.rules`, with its reason; what a run
prints before its first step, records in its config (``fitted``) and reuses when it resumes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msn.config.fitting import FITTED_KEYS
from msn.plan import rules
from msn.plan.measure import ImageStats, Machine
from msn.plan.rules import Choice


@dataclass
class Plan:
    """What a run fitted: the measured images and machine, each fitted value with its reason, and the values the
    user gave (left alone: the rules read them)."""

    images: ImageStats
    machine: Machine
    choices: list[Choice]
    given: dict[str, Any] = field(default_factory=dict)

    def values(self) -> dict[str, Any]:
        return {c.key: c.value for c in self.choices}

    def value(self, key: str) -> Any:
        """The run's value of ``key``: the user's when given, else the fitted one (KeyError if neither)."""
        return self.given[key] if key in self.given else self.values()[key]

    def to_record(self) -> dict[str, Any]:
        """The plan as the run's config records it (``fitted``), and a resume reads back (:meth:`from_record`)."""
        return {"images": self.images.to_dict(), "machine": {"device": self.machine.device, "cores": self.machine.cores,
                                                             "world": self.machine.world, "gpu": self.machine.gpu},
                "values": {c.key: {"value": c.value, "reason": c.reason} for c in self.choices}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Plan:
        values = record.get("values") or {}
        return cls(ImageStats.from_dict(record["images"]), Machine(**record["machine"]),
                   [Choice(k, v["value"], v["reason"]) for k, v in values.items()])

    def replace(self, *choices: Choice) -> None:
        """Set (or add) fitted values: the run's length, once a budget run has timed its steps."""
        for new in choices:
            self.choices = [c for c in self.choices if c.key != new.key] + [new]

    def lines(self) -> list[str]:
        """The plan as printed: a header, then one line per fitted value (``key  value  reason``)."""
        order = {k: i for i, k in enumerate(FITTED_KEYS)}
        width = max((len(c.key) for c in self.choices), default=0)
        rows = [f"  {c.key:<{width}}  {_show(c.value):<10}  {c.reason}"
                for c in sorted(self.choices, key=lambda c: order.get(c.key, len(order)))]
        head = f"plan for {self.images.describe()} (sizes read on {self.images.sampled}), on {self.machine.describe()}"
        given = ", ".join(f"{k}={_show(v)}" for k, v in sorted(self.given.items()) if k in order)
        return [head + ":", *rows] + ([f"  yours, as given: {given}"] if given else [])


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def make_plan(images: ImageStats, machine: Machine, given: dict[str, Any], *, budget: str | None = None,
              largest_batch: Callable[[int, dict[str, Any]], int] | None = None, epoch_images: int | None = None,
              lr_base_size: int = rules.PAPER_BATCH) -> Plan:
    """Fit every key of :data:`FITTED_KEYS` that ``given`` (the user's values, by key) does not hold.

    ``budget``: the run's length is fixed later, once it has timed its steps (:func:`budget_steps`); the epochs
    fitted here are provisional. ``largest_batch(cap, values)``: the largest batch up to ``cap`` whose step fits the
    GPU for the model and views of ``values`` (the plan so far, and the user's). ``epoch_images``: images an epoch
    takes (``data.samples_per_epoch``), by default all of them.
    """
    plan = Plan(images, machine, [], dict(given))

    def fit(choice: Choice) -> Any:
        if choice.key not in given:
            plan.choices.append(choice)
        return plan.value(choice.key)

    if "model.patch_size" in given:
        patch = given["model.patch_size"]
        fit(rules.global_view_for_patch(images, machine, patch))
    else:
        fit(rules.global_view_size(images, machine))
        patch = fit(rules.patch_size(plan.value("data.global_size"), machine))
        sizes = {k: given[k] for k in ("data.global_size", "data.focal_size", "model.img_size") if k in given}
        if any(size % patch for size in sizes.values()):  # view sizes of the user's: a patch that divides them
            while patch > 1 and any(size % patch for size in sizes.values()):
                patch //= 2
            shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
            plan.replace(Choice("model.patch_size", patch, f"the largest of 16, 8, 4, 2, 1 that divides {shown}"))
    global_size = plan.value("data.global_size")
    fit(Choice("model.img_size", global_size, "the global views' size: the position grid needs no resizing"))
    fit(rules.focal_view_size(global_size, patch))
    fit(rules.focal_views(machine))
    fit(rules.mask_ratio(machine))
    for choice in (*rules.crop_scales(images), *rules.colour_distortion(images), *rules.normalisation(images)):
        fit(choice)
    if "model.arch" not in given:
        for choice in rules.model_size(images, machine):
            fit(choice)
    elif given["model.arch"] in rules.MODEL_HEADS:  # model.arch=vit_small alone: its projection head with it
        hidden, output = rules.MODEL_HEADS[given["model.arch"]]
        fit(Choice("model.head_hidden_dim", hidden, f"{given['model.arch']}'s projection head"))
        fit(Choice("model.head_output_dim", output, f"{given['model.arch']}'s projection head"))
    if "data.batch_size" in given:  # given: no memory search on a GPU for a value that would be thrown away
        batch = given["data.batch_size"]
    else:
        sized = None if largest_batch is None else (lambda cap: largest_batch(cap, {**plan.values(), **given}))
        batch = fit(rules.batch_size(epoch_images or images.count, machine, sized))
    global_batch = batch * machine.world
    fit(rules.prototypes(images.count, global_batch))
    for choice in rules.learning_rate(global_batch, lr_base_size):
        fit(choice)
    per_epoch = max(1, (epoch_images or images.count) // global_batch)
    n_epochs = fit(rules.epochs(epoch_images or images.count, global_batch, machine))
    if budget is not None and "optim.epochs" not in given:
        plan.replace(Choice("optim.epochs", n_epochs, f"until the run has timed its first steps; then optim.budget="
                            f"{budget} fixes the number of steps"))
    total = n_epochs * per_epoch
    if given.get("optim.max_steps") is not None:
        total = min(total, given["optim.max_steps"])
    for choice in (rules.warmup(total, per_epoch), *rules.ema_momentum(total)):
        later = " (for now: refitted once optim.budget fixes the run's length)" if budget is not None else ""
        fit(Choice(choice.key, choice.value, choice.reason + later))
    fit(rules.loader_workers(machine))
    return plan


def budget_steps(budget_s: float, elapsed_s: float, seconds_per_step: float, steps_done: int) -> int:
    """The run's number of steps for a time budget: the steps done, and as many more as the time left holds at the
    measured pace (at least one more)."""
    left = max(0.0, budget_s - elapsed_s)
    return steps_done + max(1, math.floor(left / max(seconds_per_step, 1e-9)))


def length_choices(total: int, per_epoch: int, *, budget: str, pace: str, given: dict[str, Any],
                   fitted: bool) -> list[Choice]:
    """What a budget fixes once the run has timed its steps: its number of steps (``optim.max_steps``, with the
    epochs that hold them) and, for a fitted recipe, the warm-up and EMA momentum for that length (unless given)."""
    choices = [Choice("optim.max_steps", total, f"optim.budget={budget} at {pace}"),
               Choice("optim.epochs", math.ceil(total / max(1, per_epoch)), f"the epochs holding {total:,} steps")]
    if fitted:
        for choice in (rules.warmup(total, per_epoch), *rules.ema_momentum(total)):
            if choice.key not in given:
                choices.append(choice)
    return choices
