"""Stopping a run whose representations collapsed, rather than letting it train on for days.

Three signals, read off the logged metrics rows after the learning-rate warm-up (early rows are noisy, and a
fresh target can send a batch to few prototypes):

* ``one prototype``: the target's argmax picks a single prototype for every image of the batch
  (``distinct_prototypes`` at 1): MSN's point collapse, typical without ME-MAX and Sinkhorn;
* ``uniform``: the anchors' predictions are uniform over the K prototypes, the cross-entropy flat at log K
  (within 0.1 %): nothing is learnt from the targets (a learning rate that broke the encoder, targets too soft);
* ``rankme``: RankMe of the backbone or of the head (when monitored) under ``collapse.rankme_below``: the
  embeddings lie along about one direction.

A signal that holds on every logged row of a window of ``collapse.window_steps`` steps (a RankMe signal: on every
measurement in it) stops the run: ``last.pt``, ``status.json`` set to ``collapsed`` and one line naming the
signal, since when, and the usual fixes (:class:`msn.errors.RunCollapsed`, exit code 1). ``collapse.stop=false``
turns it off. Torch-free; the trainer decides on rank 0 and tells the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# The cross-entropy within 0.1 % of log K: uniform predictions. A collapsed encoder's sit there to 0.03 %; a healthy
# run that learns slowly can hover 0.2-1 % under log K for hundreds of steps (a fitted digits run: k-NN 75 %, the
# former 1 % band stopped it at step 90: docs/studies.md, "Your own images, fitted").
UNIFORM_TOLERANCE = 0.001

FIXES = {
    "one prototype": "keep ME-MAX and Sinkhorn on (loss.me_max_weight=1 loss.sinkhorn=true), lower optim.lr or "
                     "raise optim.warmup_epochs",
    "uniform": "lower optim.lr or raise optim.warmup_epochs, sharpen the targets more (a lower loss.sharpen_T), or "
               "make the views less hard (masking.ratio, data.global_scale)",
    "rankme": "lower optim.lr, keep ME-MAX on (loss.me_max_weight=1), or use more prototypes (model.num_prototypes)",
}


def default_window(total_steps: int, log_every: int) -> int:
    """``collapse.window_steps=null``: 5 % of the run's steps, and at least 5 logged rows."""
    return max(math.ceil(0.05 * total_steps), 5 * log_every)


class CollapseWatch:
    """Follows the collapse signals over the logged rows of one run (module docstring).

    Args:
        num_prototypes: K (the uniform signal compares the cross-entropy with log K).
        window_steps: steps a signal must hold before :meth:`update` reports it.
        rankme_below: the RankMe threshold.
        after_step: the warm-up's last step; rows up to it are not read.
    """

    def __init__(self, *, num_prototypes: int, window_steps: int, rankme_below: float, after_step: int = 0) -> None:
        self.log_k, self.window, self.rankme_below, self.after_step = (math.log(num_prototypes), int(window_steps),
                                                                       float(rankme_below), int(after_step))
        self.since: dict[str, int] = {}  # signal -> the first step of its current unbroken run
        self.last: dict[str, float] = {}  # signal -> its latest figure

    def signals(self, row: Mapping[str, float]) -> dict[str, bool | None]:
        """Each signal's state on ``row``: True (holds), False (does not), None (not measured on this row)."""
        ce, distinct = row.get("ce"), row.get("distinct_prototypes")
        ranks = [row[k] for k in ("rankme", "rankme_head") if _finite(row.get(k))]
        found: dict[str, bool | None] = {
            "one prototype": None if not _finite(distinct) else distinct <= 1,
            "uniform": None if not _finite(ce) else abs(ce - self.log_k) <= UNIFORM_TOLERANCE * self.log_k,
            "rankme": None if not ranks else min(ranks) < self.rankme_below,
        }
        self.last.update({"one prototype": distinct, "uniform": ce, "rankme": min(ranks) if ranks else math.nan})
        return found

    def update(self, row: Mapping[str, float], step: int) -> str | None:
        """Read a logged row (``step``: steps done); the collapse message when a signal has held for the window,
        else None."""
        if step <= self.after_step:
            return None
        for name, holds in self.signals(row).items():
            if holds is None:
                continue  # a RankMe signal lasts between two measurements
            if not holds:
                self.since.pop(name, None)
                continue
            start = self.since.setdefault(name, step)
            if step - start >= self.window:
                return self.message(name, start, step)
        return None

    def message(self, name: str, start: int, step: int) -> str:
        """What the run says when ``name`` held from ``start`` to ``step``."""
        figure = self.last.get(name, math.nan)
        what = {"one prototype": "the target sends every image of the batch to one prototype (distinct_prototypes 1)",
                "uniform": f"the anchors' predictions are uniform over the prototypes (ce {figure:.4f} at "
                           f"log K = {self.log_k:.4f})",
                "rankme": f"the embeddings lie along about one direction (RankMe {figure:.3g} under "
                          f"collapse.rankme_below={self.rankme_below:g})"}[name]
        return (f"the run collapsed: {what} from step {start} to step {step}; usual fixes: {FIXES[name]}; "
                "collapse.stop=false trains on regardless")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
