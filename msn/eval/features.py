"""Frozen-encoder features for evaluation: loading a target backbone, the centre-crop transform,
CLS features extracted on any device (bf16 autocast on GPUs) and cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from msn.config import DEFAULT_CROP_PCT, check_crop_pct
from msn.eval.splits import Split
from msn.models.backbone import MaskedViT
from msn.utils.device import autocast
from msn.utils.files import atomic_write
from msn.weights.convert import check_compatible
from msn.weights.read import read_backbone

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # seconds between two progress lines of a long feature extraction


@dataclass
class Encoder:
    """A frozen backbone with the preprocessing it was trained with."""

    backbone: MaskedViT
    image_size: int
    mean: list[float]
    std: list[float]
    fingerprint: str  # identifies the weights, for the feature cache
    path: Path
    crop_pct: float = DEFAULT_CROP_PCT  # evaluation view: the centre crop_pct of the image (1.0: all of it)


def _weights_id(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def load_encoder(model: str | Path, device: torch.device | str = "cpu", crop_pct: float = DEFAULT_CROP_PCT,
                 encoder: str = "target") -> Encoder:
    """The backbone of a run directory, training checkpoint, original MSN file, Hugging Face or timm export
    (:func:`msn.weights.read.read_backbone`; the EMA ``target`` encoder where there are two) on ``device``, in
    eval mode, evaluated on the centre ``crop_pct`` of each image (:func:`eval_transform`)."""
    check_crop_pct(crop_pct, "crop_pct")
    path = Path(model)
    weights = read_backbone(path, encoder)
    backbone = MaskedViT(weights.arch, weights.patch_size, weights.img_size)
    check_compatible(backbone.state_dict(), weights.backbone, f"the weights of {path}")
    backbone.load_state_dict(weights.backbone)
    found = Encoder(backbone.to(device).eval(), weights.img_size, weights.mean, weights.std,
                    f"{_weights_id(weights.path)}-{encoder}", path, crop_pct)
    # timm's convention: timm.data.resolve_data_config(model=backbone) reads the preprocessing from here
    backbone.pretrained_cfg = timm_pretrained_cfg(weights.img_size, weights.mean, weights.std, crop_pct)
    return found


def timm_pretrained_cfg(size: int, mean: list[float], std: list[float],
                        crop_pct: float = DEFAULT_CROP_PCT) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of a preprocessing (what ``timm.data.resolve_data_config`` reads)."""
    return {"input_size": (3, size, size), "mean": tuple(mean), "std": tuple(std), "crop_pct": crop_pct,
            "interpolation": "bicubic", "num_classes": 0}


def eval_transform(encoder: Encoder) -> v2.Compose:
    """The encoder's evaluation view of a PIL image (:func:`centre_crop_transform` of its size, crop and
    normalisation): (3, size, size) float32."""
    return centre_crop_transform(encoder.image_size, encoder.mean, encoder.std, encoder.crop_pct)


def centre_crop_transform(size: int, mean: list[float], std: list[float],
                          crop_pct: float = DEFAULT_CROP_PCT) -> v2.Compose:
    """Resize the short side to ``size / crop_pct`` (bicubic), centre-crop ``size``, scale to [0, 1], normalise.

    ``crop_pct = 224/256`` is the paper's 256 -> 224 protocol (a 28-px model sees the middle 28 px of the
    image resized to 32); ``crop_pct = 1`` keeps the whole image, as a raw-pixel baseline sees it.
    """
    resize = v2.Resize(int(round(size / crop_pct)), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([v2.ToImage(), resize, v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


class TransformedImages(Dataset):
    """Images of a split passed through a transform (the evaluation centre crop), one tensor each."""

    def __init__(self, images: Dataset, transform: v2.Compose) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


@torch.no_grad()
def cls_features(backbone: MaskedViT, x: torch.Tensor, feature: str = "cls", last_blocks: int = 1) -> torch.Tensor:
    """CLS features of a batch: (B, C, H, W) -> (B, last_blocks * D).

    ``feature="cls"``: the CLS token after the final norm (each of the last ``last_blocks`` block outputs is
    normed, then concatenated); ``"cls_prenorm"``: the raw block outputs' CLS tokens.
    """
    outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outputs.append(o[:, 0]))
             for blk in backbone.blocks[-last_blocks:]]
    try:
        backbone.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    if feature == "cls":
        outputs = [backbone.norm(o) for o in outputs]
    return torch.cat(outputs, dim=1)


def extract_features(encoder: Encoder, split: Split, cache_dir: Path | None, *, feature: str = "cls",
                     last_blocks: int = 1, batch_size: int = 128, num_workers: int = 0,
                     amp_dtype: torch.dtype | None = None, progress: Callable[[str], None] | None = None,
                     name: str | None = None) -> torch.Tensor:
    """(N, D) float32 CPU features of ``split``, from the cache when a valid entry exists, else computed and stored.

    The images are preprocessed on the CPU (DataLoader workers) and the backbone runs wherever its
    parameters are, under ``amp_dtype`` autocast when given (bf16 on GPUs). The cache key hashes the
    weights' fingerprint, the split, the feature options, the evaluation crop and the precision; an unreadable or
    inconsistent cache file is rebuilt, never trusted.

    ``progress`` gets plain lines about ``name`` (default: the split's ident): where the features come from, every
    :data:`PROGRESS_EVERY_S` seconds how far the extraction is, and its time and rate at the end, so that a log file
    shows the minutes a large split takes (tqdm's bar is drawn on a terminal only).
    """
    say = progress or (lambda line: None)
    what = f"features of {name or split.ident}: {len(split.labels)} images"
    device = next(encoder.backbone.parameters()).device
    precision = str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "fp32"
    key = hashlib.sha1(json.dumps([encoder.fingerprint, split.ident, len(split.labels), feature, last_blocks,
                                   encoder.image_size, encoder.mean, encoder.std, encoder.crop_pct,
                                   precision]).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached["key"] == key and cached["features"].shape[0] == len(split.labels):
                say(f"{what}, from the cache ({path})")
                return cached["features"]
            reason = "it does not match"
        except Exception as e:  # truncated / corrupted file: rebuild rather than trust it
            reason = f"{type(e).__name__}"
        log.warning(f"feature cache {path} is unusable ({reason}); rebuilding")
    loader = DataLoader(TransformedImages(split.images, eval_transform(encoder)), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks = []
    say(f"{what} through the encoder on {device.type} ...")
    tic = last_said = time.perf_counter()
    done = 0
    # disable=None: a bar on a terminal only, not redrawn batch by batch into a log file
    for x in tqdm(loader, desc=f"features {split.ident[:40]}", file=sys.stderr, leave=False, disable=None):
        with autocast(device, amp_dtype):
            chunks.append(cls_features(encoder.backbone, x.to(device, non_blocking=True), feature, last_blocks))
        done += len(x)
        if time.perf_counter() - last_said >= PROGRESS_EVERY_S and done < len(split.labels):
            last_said = time.perf_counter()
            say(f"{what}: {done} done, {done / (last_said - tic):.0f} images/s")
    features = torch.cat(chunks).float().cpu()
    seconds = time.perf_counter() - tic
    say(f"{what} done in {seconds:.1f} s ({len(split.labels) / max(seconds, 1e-9):.0f} images/s)")
    if path is not None:
        atomic_write(path, lambda f: torch.save({"key": key, "features": features}, f), fsync=False)
    return features
