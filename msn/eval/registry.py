"""Evaluation protocols by name: what ``msn-eval PROTOCOL`` and ``monitor.protocol`` can be.

A protocol is one function, registered with :func:`register_protocol`: it takes an :class:`EvalTask` (the frozen
encoder, the labelled training and test splits, their features on demand) and its own options as keyword
arguments with defaults, and returns its results by setting (``{"5": summarise([...]), ...}``: per setting the
mean, std and each split's top-1 accuracy in %). ``msn-eval`` runs it on an exported or training model, the
trainer's monitor on the EMA target every few steps (with the options the protocol registers for that, which
keep it cheap), and both report whatever settings it returns. For example::

    from msn.eval import EvalTask, register_protocol, summarise

    @register_protocol("nearest_mean", monitor={})
    def nearest_mean(task: EvalTask, *, normalise: bool = True) -> dict:
        '''Accuracy (%) of the nearest class mean of the training features.'''
        import torch
        x, y = task.features(task.train), torch.from_numpy(task.train.labels)
        ...
        return {"100%": summarise([accuracy])}

``msn-eval nearest_mean MODEL --option normalise=false`` (with the module in ``MSN_PLUGINS``, or named by its
import path: ``msn-eval mypkg.protocols.nearest_mean MODEL``); ``monitor.protocol=nearest_mean``. Torch-free:
the built-in protocols (:mod:`msn.eval.protocols`) import torch when they run.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from msn.errors import ConfigError
from msn.utils.registry import Registry

if TYPE_CHECKING:
    import torch

    from msn.eval.features import Encoder
    from msn.eval.splits import Split


@dataclass
class EvalTask:
    """What a protocol evaluates.

    Attributes:
        encoder: the frozen backbone with its preprocessing (:class:`msn.eval.features.Encoder`).
        train, test: the labelled splits (:class:`msn.eval.splits.Split`: ``images``, ``labels``, ``classes``).
        splits: how many repetitions a protocol with random choices makes (repetition ``s`` draws with seed ``s``).
        amp_dtype: the autocast dtype the encoder runs in (None: full precision).
        batch_size: images per batch for a protocol that runs the encoder itself (fine-tuning).
        extract: split -> (N, D) features (default: computed, not cached).
        progress: where the stage lines go (``msn-eval`` prints them; None, as in the training monitor: nowhere).
    """

    encoder: Encoder
    train: Split
    test: Split
    splits: int = 3
    amp_dtype: torch.dtype | None = None
    batch_size: int = 128
    extract: Callable[[Split], torch.Tensor] | None = None
    progress: Callable[[str], None] | None = None
    _features: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def features(self, split: Split) -> torch.Tensor:
        """(N, D) float32 CPU features of ``split`` (the train or test split), extracted once per task."""
        key = id(split)
        if key not in self._features:
            if self.extract is not None:
                self._features[key] = self.extract(split)
            else:
                from msn.eval.features import extract_features

                self._features[key] = extract_features(self.encoder, split, None, amp_dtype=self.amp_dtype,
                                                       batch_size=self.batch_size)
        return self._features[key]

    def say(self, line: str) -> None:
        """Hand one progress line to :attr:`progress` (if any)."""
        if self.progress is not None:
            self.progress(line)

    def setting(self, name: str, what: str, accuracies: Callable[[], list[float]]) -> dict[str, Any]:
        """:func:`summarise` of ``accuracies()``, one setting's fits, between two progress lines: ``setting NAME:
        WHAT ...`` and ``setting NAME: MEAN +- STD % in T s`` (a fit on many features can take minutes)."""
        self.say(f"setting {name}: {what} ...")
        tic = time.perf_counter()
        result = summarise(accuracies())
        self.say(f"setting {name}: {result['mean']:.2f} +- {result['std']:.2f} % in {time.perf_counter() - tic:.1f} s")
        return result


Results = dict[str, dict[str, Any]]


def summarise(accuracies: list[float]) -> dict[str, Any]:
    """One setting's results: ``mean`` and ``std`` (%) over the splits, and each split's accuracy."""
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "splits": list(accuracies)}


@dataclass(frozen=True)
class Protocol:
    """A registered protocol: its function, and the options the training monitor runs it with."""

    name: str
    fn: Callable[..., Results]
    monitor: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """The first line of the function's docstring."""
        return (inspect.getdoc(self.fn) or self.name).splitlines()[0]

    def options(self) -> dict[str, Any]:
        """The protocol's options and their defaults (the function's keyword arguments after the task)."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in params
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def resolve(self, given: Mapping[str, Any] | None, how: str = "option") -> dict[str, Any]:
        """The defaults with ``given`` options applied; an option the protocol does not take is a
        :class:`ConfigError` (``how``: what the caller calls an option, e.g. ``--option`` or ``monitor.options``)."""
        known = self.options()
        unknown = sorted(set(given or {}) - set(known))
        if unknown:
            takes = ", ".join(known) or "no options"
            raise ConfigError(f"{how} {', '.join(unknown)} does not apply to the {self.name} protocol (it takes "
                              f"{takes})")
        return {**known, **(given or {})}

    def run(self, task: EvalTask, options: Mapping[str, Any] | None = None) -> Results:
        """The protocol on ``task`` with ``options`` (defaults for the rest)."""
        return self.fn(task, **self.resolve(options))


_PROTOCOLS: Registry[Protocol] = Registry("evaluation protocol", "protocol", builtins="msn.eval.protocols")


def register_protocol(name: str | None = None, *, monitor: Mapping[str, Any] | None = None
                      ) -> Callable[[Callable[..., Results]], Callable[..., Results]]:
    """Decorator: register a protocol function under ``name`` (default: the function's name). ``monitor``: the
    options the trainer's periodic monitor runs it with (cheap settings; one split)."""
    def decorate(fn: Callable[..., Results]) -> Callable[..., Results]:
        _PROTOCOLS.register(name or fn.__name__, Protocol(name or fn.__name__, fn, dict(monitor or {})))
        return fn
    return decorate


def _as_protocol(obj: Any) -> Protocol:
    if isinstance(obj, Protocol):
        return obj
    if callable(obj):
        return Protocol(getattr(obj, "__name__", "protocol"), obj)
    raise TypeError(f"{obj!r} is not a protocol function")


def get_protocol(name: str) -> Protocol:
    """The protocol ``name`` names: a registered name, or the import path of a protocol function."""
    return _PROTOCOLS.get(str(name), _as_protocol)


def protocol_names() -> list[str]:
    """The registered protocols' names."""
    return _PROTOCOLS.names()
