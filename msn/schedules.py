"""Schedules as pure functions of the global step (resume = indexing, nothing to replay).

Conventions follow the original MSN code so that ``faithful`` settings reproduce it exactly:
every schedule spans ``stretch * total_steps`` steps (the original uses ``stretch = 1.25``, so lr,
weight decay and momentum never reach their final values), and the lr / wd used in step ``i`` are
the values after ``i + 1`` scheduler increments (the original steps its schedulers before the
optimiser), while the EMA momentum used after step ``i`` is the ``i``-th value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
        """Length over which the schedules run: ``int(stretch * total_steps)``."""
        return int(self.stretch * self.total_steps)

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

    def momentum_at(self, step: int) -> float:
        """EMA momentum applied after step ``step``: linear from ``momentum`` to ``final_momentum``."""
        progress = min(1.0, step / max(1, self.span))
        return self.momentum + progress * (self.final_momentum - self.momentum)

    def sharpen_T_at(self, step: int) -> float:
        """Target sharpening temperature of step ``step``: linear over the (stretched) run."""
        progress = min(1.0, step / max(1, self.span))
        return self.sharpen_T + progress * (self.final_sharpen_T - self.sharpen_T)
