"""msn-viz views: the crops and masks the trainer feeds at a given step, exactly as it makes them.

The batch is the one the trainer draws at ``step`` (its :class:`~msn.data.RunSampler` keys, views by
:class:`~msn.data.MultiCropDataset`, masks by the run's :class:`~msn.masking.MaskGenerator`), for
process 0 of the run's processes; the first ``count`` images of it are shown, one row each:
target view, anchor view with its dropped patches painted grey, then the focal views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from msn.data import (
    DataError,
    EpochSampler,
    MultiCropDataset,
    MultiCropTransform,
    RunSampler,
    build_dataset,
    steps_per_epoch,
)
from msn.errors import VizError
from msn.plots.common import GREY, mosaic, to_display, upscale
from msn.step import build_mask_generator


@dataclass
class TrainerViews:
    """The first images of one training batch.

    Attributes:
        views: ``[target, anchor, focal_1, ...]``, each (count, 3, S, S), normalised as the model sees them.
        dropped: (count, S/p, S/p) bool, True where the anchor view's patch is dropped (all False unmasked).
        keys: the (epoch, index) keys of the images.
        step: the training step of the batch.
    """

    views: list[torch.Tensor]
    dropped: np.ndarray
    keys: list[tuple[int, int]]
    step: int


def world_size_of(run_dir: Path | None) -> int:
    """The number of processes a run was trained with (``RUN_DIR/run.json``; 1 without one)."""
    layout = run_dir / "run.json" if run_dir is not None else None
    if layout is None or not layout.is_file():
        return 1
    return int(json.loads(layout.read_text()).get("world_size", 1))


def trainer_views(cfg: DictConfig, step: int, count: int, world_size: int = 1) -> TrainerViews:
    """The views and anchor masks of the first ``count`` images of process 0's batch at ``step``."""
    if step < 0 or count < 1:
        raise VizError(f"--step {step} and --count {count}: the step must be >= 0 and the count >= 1")
    d = cfg.data
    base = build_dataset(d)
    steps_per_epoch(len(base), d, world_size)  # a DataError when the batch does not fit the dataset
    order = EpochSampler(len(base), num_replicas=world_size, rank=0, shuffle=True, seed=cfg.seed,
                         drop_last=d.drop_last)
    keys = next(iter(RunSampler(order, d.batch_size, d.drop_last, start_step=step)))
    batch_size = len(keys)
    keys = keys[:count]
    dataset = MultiCropDataset(base, MultiCropTransform(d), seed=cfg.seed)
    batch = dataset.__getitems__(keys)
    if batch.error is not None:
        raise DataError(batch.error)
    views = batch.views()
    patch = cfg.model.patch_size
    grid = d.global_size // patch
    masks = build_mask_generator(cfg)(step, batch_size, d.global_size, d.focal_size, d.num_focal,
                                      rank=0, world_size=world_size)
    dropped = np.zeros((len(keys), grid * grid), dtype=bool)
    if masks.anchor_keep is not None:
        dropped[:] = True
        keep = masks.anchor_keep[:len(keys)].numpy()  # (count, K) indices of the kept patches
        np.put_along_axis(dropped, keep, False, axis=1)
    return TrainerViews(views, dropped.reshape(len(keys), grid, grid), keys, step)


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


def views_picture(tv: TrainerViews, mean: list[float], std: list[float], cell: int) -> Image.Image:
    """The grid: one row per image, columns target | anchor (dropped patches grey) | focal_1 ... focal_n.

    Every view is scaled to ``cell`` x ``cell`` px by nearest neighbour, so the picture is
    ``(2 + n) * cell`` px wide and ``count * cell`` px high.
    """
    shown = [to_display(v, mean, std) for v in tv.views]  # per view position: (count, S, S, 3)
    rows = []
    for i in range(len(tv.keys)):
        row = [upscale(shown[0][i], cell), upscale(grey_out(shown[1][i], tv.dropped[i]), cell)]
        row += [upscale(v[i], cell) for v in shown[2:]]
        rows.append(row)
    labels = ["target", "anchor"] + [f"focal {k}" for k in range(1, len(shown) - 1)]
    return mosaic(rows, cell, labels)
