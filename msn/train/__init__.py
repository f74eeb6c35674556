"""The training layer: the loop (:mod:`.loop`, :func:`train`), the builder of its parts (:mod:`.builder`), one
step (:mod:`.step`), the loss (:mod:`.loss`), schedules and optimiser (:mod:`.schedules`, :mod:`.optim`),
checkpoints and resume (:mod:`.checkpoints`, :mod:`.resume`), reporting (:mod:`.report`, :mod:`.loggers`)
and stop signals (:mod:`.signals`).

``msn.train.train`` is loaded on first use, so that ``msn.train.loggers`` and the like are cheap to import.
``python -m msn.train`` and ``torchrun -m msn.train`` run ``msn-pretrain`` (:mod:`.__main__`).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "train":
        from msn.train.loop import train

        return train
    raise AttributeError(f"module 'msn.train' has no attribute {name!r}")
