"""Fitting the recipe to the data and the machine (``fit``): the measurements (:mod:`.measure`), the rules, one
function and one reason each (:mod:`.rules`), and the plan they make (:mod:`.plan`). Torch-free: it reads a
sample of images and does arithmetic; the run (:mod:`msn.train.fitting`) applies the plan to its config."""

from msn.config.fitting import BUNDLED, FITTED_KEYS, override_keys, should_fit
from msn.plan.measure import ImageStats, Machine, cores_available, measure_images, median_size
from msn.plan.plan import Plan, budget_steps, length_choices, make_plan
from msn.plan.rules import Choice

__all__ = ["BUNDLED", "FITTED_KEYS", "Choice", "ImageStats", "Machine", "Plan", "budget_steps", "cores_available",
           "length_choices", "make_plan", "measure_images", "median_size", "override_keys", "should_fit"]
