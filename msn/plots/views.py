"""msn-viz views: the picture of the trainer's views (:func:`msn.train.views.trainer_views`), one row per
image: target view, anchor view with its dropped patches painted grey, then the focal views; ``msn-viz`` saves it
with a legend that says what the grey patches are (:func:`views_figure`)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from msn.plots.common import GREY, framed_figure, mosaic, to_display, upscale

LEGEND_PX = 32  # the strip under the grid that holds the legend
DROPPED_LABEL = "dropped patch of the anchor view\n(masked: the encoder never sees it)"


def grey_out(image: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 with every patch where ``dropped`` (g, g) is True painted GREY."""
    out = image.copy()
    patch = image.shape[0] // dropped.shape[0]
    for r, c in zip(*np.nonzero(dropped), strict=True):
        out[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = GREY
    return out


def default_cell(global_size: int, minimum: int = 96) -> int:
    """Cell side in px: the smallest multiple of the global view's side that is at least ``minimum``."""
    return global_size * max(1, -(-minimum // global_size))


def views_picture(views: list[torch.Tensor], dropped: np.ndarray, *, mean: list[float], std: list[float],
                  cell: int) -> Image.Image:
    """The grid: one row per image, columns target | anchor (dropped patches grey) | focal_1 ... focal_n.

    ``views``: ``[target, anchor, focal_1, ...]``, each (count, 3, S, S) normalised with ``mean`` / ``std``;
    ``dropped``: (count, S/p, S/p) bool, True where the anchor's patch is dropped.

    Every view is scaled to ``cell`` x ``cell`` px by nearest neighbour, so the picture is
    ``(2 + n) * cell`` px wide and ``count * cell`` px high.
    """
    shown = [to_display(v, mean, std) for v in views]  # per view position: (count, S, S, 3)
    rows = []
    for i in range(len(dropped)):
        row = [upscale(shown[0][i], cell), upscale(grey_out(shown[1][i], dropped[i]), cell)]
        row += [upscale(v[i], cell) for v in shown[2:]]
        rows.append(row)
    labels = ["target", "anchor"] + [f"focal {k}" for k in range(1, len(shown) - 1)]
    return mosaic(rows, cell, labels)


def views_figure(views: list[torch.Tensor], dropped: np.ndarray, *, mean: list[float], std: list[float],
                 cell: int):  # -> matplotlib Figure
    """:func:`views_picture`'s grid, pixel for pixel, above a :data:`LEGEND_PX` px strip whose legend says what
    the grey patches are: ``(2 + n) * cell`` x ``count * cell + LEGEND_PX`` px."""
    from matplotlib.patches import Patch

    fig = framed_figure(views_picture(views, dropped, mean=mean, std=std, cell=cell), bottom=LEGEND_PX)
    grey = (GREY / 255,) * 3
    fig.legend(handles=[Patch(facecolor=grey, edgecolor="black", linewidth=0.5, label=DROPPED_LABEL)],
               loc="lower left", bbox_to_anchor=(0, 0), fontsize=7, frameon=False, borderpad=0.3,
               handlelength=1.5, handleheight=1.5)
    return fig
