"""Representation quality while pretraining: any registered protocol (``monitor.protocol``, k-NN by default) on the
target backbone every ``monitor.every_steps`` steps, logged as ``metrics.csv``'s ``monitor`` column."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from msn.config import DEFAULT_CROP_PCT
from msn.eval.features import Encoder
from msn.eval.registry import EvalTask, get_protocol
from msn.eval.splits import coverage_warnings, load_splits
from msn.models.backbone import MaskedViT

log = logging.getLogger(__name__)


class Monitor:
    """A protocol's accuracy (%) of the target backbone during pretraining: the mean of its first setting, on one
    split, with the options the protocol registered for monitoring (``monitor=`` of
    :func:`~msn.eval.registry.register_protocol`) and ``options`` over them.

    The labelled splits are loaded once; every call extracts fresh features (no cache: the weights change)
    on the backbone's own device, under ``amp_dtype`` autocast when given (the training precision).

    Args:
        protocol: a registered protocol name or a protocol function's import path.
        dataset: the labelled splits (:func:`msn.eval.splits.load_splits`).
        options: ``monitor.options``: the protocol's options over its monitoring defaults.
        image_size, mean, std, crop_pct: the evaluation preprocessing.
    """

    def __init__(self, protocol: str, dataset: str, *, image_size: int, mean: list[float], std: list[float],
                 amp_dtype: torch.dtype | None = None, crop_pct: float = DEFAULT_CROP_PCT,
                 options: Mapping[str, Any] | None = None) -> None:
        self.protocol = get_protocol(protocol)
        self.options = self.protocol.resolve({**self.protocol.monitor, **(options or {})}, "monitor.options")
        self.train, self.test = load_splits(dataset)
        for line in coverage_warnings(self.train, self.test):
            log.warning(f"monitor: {line}")
        self.image_size, self.mean, self.std = image_size, list(mean), list(std)
        self.amp_dtype, self.crop_pct = amp_dtype, crop_pct

    def __call__(self, backbone: MaskedViT) -> float:
        was_training = backbone.training
        encoder = Encoder(backbone.eval(), self.image_size, self.mean, self.std, "", Path("."), self.crop_pct)
        try:
            task = EvalTask(encoder, self.train, self.test, splits=1, amp_dtype=self.amp_dtype)
            results = self.protocol.run(task, self.options)
        finally:
            backbone.train(was_training)
        return float(next(iter(results.values()))["mean"])
