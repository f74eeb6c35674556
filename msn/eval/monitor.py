"""Representation quality while pretraining: the ``monitor.*`` k-NN / 5-shot accuracy of the target backbone."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from msn.config import DEFAULT_CROP_PCT
from msn.eval.features import Encoder, extract_features
from msn.eval.protocols import knn_accuracy, logistic_regression, sample_per_class
from msn.eval.splits import coverage_warnings, load_splits
from msn.models.backbone import MaskedViT


class Monitor:
    """Representation quality during pretraining: k-NN or 5-shot accuracy (%) of the target backbone.

    The labelled splits are loaded once; every call extracts fresh features (no cache: the weights change)
    on the backbone's own device, under ``amp_dtype`` autocast when given (the training precision).
    """

    def __init__(self, protocol: str, dataset: str, *, image_size: int, mean: list[float], std: list[float],
                 amp_dtype: torch.dtype | None = None, crop_pct: float = DEFAULT_CROP_PCT) -> None:
        """``protocol``: ``knn`` or ``lowshot`` (5 per class); ``dataset``: the labelled splits; rest: preprocessing."""
        self.protocol = protocol
        self.train, self.test = load_splits(dataset)
        for line in coverage_warnings(self.train, self.test):
            print(f"monitor: {line}", file=sys.stderr, flush=True)
        self.image_size, self.mean, self.std = image_size, list(mean), list(std)
        self.amp_dtype, self.crop_pct = amp_dtype, crop_pct

    def __call__(self, backbone: MaskedViT) -> float:
        was_training = backbone.training
        encoder = Encoder(backbone.eval(), self.image_size, self.mean, self.std, "", Path("."), self.crop_pct)
        try:
            x_train, x_test = (extract_features(encoder, s, None, amp_dtype=self.amp_dtype)
                               for s in (self.train, self.test))
        finally:
            backbone.train(was_training)
        if self.protocol == "knn":
            y_train, y_test = torch.from_numpy(self.train.labels), torch.from_numpy(self.test.labels)
            return knn_accuracy(x_train, y_train, x_test, y_test)
        idx = sample_per_class(self.train.labels, 5, seed=0)
        return logistic_regression(x_train.numpy()[idx], self.train.labels[idx], x_test.numpy(), self.test.labels, 1.0)
