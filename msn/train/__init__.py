"""The training layer: the loop (:mod:`.loop`, :func:`train`), the builder of its parts (:mod:`.builder`), one
step (:mod:`.step`), the loss and its terms (:mod:`.loss`, :mod:`.terms`), schedules and optimiser
(:mod:`.schedules`, :mod:`.optim`), checkpoints and resume (:mod:`.checkpoints`, :mod:`.resume`), reporting
(:mod:`.report`, :mod:`.loggers`) and stop signals (:mod:`.signals`).

``msn.train(...)`` is :func:`msn.train.loop.train` (this package is callable, so that the package and the function
share the name users expect); ``msn.train.train`` is the same function, loaded on first use, so that
``msn.train.loggers`` and the like are cheap to import. ``python -m msn.train`` and ``torchrun -m msn.train`` run
``msn-pretrain`` (:mod:`.__main__`).
"""

import sys
import types
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "train":
        from msn.train.loop import train

        return train
    raise AttributeError(f"module 'msn.train' has no attribute {name!r}")


class _CallablePackage(types.ModuleType):
    """``msn.train(cfg_or_overrides, ...)``: :func:`msn.train.loop.train`."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        from msn.train.loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
