"""Deprecated: the training step moved to :mod:`msn.train.step` and its builders to :mod:`msn.train.builder`.
This alias goes in the next release."""

import warnings

from msn.train.builder import build_loss, build_mask_generator, build_schedules
from msn.train.step import NonFiniteGuard, StepResult, train_step

__all__ = ["NonFiniteGuard", "StepResult", "build_loss", "build_mask_generator", "build_schedules", "train_step"]
warnings.warn(f"importing from {__name__} is deprecated; import from msn.train.step (the step) and "
              "msn.train.builder (build_*)", FutureWarning, stacklevel=2)
