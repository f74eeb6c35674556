"""Schedules as pure functions of the global step (resume = indexing, nothing to replay).

Conventions follow the original MSN code so that ``faithful`` settings reproduce it exactly:

* every schedule spans ``stretch * total_steps`` steps (the original uses ``stretch = 1.25``, so lr,
  weight decay and momentum never reach their final values); lr and wd over the integer span
  ``int(stretch * total_steps)`` (the original's ``T_max``), momentum and the sharpening temperature
  over the float span ``stretch * total_steps`` (the original's increment divides by it);
* the lr / wd used in step ``i`` are the values after ``i + 1`` scheduler increments (the original
  steps its schedulers before the optimiser), while the EMA momentum applied after step ``i`` and the
  temperature of step ``i`` are the ``i``-th values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepHyperParams:
    """Everything scheduled that one training step needs (see :func:`msn.train.step.train_step`)."""

    lr: float
    weight_decay: float
    momentum: float  # EMA momentum applied to the target after the step
    sharpen_T: float  # target sharpening temperature


@dataclass(frozen=True)
class Schedules:
    """Step-indexed lr, weight decay, EMA momentum and sharpening temperature.

    Args:
        total_steps: optimiser steps of the run (``epochs * steps_per_epoch``).
        warmup_steps: linear lr warm-up steps from ``start_lr`` to ``lr``.
        lr, start_lr, final_lr: peak, initial and cosine-floor learning rates.
        weight_decay, final_weight_decay: cosine weight-decay endpoints.
        momentum, final_momentum: linear EMA momentum endpoints.
        sharpen_T, final_sharpen_T: linear sharpening-temperature endpoints (equal = constant).
        stretch: every schedule spans ``stretch * total_steps`` (1.25 in the original code).
    """

    total_steps: int
    warmup_steps: int
    lr: float
    start_lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    momentum: float
    final_momentum: float
    sharpen_T: float
    final_sharpen_T: float
    stretch: float = 1.0

    @property
    def span(self) -> int:
        """Length over which lr and weight decay run: ``int(stretch * total_steps)``."""
        return int(self.stretch * self.total_steps)

    @property
    def float_span(self) -> float:
        """Length over which momentum and temperature run: ``stretch * total_steps``, not truncated."""
        return self.stretch * self.total_steps

    def at(self, step: int) -> StepHyperParams:
        """The hyper-parameters of step ``step`` (0-based)."""
        return StepHyperParams(self.lr_at(step), self.wd_at(step), self.momentum_at(step), self.sharpen_T_at(step))

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to ``final_lr``."""
        k = step + 1
        if k < self.warmup_steps:
            return self.start_lr + (k / max(1, self.warmup_steps)) * (self.lr - self.start_lr)
        progress = (k - self.warmup_steps) / max(1, self.span - self.warmup_steps)
        return max(self.final_lr, _cosine(self.lr, self.final_lr, progress))

    def wd_at(self, step: int) -> float:
        """Weight decay of step ``step``: cosine from ``weight_decay`` to ``final_weight_decay``."""
        wd = _cosine(self.weight_decay, self.final_weight_decay, (step + 1) / max(1, self.span))
        if self.final_weight_decay >= self.weight_decay:
            return min(self.final_weight_decay, wd)
        return max(self.final_weight_decay, wd)

    def _linear(self, start: float, end: float, step: int) -> float:
        """``start + step * (end - start) / float_span``, held at ``end`` past the span (the original's form)."""
        if step >= self.float_span:
            return end
        return start + (end - start) / max(1.0, self.float_span) * step

    def momentum_at(self, step: int) -> float:
        """EMA momentum applied after step ``step``: linear from ``momentum`` to ``final_momentum``."""
        return self._linear(self.momentum, self.final_momentum, step)

    def sharpen_T_at(self, step: int) -> float:
        """Target sharpening temperature of step ``step``: linear over the (stretched) run."""
        return self._linear(self.sharpen_T, self.final_sharpen_T, step)
