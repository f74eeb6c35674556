"""``data=digits``: scikit-learn's bundled 8x8 digits, the default (nothing is downloaded). Torch-free."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from msn.config import DataConfig
from msn.data.registry import Source, register_source


class DigitsDataset:
    """scikit-learn's bundled digits: 1797 real 8x8 grayscale images (0..16), 10 classes, no download.

    Each image is scaled to 0..255 and upsampled (PIL bicubic) to ``image_size`` px, returned as RGB.
    """

    def __init__(self, image_size: int = 32) -> None:
        from sklearn.datasets import load_digits  # deferred: sklearn's import costs ~1 s

        digits = load_digits()
        # (1797, 8, 8) in 0..16 -> uint8 0..255
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self.targets = [int(t) for t in digits.target]
        self.classes = [str(d) for d in range(10)]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        small = Image.fromarray(self.images[index])  # 2-D uint8: mode L
        return small.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC).convert("RGB")

    def label(self, index: int) -> int:
        return self.targets[index]




@register_source
class DigitsSource(Source):
    """``data=digits``: :class:`DigitsDataset` at ``data.image_size`` px."""

    name = "digits"
    summary = "scikit-learn's 1,797 bundled 8x8 digits, upsampled to data.image_size px (the default)"

    def build(self, cfg: DataConfig | DictConfig) -> DigitsDataset:
        return DigitsDataset(cfg.image_size)
