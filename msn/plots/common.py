"""Shared pieces of the pictures: PNG writing, display conversions, mosaics of equal cells."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from msn.plots import check_png_path

GREY = 128  # the value a dropped patch is painted with


def to_display(views: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (N, 3, S, S) views -> (N, S, S, 3) uint8 RGB: ``round(255 * clamp(x * std + mean))``."""
    m = torch.tensor(list(mean), dtype=views.dtype).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=views.dtype).view(1, 3, 1, 1)
    pixels = (views.detach().cpu() * s + m).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def upscale(image: np.ndarray, cell: int) -> np.ndarray:
    """(S, S, 3) uint8 -> (cell, cell, 3), nearest neighbour (every source pixel stays a visible block)."""
    return np.asarray(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST))


def mosaic(cells: Sequence[Sequence[np.ndarray]], cell: int, labels: Sequence[str] = ()) -> Image.Image:
    """Rows of (cell, cell, 3) uint8 images -> one RGB image of (columns * cell) x (rows * cell) px.

    ``labels`` (one per column) are written small into the top-left corner of the first row's cells.
    """
    rows, cols = len(cells), max(len(r) for r in cells)
    canvas = np.full((rows * cell, cols * cell, 3), 255, dtype=np.uint8)
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            canvas[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = image
    picture = Image.fromarray(canvas)
    if labels:
        draw = ImageDraw.Draw(picture)
        for c, text in enumerate(labels):
            draw.text((c * cell + 2, 1), text, fill=(255, 255, 0), stroke_width=1, stroke_fill=(0, 0, 0))
    return picture


def save_png(picture: Image.Image | object, out: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a PIL image or a matplotlib figure to ``out`` (a .png path; folders are created)."""
    path = check_png_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(picture, Image.Image):
        picture.save(path, format="PNG")
    else:  # a matplotlib Figure, at its own fixed size (no tight bounding box: the size stays as set)
        import matplotlib.pyplot as plt

        picture.savefig(path, format="png", dpi=dpi)
        plt.close(picture)
    return path


def framed_figure(picture: Image.Image, *, top: int = 0, right: int = 0, bottom: int = 0, dpi: int = 100):
    """A matplotlib figure that holds ``picture`` pixel for pixel (placed, not resampled) below a ``top`` px strip,
    with a ``right`` px strip beside it and a ``bottom`` px strip under it, left free for a title, a colour bar or
    a legend; saved by :func:`save_png`, the PNG is ``width + right`` x ``top + height + bottom`` px."""
    fig = new_figure(picture.width + right, top + picture.height + bottom, dpi)
    fig.figimage(np.asarray(picture.convert("RGB")), xo=0, yo=bottom, origin="upper")
    return fig


def new_figure(width_px: int, height_px: int, dpi: int = 100):  # -> matplotlib Figure
    """A matplotlib figure of exactly ``width_px`` x ``height_px`` pixels at ``dpi`` (Agg backend: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
