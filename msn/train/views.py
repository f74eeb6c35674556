"""The crops and masks the trainer feeds at a given step, exactly as it makes them (``msn-viz views`` and the
run's first wandb picture draw them with :func:`msn.plots.views.views_picture`).

The batch is the one the trainer draws at ``step`` (its :class:`~msn.data.loader.RunSampler` keys, views by
:class:`~msn.data.loader.MultiCropDataset`, masks by the run's :class:`~msn.models.masking.MaskGenerator`, all from
:mod:`msn.train.builder`), for process 0 of the run's processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from msn.data.loader import RunSampler
from msn.errors import DataError, VizError
from msn.train.builder import build_data, build_mask_generator, build_order


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
    # The run's data as the trainer builds it (a DataError when the batch does not fit the dataset), with
    # every view finished on the CPU whatever data.augment_on says: the picture needs no GPU.
    data = build_data(cfg, device=torch.device("cpu"), world=world_size)
    order = build_order(cfg, data, rank=0, world=world_size)
    keys = next(iter(RunSampler(order, d.batch_size, d.drop_last, start_step=step)))
    batch_size = len(keys)
    keys = keys[:count]
    batch = data.dataset.__getitems__(keys)
    if batch.error is not None:
        raise DataError(batch.error)
    # decoded and cut here when the run decodes on its device (data.decode_on=device), finished here when its
    # photometric stage runs there (data.augment_on=device): the trainer's views either way
    views = data.transform.finish(data.decode(batch)).views()
    patch = cfg.model.patch_size
    grid = d.global_size // patch
    masks = build_mask_generator(cfg)(step, batch_size, anchor_size=d.global_size, focal_size=d.focal_size,
                                      num_focal=d.num_focal, rank=0, world_size=world_size)
    dropped = np.zeros((len(keys), grid * grid), dtype=bool)
    if masks.anchor_keep is not None:
        dropped[:] = True
        keep = masks.anchor_keep[:len(keys)].numpy()  # (count, K) indices of the kept patches
        np.put_along_axis(dropped, keep, False, axis=1)
    return TrainerViews(views, dropped.reshape(len(keys), grid, grid), keys, step)
