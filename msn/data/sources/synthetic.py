"""``data=synthetic``: generated images for smoke tests (no files, no downloads). Torch-free."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from msn.config import DataConfig
from msn.data.registry import Source, register_source
from msn.errors import DataError


class SyntheticDataset:
    """Deterministic random images for smoke tests: a colour gradient plus 1-4 soft colour blobs.

    Image ``i`` depends only on ``(seed, i)``. Its label is the number of blobs minus one (4 classes), so
    an evaluation smoke test has something learnable.
    """

    max_blobs = 4

    def __init__(self, num_images: int, image_size: int, seed: int = 0) -> None:
        if num_images <= 0 or image_size <= 0:
            raise DataError(f"synthetic data needs positive sizes; got {num_images} images of {image_size} px "
                            "(data.synthetic_size, data.image_size)")
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        self.classes = [f"{n} blobs" for n in range(1, self.max_blobs + 1)]
        self.targets = [self._draw(i)[0] - 1 for i in range(num_images)]

    def __len__(self) -> int:
        return self.num_images

    def _draw(self, index: int) -> tuple[int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, index])
        return int(rng.integers(1, self.max_blobs + 1)), rng

    def __getitem__(self, index: int) -> Image.Image:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        num_blobs, rng = self._draw(index)
        coords = np.arange(self.image_size, dtype=np.float32) / self.image_size  # (s,) in [0, 1)
        c0, c1 = rng.random((2, 3), dtype=np.float32)  # gradient end colours
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None] + 1.5) / 3.0  # (s, s) in [0, 1]
        image = c0 + ramp[..., None] * (c1 - c0)  # (s, s, 3)
        for _ in range(num_blobs):
            cy, cx = rng.random(2)
            radius = rng.uniform(0.08, 0.25)
            colour = rng.random(3, dtype=np.float32)
            # a Gaussian is separable: outer product of two 1-D profiles instead of a 2-D exp
            gy, gx = (np.exp(-((coords - c) ** 2) / (2 * radius**2)).astype(np.float32) for c in (cy, cx))
            weight = np.outer(gy, gx)[..., None]  # (s, s, 1)
            image = image * (1 - weight) + colour * weight
        return Image.fromarray(np.round(image * 255).astype(np.uint8))  # (s, s, 3) uint8: RGB

    def label(self, index: int) -> int:
        return self.targets[index]




@register_source
class SyntheticSource(Source):
    """``data=synthetic``: ``data.synthetic_size`` images of ``data.image_size`` px (:class:`SyntheticDataset`)."""

    name = "synthetic"
    summary = "generated images for smoke tests: data.synthetic_size images of data.image_size px"

    def build(self, cfg: DataConfig | DictConfig) -> SyntheticDataset:
        return SyntheticDataset(cfg.synthetic_size, cfg.image_size)
