"""A map-style dataset of the user's own: coloured discs on noise, a class per colour, with one unreadable item."""

from __future__ import annotations

import numpy as np
from PIL import Image

from msn.config import DataConfig
from msn.data import Source, register_source

COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230)]


class Discs:
    """``n`` images of ``size`` px: a disc of one of three colours; item ``broken`` raises OSError, as a corrupt
    file does. Items are ``(image, label)`` tuples, as torchvision's datasets return them."""

    def __init__(self, n: int = 48, size: int = 32, broken: int | None = 5) -> None:
        self.n, self.size, self.broken = n, size, broken

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if index == self.broken:
            raise OSError(f"disc {index}: truncated file")
        rng = np.random.default_rng(index)
        label = index % len(COLOURS)
        pixels = rng.integers(0, 60, (self.size, self.size, 3)).astype(np.uint8)
        yy, xx = np.mgrid[:self.size, :self.size]
        cy, cx = rng.uniform(0.3, 0.7, 2) * self.size
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < (self.size * rng.uniform(0.2, 0.35)) ** 2
        pixels[inside] = COLOURS[label]
        return Image.fromarray(pixels), label


class DiscImages(Discs):
    """The discs as a base dataset: a source's items are the images alone."""

    def __getitem__(self, index: int) -> Image.Image:
        return super().__getitem__(index)[0]


@register_source
class DiscsSource(Source):
    """``data.name=discs``: the discs as a registered source (its size from data.synthetic_size)."""

    name = "discs"
    summary = "coloured discs (msnplugin)"

    def build(self, cfg: DataConfig) -> DiscImages:
        return DiscImages(cfg.synthetic_size, cfg.image_size, broken=None)

    def where(self, cfg: DataConfig) -> str:
        return f"{cfg.synthetic_size} discs"


class ImageFiles:
    """The images under ``root`` in the order data=folder lists them (sorted paths), opened with PIL: the same
    pictures as data.root=ROOT, through a class of the user's own."""

    def __init__(self, root: str) -> None:
        from pathlib import Path

        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".png"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as image:
            image.load()
            return image
