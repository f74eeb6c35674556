"""RankMe: how many directions the embeddings of a fixed set of images spread over, without labels.

RankMe (Garrido et al., "RankMe: Assessing the downstream performance of pretrained self-supervised
representations by their rank", ICML 2023) is the effective rank of the (N, D) embedding matrix Z::

    sigma = singular values of Z,  p_k = sigma_k / sum_j sigma_j + eps,  RankMe(Z) = exp(-sum_k p_k log p_k)

It lies between 1 (every image on one line: collapse) and min(N, D) (equal spread over every direction), and the
paper finds that among runs of one method it tracks downstream accuracy. Z is used as it is (not centred), as in
the paper; ``eps = 1e-7`` as there.

This module measures it on the EMA target of a run: the backbone's CLS embedding (what evaluation and export
use), the projection head's output (what the prototypes see: MSN's collapse shows there first), and the backbone's
embedding around its mean (:func:`centred_rank`, which ranks runs better here: docs/studies.md), on a fixed
sample of the training images (:func:`sample_indices`: the same images for every run of a sweep), each evaluated
as msn-eval does (the centre ``crop_pct`` of the image). :class:`RankMeMonitor` is the training monitor
(``monitor.protocol=rankme``); :func:`rankme_report` is ``msn-eval rankme``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from msn.config import DEFAULT_CROP_PCT
from msn.errors import DataError
from msn.utils.device import autocast
from msn.utils.sampling import sample_indices

log = logging.getLogger(__name__)

RANKME_EPS = 1e-7  # Garrido et al.'s epsilon in p_k
DEFAULT_IMAGES = 1024  # the sample's size: RankMe cannot exceed it, nor the embedding width
SAMPLE_SEED = 0  # fixed: every run of a sweep is measured on the same images


def effective_rank(z: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of the (N, D) embeddings ``z``: exp of the entropy of the normalised singular values (module
    docstring), computed in float64. An all-zero ``z`` has rank 1 by convention (nothing spreads)."""
    if z.ndim != 2:
        raise ValueError(f"effective_rank takes (N, D) embeddings; got shape {tuple(z.shape)}")
    sigma = torch.linalg.svdvals(z.detach().to("cpu", torch.float64))
    total = sigma.sum()
    if not torch.isfinite(total) or total <= 0:
        return 1.0 if total == 0 else math.nan
    p = sigma / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def load_sample(dataset: Any, images: int, image_size: int, crop_pct: float = DEFAULT_CROP_PCT,
                seed: int = SAMPLE_SEED, progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """The fixed sample of ``dataset`` (index -> PIL RGB image, e.g. a training source's base dataset), each image
    resized and centre-cropped as evaluation does and kept as (N, 3, S, S) uint8 (a quarter of float32's memory;
    normalised per batch). An image that cannot be read is left out (said once); none readable is a
    :class:`DataError`."""
    from torchvision.transforms import v2

    resize = v2.Resize(int(round(image_size / crop_pct)), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    view = v2.Compose([v2.ToImage(), resize, v2.CenterCrop(image_size)])
    tic = time.perf_counter()
    chosen, unreadable = sample_indices(len(dataset), images, seed), []
    kept = []
    for i in chosen:
        try:
            kept.append(view(dataset[int(i)]))
        except (DataError, OSError, ValueError) as e:
            unreadable.append(f"{int(i)} ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})")
    if unreadable:
        log.warning(f"rankme: left {len(unreadable)} unreadable images out of its sample, e.g. image {unreadable[0]}")
    if not kept:
        raise DataError(f"rankme: none of the {len(chosen)} sampled images could be read")
    if progress is not None:
        progress(f"rankme: a fixed sample of {len(kept)} of {len(dataset)} images (seed {seed}), {image_size} px, "
                 f"read in {time.perf_counter() - tic:.1f} s")
    return torch.stack(kept)


@torch.no_grad()
def embeddings(backbone: nn.Module, head: nn.Module | None, images: torch.Tensor, mean: list[float],
               std: list[float], *, batch_size: int = 256, amp_dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D) backbone CLS embeddings and (N, D') head outputs (None without a head) of the uint8 ``images``
    (N, 3, S, S), normalised with ``mean``/``std``, in eval mode on the backbone's device; float32 on the CPU.

    The modules' train/eval modes are restored afterwards (the monitor measures the training target)."""
    device = next(backbone.parameters()).device
    modules = [m for m in (backbone, head) if m is not None]
    modes = [m.training for m in modules]
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    scale = torch.tensor(std, device=device).view(1, 3, 1, 1)
    cls, heads = [], []
    try:
        for m in modules:
            m.eval()
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255.0)
            with autocast(device, amp_dtype):
                z = backbone(x.sub_(shift).div_(scale))
                cls.append(z.float().cpu())
                if head is not None:
                    heads.append(head(z).float().cpu())
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return torch.cat(cls), (torch.cat(heads) if head is not None else None)


def centred_rank(z: torch.Tensor) -> float:
    """RankMe of the (N, D) embeddings after subtracting their mean over the N images: the effective rank of how they
    spread around their centre. Not the paper's figure (which takes ``z`` as it is), and no collapse detector (a
    collapsed ``z`` minus its mean is noise); but a ViT's normed CLS embeddings share a large mean, whose single
    direction weighs in the paper's figure for every run alike (docs/studies.md: about 3.5 for every healthy digits
    run), and with it removed the figure ranks runs by their k-NN accuracy far better there."""
    return effective_rank(z - z.mean(dim=0))


def rankme_of(backbone: nn.Module, head: nn.Module | None, images: torch.Tensor, mean: list[float],
              std: list[float], *, batch_size: int = 256, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """``{"rankme": RankMe of the backbone's embeddings, "rankme_head": of the head's, "rankme_centred": of the
    backbone's around their mean}`` (:func:`centred_rank`; no ``rankme_head`` without a head) on the uint8
    ``images``."""
    z, h = embeddings(backbone, head, images, mean, std, batch_size=batch_size, amp_dtype=amp_dtype)
    found = {"rankme": effective_rank(z)}
    if h is not None:
        found["rankme_head"] = effective_rank(h)
    found["rankme_centred"] = centred_rank(z)
    return found


class RankMeMonitor:
    """RankMe of the EMA target while pretraining (``monitor.protocol=rankme``): the backbone and the projection
    head on a fixed sample of the training images, read once at the start.

    Args:
        dataset: the run's base dataset (index -> PIL RGB image).
        images: the sample's size (``monitor.rankme_images``).
        image_size, mean, std, crop_pct: the evaluation view of each image (the model's size, the data's
            normalisation, ``monitor.crop_pct``).
        amp_dtype: the training precision's autocast dtype.
    """

    def __init__(self, dataset: Any, *, images: int, image_size: int, mean: list[float], std: list[float],
                 crop_pct: float = DEFAULT_CROP_PCT, amp_dtype: torch.dtype | None = None) -> None:
        self.images = load_sample(dataset, images, image_size, crop_pct, progress=log.info)
        self.mean, self.std, self.amp_dtype = list(mean), list(std), amp_dtype

    def __call__(self, target: nn.Module) -> dict[str, float]:
        """``{"rankme": ..., "rankme_head": ...}`` of ``target`` (an :class:`~msn.models.msn.MSNEncoder`)."""
        return rankme_of(target.backbone, target.head, self.images, self.mean, self.std, amp_dtype=self.amp_dtype)


def rankme_images(model: str, dataset: str | None) -> tuple[Any, str]:
    """The images ``msn-eval rankme`` measures on, and what the report calls them: ``dataset`` None: the training
    images of the run ``model`` belongs to (its config's ``data``); ``digits``, ``fashion_mnist`` (or a folder of its
    idx files): the training split; a folder with ``train/``: the images under ``train/``; any other folder: every
    image under it. An export, which
    does not record its data, needs ``dataset``: a :class:`~msn.errors.ConfigError` says so."""
    from pathlib import Path

    from msn.errors import ConfigError
    from msn.eval.splits import check_eval_dataset, load_splits
    from msn.utils.rundir import is_hf_export
    from msn.weights.read import is_timm_export, read_source

    if dataset is None:
        if is_hf_export(model) or is_timm_export(model):
            raise ConfigError(f"{model} is an export, which does not record the images it trained on; "
                              "pass --dataset DIR (a folder of your training images), digits or fashion_mnist")
        config = read_source(model).config
        if config is None:  # an original MSN checkpoint
            raise ConfigError(f"{model} does not record the images it trained on; pass --dataset DIR "
                              "(a folder of its training images), digits or fashion_mnist")
        from msn.data.registry import get_source

        return get_source(config.data.name).build(config.data), f"its training data ({config.data.name})"
    folder = Path(dataset).expanduser()
    if dataset not in ("digits", "fashion_mnist") and folder.is_dir() and not list(folder.glob("*-idx3-ubyte*")):
        from msn.data.sources.folder import ImageFolderDataset

        images = folder / "train" if (folder / "train").is_dir() else folder  # a labelled folder: its training split
        return ImageFolderDataset(images, where=f"--dataset {dataset}"), dataset
    check_eval_dataset(dataset, "--dataset")  # digits, Fashion-MNIST (or a folder of its idx files)
    return load_splits(dataset)[0].images, dataset


def rankme_report(model: str, *, dataset: str | None = None, images: int = DEFAULT_IMAGES, device: str = "auto",
                  precision: str = "auto", crop_pct: float = DEFAULT_CROP_PCT, batch_size: int = 256
                  ) -> dict[str, Any]:
    """``msn-eval rankme``: RankMe of the target backbone of ``model`` (anything :func:`msn.load_backbone` reads) and,
    when ``model`` holds one (a training checkpoint, a run, an original MSN file), of its projection head, on a
    fixed sample of ``images`` images of ``dataset`` (:func:`rankme_images`). The report has msn-eval's layout:
    ``results`` by setting (``backbone``, ``head``), each with ``mean`` (the RankMe), ``std`` 0, ``splits`` and
    ``dims`` (the embedding width: RankMe's ceiling with the sample's size)."""
    from msn.eval.features import load_encoder
    from msn.utils.device import autocast_dtype, resolve_device

    torch_device = resolve_device(device, option="--device")
    precision = ("bf16" if torch_device.type == "cuda" else "fp32") if precision == "auto" else precision
    source, name = rankme_images(str(model), dataset)  # first: a refusal before the weights are read
    encoder = load_encoder(model, torch_device, crop_pct)
    head = _target_head(model, torch_device)
    with_head = ", with its projection head" if head is not None else ""
    log.info(f"encoder: {model} ({encoder.backbone.arch}, {encoder.image_size} px{with_head}) on {torch_device.type} "
             f"in {precision}")
    sample = load_sample(source, images, encoder.image_size, crop_pct, progress=log.info)
    z, h = embeddings(encoder.backbone, head, sample, encoder.mean, encoder.std, batch_size=batch_size,
                      amp_dtype=autocast_dtype(precision, torch_device))
    results = {"backbone": _setting(z)}
    if h is not None:
        results["head"] = _setting(h)
    results["backbone_centred"] = {**_setting(z), "mean": centred_rank(z), "splits": [centred_rank(z)]}
    settings = {"images": len(sample), "seed": SAMPLE_SEED, "crop_pct": crop_pct, "device": torch_device.type,
                "precision": precision, "eps": RANKME_EPS}
    return {"protocol": "rankme", "model": str(model), "dataset": name if dataset is None else dataset,
            "train_images": len(sample), "test_images": 0, "settings": settings, "results": results}


def _setting(z: torch.Tensor) -> dict[str, Any]:
    rank = effective_rank(z)
    return {"mean": rank, "std": 0.0, "splits": [rank], "dims": int(z.shape[1])}


def _target_head(model: str, device: torch.device) -> nn.Module | None:
    """The EMA target's projection head of a training checkpoint, run or original MSN file (eval mode), else None."""
    from msn.utils.rundir import is_hf_export
    from msn.weights.read import is_timm_export, read_source

    if is_hf_export(model) or is_timm_export(model):
        return None
    from msn.models.heads import ProjectionHead
    from msn.weights.convert import split_encoder

    source = read_source(model)
    backbone, weights = split_encoder(source.model, "target.")
    if not weights or "cls_token" not in backbone:
        return None
    cfg, width = source.model_cfg, backbone["cls_token"].shape[-1]
    head = ProjectionHead(width, hidden_dim=cfg.head_hidden_dim, out_dim=cfg.head_output_dim,
                          num_layers=cfg.head_layers, batchnorm=cfg.head_batchnorm, sync_batchnorm=False)
    head.load_state_dict(weights)
    return head.to(device).eval()
