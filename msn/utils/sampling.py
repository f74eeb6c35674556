"""A fixed sample of a data set's indices: the same images for the same arguments, in every run and process
(RankMe's sample, the fitted plan's size measurement). numpy only."""

from __future__ import annotations

import numpy as np


def sample_indices(available: int, images: int, seed: int = 0) -> np.ndarray:
    """``min(images, available)`` distinct image indices in ``range(available)``, drawn with ``seed``, sorted."""
    count = min(int(images), int(available))
    return np.sort(np.random.default_rng(seed).choice(available, size=count, replace=False))
