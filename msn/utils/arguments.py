"""What a command checks of its arguments before any work, and before importing torch: its numbers (finite, in
range) and that it can write where its output goes. Torch-free; each failure is one :class:`ConfigError`."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from msn.errors import ConfigError

_RULE = re.compile(r"(?P<op>>=|>) (?P<bound>-?\d+(?:\.\d+)?)|(?P<open>[\[(])(?P<low>-?[\d.]+), (?P<high>-?[\d.]+)"
                   r"(?P<close>[\])])")


def check_number(option: str, value: float | None, rule: str) -> None:
    """Refuse ``value`` of ``option`` unless it is a finite number that ``rule`` allows: ``">= N"``, ``"> N"``,
    or an interval such as ``"[0, 1)"`` or ``"(0, 1]"``. None (an option left out) passes.

    A :class:`ConfigError` names the option, the value and the rule: ``--temperature 0 must be > 0``.
    """
    if value is None:
        return
    match = _RULE.fullmatch(rule)
    if match is None:
        raise ValueError(f"unknown rule {rule!r}")
    value_text = f"{value:g}" if isinstance(value, float) else str(value)
    rule_text = f"must be {rule}" if match["op"] else f"must lie in {rule}"
    if not math.isfinite(value):
        raise ConfigError(f"{option} {value_text} must be a finite number"
                          f"{' ' + rule if match['op'] else ' in ' + rule}")
    if match["op"]:
        bound = float(match["bound"])
        ok = value >= bound if match["op"] == ">=" else value > bound
    else:
        low, high = float(match["low"]), float(match["high"])
        ok = (value >= low if match["open"] == "[" else value > low) and (
            value <= high if match["close"] == "]" else value < high)
    if not ok:
        raise ConfigError(f"{option} {value_text} {rule_text}")


def check_numbers(args: Any, rules: dict[str, str]) -> None:
    """:func:`check_number` for each ``--option: rule`` of ``rules`` that the parsed ``args`` (an argparse
    namespace) has; an option of several values (``nargs``) is checked value by value."""
    for option, rule in rules.items():
        value = getattr(args, option.lstrip("-").replace("-", "_"), None)
        for v in value if isinstance(value, list | tuple) else [value]:
            check_number(option, v, rule)


def check_writable(folder: str | os.PathLike, target: str | os.PathLike, fix: str) -> None:
    """Refuse, before any work, an output that could not be written: ``folder`` (which receives ``target``,
    and may not exist yet) or else its nearest existing parent must be a folder this process may write to.

    A :class:`ConfigError`: ``cannot write TARGET: FOLDER is not writable; FIX``.
    """
    nearest = Path(folder).expanduser().absolute()
    while not os.path.exists(nearest) and nearest.parent != nearest:
        nearest = nearest.parent
    if not os.path.isdir(nearest):
        raise ConfigError(f"cannot write {target}: {nearest} is a file, not a folder; {fix}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {target}: {nearest} is not writable; {fix}")
