"""What ``import msn`` offers a Python user: a backbone from any weights we read, its features, a fresh one.

    backbone, transform = msn.load_backbone("outputs/default")      # or a checkpoint, HF / timm export, .pth.tar
    features = msn.extract_features(backbone, ["cat.jpg", "dog.jpg"])      # (2, D) CLS features

``msn.train`` (pretraining) is :func:`msn.train.loop.train`. The backbone is a timm VisionTransformer
(:class:`~msn.models.backbone.MaskedViT`): ``backbone(x)`` gives the CLS token after the final norm, (B, D), and
``backbone.pretrained_cfg`` its preprocessing in timm's terms (``timm.data.resolve_data_config(model=backbone)``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from msn.config import DEFAULT_CROP_PCT
from msn.config.arch import resolve_arch
from msn.data.images import load_rgb
from msn.eval.features import centre_crop_transform, cls_features, load_encoder, timm_pretrained_cfg
from msn.models.backbone import MaskedViT
from msn.weights.convert import check_compatible
from msn.weights.read import IMAGENET_MEAN, IMAGENET_STD, read_backbone

Transform = Callable[[Image.Image], torch.Tensor]


def load_backbone(path: str | os.PathLike, *, device: str | torch.device = "cpu", encoder: str = "target",
                  crop_pct: float = DEFAULT_CROP_PCT) -> tuple[MaskedViT, Transform]:
    """The pretrained backbone at ``path`` and its evaluation transform.

    Args:
        path: a run directory (its ``checkpoints/last.pt``), a training checkpoint, a Hugging Face ViTMSN export,
            a timm export (a folder with ``timm_config.json``, or its ``.safetensors`` file) or an original MSN
            ``*.pth.tar``.
        device: where the backbone goes.
        encoder: ``target`` (the EMA encoder, as the paper evaluates and exports) or ``online`` (runs and
            checkpoints only).
        crop_pct: the evaluation view's centre share (the paper's 224/256; 1: the whole image).
    Returns:
        ``(backbone, transform)``: the backbone in eval mode (``backbone(x)``: (B, 3, S, S) -> (B, D) CLS
        features), and PIL image -> (3, S, S) tensor: resize, centre crop, normalise as it was trained.
    """
    loaded = load_encoder(path, device, crop_pct, encoder=encoder)
    return loaded.backbone, centre_crop_transform(loaded.image_size, loaded.mean, loaded.std, crop_pct)


def create_backbone(arch: str | None = "vit_small", *, patch_size: int = 16, img_size: int = 224,
                    embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
                    mlp_ratio: float | None = None, drop_path_rate: float = 0.0, weight_init: str = "msn",
                    weights: str | os.PathLike | None = None) -> MaskedViT:
    """A ViT backbone as MSN trains it (timm's VisionTransformer with token dropping), like timm's
    ``create_model``.

    ``arch``: a preset (``vit_pico``, ``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``, ``vit_huge``) with
    any of ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio`` replaced, or None with all of them given.
    ``weights``: load these (anything :func:`load_backbone` reads); they must fit the architecture (a mismatch
    names the differing keys). Otherwise the weights are initialised as the original MSN code does
    (``weight_init="msn"``) or as timm does (``"timm"``), from torch's global generator.
    """
    backbone = MaskedViT(resolve_arch(arch, embed_dim, depth, num_heads, mlp_ratio), patch_size, img_size,
                         drop_path_rate, weight_init)
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if weights is not None:
        found = read_backbone(weights)
        check_compatible(backbone.state_dict(), found.backbone, f"weights={weights}")
        backbone.load_state_dict(found.backbone)
        mean, std = found.mean, found.std
    backbone.pretrained_cfg = timm_pretrained_cfg(img_size, mean, std)
    return backbone


def _default_transform(backbone: torch.nn.Module) -> Transform:
    """The evaluation transform that ``backbone.pretrained_cfg`` describes (ImageNet's normalisation without one)."""
    cfg: dict[str, Any] = getattr(backbone, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, backbone.patch_embed.img_size[0]))[-1])
    return centre_crop_transform(size, list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD)),
                                 float(cfg.get("crop_pct", DEFAULT_CROP_PCT)))


def _batches(images: Any, transform: Transform, batch_size: int, num_workers: int) -> Iterable[torch.Tensor]:
    """(B, 3, S, S) batches of ``images``: a DataLoader's (its batches' first element when they are tuples), or
    PIL images / image files / a dataset of either (items may be ``(image, label)``) through ``transform``."""
    if isinstance(images, DataLoader):
        for batch in images:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch
        return

    class _Transformed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int) -> torch.Tensor:
            item = images[i]
            item = item[0] if isinstance(item, (tuple, list)) else item
            if isinstance(item, (str, os.PathLike)):
                item = load_rgb(Path(item))
            if isinstance(item, torch.Tensor):
                return item
            return transform(item.convert("RGB") if isinstance(item, Image.Image) else item)

    yield from DataLoader(_Transformed(), batch_size=batch_size, num_workers=num_workers)


@torch.no_grad()
def extract_features(backbone: MaskedViT, images: Sequence[Any] | DataLoader, *, transform: Transform | None = None,
                     batch_size: int = 64, num_workers: int = 0, feature: str = "cls",
                     last_blocks: int = 1) -> torch.Tensor:
    """(N, last_blocks * D) float32 CPU features of ``images``, in order.

    Args:
        backbone: from :func:`load_backbone` or :func:`create_backbone` (it stays on its device; it runs in eval
            mode, and its mode is restored after).
        images: PIL images, image file paths, a dataset of either (items may be ``(image, label)``), or a
            DataLoader of preprocessed (B, 3, S, S) batches (or ``(images, labels)`` batches).
        transform: PIL image -> tensor; default: the backbone's own (its ``pretrained_cfg``, set by
            :func:`load_backbone`: resize, centre crop, normalisation).
        feature: ``cls`` (after the final norm) or ``cls_prenorm``; ``last_blocks``: the CLS tokens of the last
            n blocks, concatenated.
    """
    device = next(backbone.parameters()).device
    transform = transform or _default_transform(backbone)
    was_training = backbone.training
    backbone.eval()
    try:
        chunks = [cls_features(backbone, x.to(device).float(), feature, last_blocks).float().cpu()
                  for x in _batches(images, transform, batch_size, num_workers)]
    finally:
        backbone.train(was_training)
    if not chunks:
        return torch.empty(0, backbone.embed_dim * last_blocks)
    return torch.cat(chunks)
