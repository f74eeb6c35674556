"""How a sweep ranks its jobs (``sweep.rank_by``): by a final figure of each job's summary row, best first.

``rankme_centred`` (the default): RankMe of the target backbone's embeddings around their mean on a fixed sample of
the training images (:func:`msn.eval.rankme.centred_rank`), higher is better, no labels needed: of the label-free
figures it ranked runs best in docs/studies.md; ``rankme``: the paper's RankMe of the same embeddings
(:mod:`msn.eval.rankme`); ``knn``: the labelled monitor's last accuracy
(``monitor.protocol``, k-NN by default), higher is better; ``loss``: the final training loss, lower is better (a
collapsed run can have a low loss: docs/studies.md). A job that failed or collapsed ranks after every job that
finished or stopped, whatever its figure; a job without the figure ranks after those with one. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from msn.config.schema import RANK_BY
from msn.errors import ConfigError


@dataclass(frozen=True)
class RankMetric:
    """A figure jobs are ranked by: the summary columns that hold it (the first one a row has is used) and whether
    higher is better."""

    name: str
    columns: tuple[str, ...]
    maximize: bool
    hint: str  # how a run logs it, for a summary where no job has it

    @property
    def direction(self) -> str:
        """Optuna's word for it: ``maximize`` or ``minimize``."""
        return "maximize" if self.maximize else "minimize"


RANK_METRICS: dict[str, RankMetric] = {
    "rankme_centred": RankMetric("rankme_centred", ("final_rankme_centred", "eval/rankme/backbone_centred"), True,
                                 "monitor.protocol=rankme (or [knn,rankme]) monitor.every_steps=N, or msn-eval rankme "
                                 "RUN_DIR"),
    "rankme": RankMetric("rankme", ("final_rankme", "eval/rankme/backbone"), True,
                         "monitor.protocol=rankme (or [knn,rankme]) monitor.every_steps=N, or msn-eval rankme RUN_DIR"),
    "knn": RankMetric("knn", ("final_monitor", "eval/knn/100%"), True,
                      "monitor.every_steps=N with a labelled monitor.dataset, or msn-eval knn RUN_DIR"),
    "loss": RankMetric("loss", ("final_loss",), False, "every run logs it"),
}
assert tuple(RANK_METRICS) == RANK_BY, "sweep.rank_by's allowed values and the rankings must agree"
BAD_STATUSES = ("failed", "collapsed")  # ranked last, whatever their figure


def rank_metric(rank_by: str) -> RankMetric:
    """The :class:`RankMetric` named ``rank_by``; a :class:`ConfigError` for any other name."""
    if rank_by not in RANK_METRICS:
        raise ConfigError(f"sweep.rank_by={rank_by!r} is not a ranking; choose one of {', '.join(RANK_METRICS)}")
    return RANK_METRICS[rank_by]


def rank_value(row: Mapping[str, Any], rank_by: str) -> float | None:
    """The figure ``row`` is ranked by (a float), or None when the job has none (or a NaN)."""
    for column in rank_metric(rank_by).columns:
        value = row.get(column)
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if number == number:  # not NaN
            return number
    return None


def ranked(rows: Sequence[Mapping[str, Any]], rank_by: str) -> list[Mapping[str, Any]]:
    """``rows`` best first by ``rank_by``: jobs that finished or stopped by their figure, then those without one,
    then failed and collapsed jobs (in that order each: by figure, job order for ties)."""
    metric = rank_metric(rank_by)

    def key(indexed: tuple[int, Mapping[str, Any]]) -> tuple[int, int, float, int]:
        index, row = indexed
        value = rank_value(row, rank_by)
        bad = 1 if row.get("status") in BAD_STATUSES else 0
        figure = 0.0 if value is None else (-value if metric.maximize else value)
        return bad, int(value is None), figure, index

    return [row for _, row in sorted(enumerate(rows), key=key)]
