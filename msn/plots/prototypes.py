"""msn-viz prototypes: how the target encoder spreads a dataset over the prototypes, and what each one holds.

Every image (evaluation preprocessing) goes through the target encoder and head; its prototype is the
argmax of the cosine similarity to the prototypes (what the loss sharpens towards). A collapsed run
uses a handful; a healthy one spreads over most of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msn.config import DEFAULT_CROP_PCT
from msn.errors import VizError
from msn.eval.features import Encoder, TransformedImages, eval_transform
from msn.models.msn import MSN
from msn.plots.common import new_figure, to_display
from msn.utils.rundir import is_hf_export
from msn.weights.read import read_source


@dataclass
class PrototypeUse:
    """Assignments of N images to K prototypes.

    Attributes:
        counts: (K,) images whose target argmax is each prototype.
        assigned: (N,) the prototype of each image.
        similarity: (N, K) cosine similarity of each image's target output to each prototype.
    """

    counts: np.ndarray
    assigned: np.ndarray
    similarity: np.ndarray

    @property
    def unused(self) -> int:
        return int((self.counts == 0).sum())


def load_model(source: Path, crop_pct: float = DEFAULT_CROP_PCT) -> tuple[MSN, Encoder, str | None]:
    """The whole MSN model of a training checkpoint or run directory (target head and prototypes included),
    its target backbone as an :class:`Encoder` (for the preprocessing, the centre ``crop_pct`` of each image),
    and the ``data.name`` it was trained on (None for an original MSN checkpoint)."""
    if is_hf_export(source):
        raise VizError(f"{source} is a Hugging Face export, which holds the backbone only; the prototypes and the "
                       "head are in the training checkpoint: give the run directory or checkpoints/last.pt")
    src = read_source(source)
    model = MSN(src.model_cfg)
    try:
        missing, unexpected = model.load_state_dict(src.model, strict=False)
    except RuntimeError as err:  # a shape that does not fit the model its own config describes
        raise VizError(f"{source}: its weights do not fit the model its config describes "
                       f"({str(err).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise VizError(f"{source} does not hold a whole MSN model (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}); give a training checkpoint or run directory")
    model.eval()
    encoder = Encoder(model.target.backbone, int(src.model_cfg.img_size), *src.mean_std(), "", source, crop_pct)
    return model, encoder, (str(src.config.data.name) if src.config is not None else None)


@torch.no_grad()
def prototype_use(model: MSN, encoder: Encoder, images, batch_size: int = 256) -> PrototypeUse:
    """Assign every image of ``images`` (a dataset of PIL images) to its target prototype."""
    loader = torch.utils.data.DataLoader(TransformedImages(images, eval_transform(encoder)), batch_size=batch_size)
    protos = F.normalize(model.prototypes.detach(), dim=1)  # (K, D)
    sims = [F.normalize(model.target(x), dim=1) @ protos.T for x in loader]  # (b, K) each
    similarity = torch.cat(sims).numpy()
    assigned = similarity.argmax(axis=1)
    counts = np.bincount(assigned, minlength=protos.shape[0])
    return PrototypeUse(counts, assigned, similarity)


def prototypes_figure(use: PrototypeUse, images, encoder: Encoder, *, show: int = 4, per_prototype: int = 6,
                      width: int = 1400, height: int = 700):  # -> matplotlib Figure
    """Left: prototype use sorted (how many images each is the argmax of; the share never used).
    Right: for the ``show`` most used prototypes, the ``per_prototype`` images most similar to each."""
    if len(use.assigned) == 0:
        raise VizError("no images to assign to prototypes")
    fig = new_figure(width, height)
    grid = fig.add_gridspec(show, per_prototype + 4, left=0.06, right=0.99, top=0.9, bottom=0.1, wspace=0.1,
                            hspace=0.15)
    bars = fig.add_subplot(grid[:, :3])
    order = np.argsort(-use.counts, kind="stable")
    bars.bar(np.arange(len(order)), use.counts[order], width=1.0, color="C0")
    k = len(use.counts)
    bars.set_title(f"{len(use.assigned)} images over {k} prototypes: {use.unused} never used "
                   f"({100 * use.unused / k:.0f} %)", fontsize=9)
    bars.set_xlabel("prototypes, most used first", fontsize=8)
    bars.set_ylabel("images (target argmax)", fontsize=8)
    bars.tick_params(labelsize=7)
    transform = eval_transform(encoder)
    for row, proto in enumerate(order[:show]):
        nearest = np.argsort(-use.similarity[:, proto], kind="stable")[:per_prototype]
        pixels = to_display(torch.stack([transform(images[int(i)]) for i in nearest]), encoder.mean, encoder.std)
        for col, picture in enumerate(pixels):
            ax = fig.add_subplot(grid[row, 4 + col])
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"#{proto}\n{use.counts[proto]} img", fontsize=7)
    fig.suptitle("nearest images of the most used prototypes (right)", x=0.7, fontsize=9)
    return fig
