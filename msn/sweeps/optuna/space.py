"""The search space of ``hydra/sweeper=optuna``: sweep overrides in Hydra's grammar as Optuna distributions.

``interval(a, b)`` a float between a and b (``tag(log, ...)``: on a log scale, ``tag(int, ...)``: an integer),
``choice(a, b)`` or ``a,b`` one of the values, ``range(a, b[, step])`` one of Python's range; plain overrides are the
same for every trial (:func:`parse_space`). Optuna is imported when a space is parsed, not with this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from msn.errors import ConfigError

if TYPE_CHECKING:
    from hydra.core.config_loader import ConfigLoader
    from hydra.core.override_parser.types import Override
    from optuna.distributions import BaseDistribution

INTERVAL_TAGS = ("log", "int")


@dataclass
class SearchSpace:
    """A search's overrides: the dimensions (key -> Optuna distribution) and the fixed overrides, in the order given
    (a later override of a key replaces an earlier one: the command line over ``hydra.sweeper.params``)."""

    dimensions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)  # key -> the override as typed ("experiment=cpu_smoke")
    order: list[str] = field(default_factory=list)  # every key, in the order given

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """One job's overrides: the fixed ones, and ``params`` (a trial's values) for the dimensions."""
        return [self.fixed[key] if key in self.fixed else f"{key}={self.value_text(key, params[key])}"
                for key in self.order]

    def value_text(self, key: str, value: Any) -> str:
        """A dimension's value as its override's text: a float to 6 significant digits (``0.00125207``, not
        ``0.0012520653814999472``) where that stays within the interval, else in full."""
        dist = self.dimensions.get(key)
        if isinstance(value, float) and dist is not None and hasattr(dist, "low"):
            short = f"{value:.6g}"
            if dist.low <= float(short) <= dist.high:
                return short if any(c in short for c in ".en") else f"{short}.0"
        return override_value(value)

    def corners(self) -> list[list[str]]:
        """The jobs at the corners of the space, enough to check every value it can take before any trial runs:
        every dimension at its first value (an interval's low end, a choice's first value), then each other
        extreme value (an interval's high end, every other choice) with the other dimensions at their first."""
        ends = {key: corner_values(dist) for key, dist in self.dimensions.items()}
        first = {key: values[0] for key, values in ends.items()}
        jobs = [self.overrides(first)]
        for key, values in ends.items():
            jobs += [self.overrides({**first, key: value}) for value in values[1:]]
        return jobs


def parse_space(overrides: Sequence[str], config_loader: ConfigLoader | None = None) -> SearchSpace:
    """The :class:`SearchSpace` of ``overrides`` (``hydra.sweeper.params`` as ``key=value`` first, then the command
    line's), in Hydra's override grammar; a :class:`ConfigError` naming the override for one that is not a search
    dimension Optuna can sample (``interval(1)``, a reversed interval, an unknown tag, an empty choice)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if config_loader is None and GlobalHydra.instance().is_initialized():  # glob(...) lists a group's options
        config_loader = GlobalHydra.instance().config_loader()
    parser = OverridesParser.create(config_loader=config_loader)
    space = SearchSpace()
    for line in overrides:
        try:
            (override,) = parser.parse_overrides([line])
            key = override.get_key_element()
            dist = distribution(override)
        except ConfigError as e:
            raise ConfigError(f"{line}: {e}") from None
        except HydraException as e:  # the grammar's own error: its first line names the problem
            raise ConfigError(f"{line} is not a search dimension: {_grammar_error(e)}") from None
        space.fixed.pop(key, None)
        space.dimensions.pop(key, None)
        if key in space.order:
            space.order.remove(key)
        space.order.append(key)
        if dist is None:
            space.fixed[key] = override.input_line or line
        else:
            space.dimensions[key] = dist
    return space


def distribution(override: Override) -> BaseDistribution | None:
    """The Optuna distribution of one parsed override, None for a plain (fixed) one: ``interval`` -> a
    ``FloatDistribution`` (``tag(log, ...)``: log scale; ``tag(int, ...)``: an ``IntDistribution``), ``range`` -> an
    ``IntDistribution`` over Python's range (a float or shuffled one: its values, categorical), ``choice(...)``,
    ``a,b,c`` and ``glob(...)`` -> a ``CategoricalDistribution``."""
    from hydra.core.override_parser.types import IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    if isinstance(value, IntervalSweep):
        unknown = sorted(set(value.tags) - set(INTERVAL_TAGS))
        if unknown:
            raise ConfigError(f"unknown tag {', '.join(unknown)} of an interval; its tags are "
                              f"{', '.join(INTERVAL_TAGS)}")
        low, high, log = value.start, value.end, "log" in value.tags
        assert low is not None and high is not None  # (the grammar requires both)
        if not low < high:
            raise ConfigError(f"an interval's low end must be below its high end (got {low:g} and {high:g})")
        if log and low <= 0:
            raise ConfigError(f"a log-scale interval must be above 0 (got a low end of {low:g})")
        if "int" in value.tags:
            if low != int(low) or high != int(high):
                raise ConfigError(f"an int interval needs whole-number ends (got {low:g} and {high:g})")
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if getattr(value, "tags", None):  # (a glob has none)
        raise ConfigError(f"tags ({', '.join(sorted(value.tags))}) apply to an interval only")
    if isinstance(value, RangeSweep) and not value.shuffle:
        values = list(override.sweep_iterator(transformer=Transformer.identity))
        if not values:
            raise ConfigError("the range is empty")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            step = abs(int(value.step)) if len(values) > 1 else 1
            return IntDistribution(min(values), max(values), step=step)
    choices = [_choice(v) for v in override.sweep_iterator(transformer=Transformer.identity)]
    if not choices:
        raise ConfigError("the choice has no values")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"a value is listed twice ({', '.join(override_value(c) for c in choices)})")
    return CategoricalDistribution(choices)


def _choice(value: Any) -> None | bool | int | float | str:
    """A choice's value as Optuna stores it: a number, a bool or None as itself, anything else (a string, a quoted
    string, a list) as its override text (``vit_tiny``, ``'a b'``, ``[1,2]``), which :func:`override_value` keeps."""
    from hydra.core.override_parser.types import Override

    if value is None or isinstance(value, bool | int | float):
        return value
    return Override._get_value_element_as_str(value)


def override_value(value: Any) -> str:
    """A trial's value as the text after ``key=`` (``1e-05``, ``64``, ``true``, ``null``, a choice's own text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def corner_values(dist: BaseDistribution) -> list[Any]:
    """The values of a dimension worth checking before a search: an interval's ends, a range's first and last
    value, every choice."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]  # type: ignore[attr-defined]  # Float- and IntDistribution


def grid_values(key: str, dist: BaseDistribution) -> list[Any]:
    """Every value of a discrete dimension (``sampler=grid``); a :class:`ConfigError` for an interval."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    raise ConfigError(f"hydra.sweeper.sampler=grid needs discrete dimensions (choice, a,b,c or range); {key} is an "
                      "interval: give it as a list of values, or use sampler=tpe or random")


def _grammar_error(error: BaseException) -> str:
    """What Hydra's override parser found wrong (the line under its "Error parsing override '...'")."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("Error parsing override", "See https://"))]
    return (said or lines or [type(error).__name__])[0]


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
