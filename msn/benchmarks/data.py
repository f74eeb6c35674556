"""msn-bench data: images/s of the multi-crop input pipeline on a training source, and of a reference.

The source is any of the trainer's (``data=folder``, ``webdataset``, ``hf``, ``custom``, ...: every registered
source), read as the trainer reads it.

Ours is the trainer's own loader (:mod:`msn.data`) as configured: decode and crop in the workers, the
photometric stage in the workers (``data.augment_on=cpu``) or on the training device (``device``; a
batch then counts once its views are on the GPU). The reference is the recipe as the original code
and most re-implementations write it: torchvision's PIL transforms applied view by view
(RandomResizedCrop, flip, ColorJitter in RandomApply, RandomGrayscale, a PIL Gaussian blur with a
random radius, ToTensor, Normalize), in a DataLoader with the same batch size and workers.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from msn.benchmarks.stages import cores_needed, stage_times
from msn.data.device_decode import DeviceDecoder, decode_on_device
from msn.data.images import load_rgb
from msn.data.loader import EpochSampler, MultiCropDataset, RunSampler, build_loader
from msn.data.multicrop import MultiCropTransform, augment_in_workers, device_views
from msn.data.registry import ImageDataset, build_dataset, describe_source
from msn.utils.device import resolve_device


class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and a radius drawn from U(``sigma``), as the original code."""

    def __init__(self, p: float, sigma: Sequence[float]) -> None:
        self.p, self.sigma = p, (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def reference_view(cfg: DictConfig, size: int, scale: Sequence[float]) -> T.Compose:
    """One view of the paper's recipe with torchvision's PIL transforms (``transforms`` v1)."""
    s = float(cfg.color_jitter)
    return T.Compose([
        T.RandomResizedCrop(size, scale=tuple(scale)),
        T.RandomHorizontalFlip(cfg.hflip_p),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cfg.color_jitter_p),
        T.RandomGrayscale(cfg.grayscale_p),
        RandomGaussianBlur(cfg.blur_p, cfg.blur_sigma),
        T.ToTensor(),
        T.Normalize(list(cfg.mean), list(cfg.std)),
    ])


class ReferenceMultiCrop(Dataset):
    """image ``i`` -> ``[target, anchor, focal_1, ...]``, each view by its own torchvision Compose.

    ``images``: a list of image file paths, or a dataset of PIL images (index -> image, as
    :func:`msn.data.registry.build_dataset` makes for every source)."""

    def __init__(self, images: Sequence[os.PathLike] | ImageDataset, cfg: DictConfig) -> None:
        self.images = images
        self.global_view = reference_view(cfg, cfg.global_size, cfg.global_scale)
        self.focal_view = reference_view(cfg, cfg.focal_size, cfg.focal_scale)
        self.num_focal = int(cfg.num_focal)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        item = self.images[index]
        image = item if isinstance(item, Image.Image) else load_rgb(item)
        return [self.global_view(image) for _ in range(2)] + [self.focal_view(image) for _ in range(self.num_focal)]


ROUNDS = 3  # turns each of ours and the reference takes, alternately


def images_per_second(batches: Iterable[Any], batch_size: int, seconds: float, warmup: int,
                      finish: Callable[[Any], None] = lambda batch: None) -> float:
    """Steady images/s of ``batches``: ``warmup`` batches untimed (worker start-up), then at least
    ``seconds`` of them (and at least two); ``finish(batch)`` completes each one (e.g. on the GPU)."""
    stream = iter(batches)
    for _ in range(warmup):
        finish(next(stream))
    count, tic = 0, time.perf_counter()
    while count < 2 or time.perf_counter() - tic < seconds:
        finish(next(stream))
        count += 1
    return count * batch_size / (time.perf_counter() - tic)


def bench_data(cfg: DictConfig, *, workers: int, seconds: float, warmup: int = 2,
               step_images_per_s: float | None = None) -> dict[str, Any]:
    """Images/s of our loader and of the reference on ``cfg.data``'s source (see the module docstring), the
    per-image CPU milliseconds of each stage (:func:`msn.benchmarks.stages.stage_times`) and, given the step's
    ``step_images_per_s``, the loader cores one GPU needs (``cores_per_gpu``)."""
    d = cfg.data
    device = resolve_device(cfg.device)
    base = build_dataset(d)
    on_device = decode_on_device(d.decode_on, d.augment_on, device, base)
    in_workers = not on_device and augment_in_workers(d.augment_on, device)
    transform = MultiCropTransform(d)
    dataset = MultiCropDataset(base, transform, seed=cfg.seed, finish=in_workers, decode=not on_device)
    decode = DeviceDecoder(dataset, device) if on_device else None
    loader_cfg = d.copy()
    loader_cfg.num_workers = workers
    sampler = RunSampler(EpochSampler(len(base), seed=cfg.seed, drop_last=True), d.batch_size, drop_last=True)
    loader = build_loader(loader_cfg, dataset, sampler, pin_memory=device.type == "cuda")

    def to_views(batch: Any) -> None:
        views = device_views(decode(batch) if decode else batch, transform, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del views

    reference_loader = DataLoader(ReferenceMultiCrop(base, d), batch_size=d.batch_size, shuffle=True,
                                  num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                                  generator=torch.Generator().manual_seed(cfg.seed))
    # Alternately, ROUNDS times each, so that a machine busier in one half of the run than in the other does
    # not decide the ratio. A loader waiting for its turn has its workers' batches ready: each turn first takes
    # as many untimed as they can hold (2 per worker).
    ours_stream, reference_stream = iter(loader), iter(_forever(reference_loader))
    held = 2 * workers
    rounds = [(images_per_second(ours_stream, d.batch_size, seconds / ROUNDS, warmup + held, to_views),
               images_per_second(reference_stream, d.batch_size, seconds / ROUNDS, warmup + held))
              for _ in range(ROUNDS)]
    del ours_stream, reference_stream, loader, reference_loader
    ours, reference = (sum(r[side] for r in rounds) / ROUNDS for side in (0, 1))
    stages = stage_times(base, transform, batch=min(int(d.batch_size), 16), seed=cfg.seed)
    cores = None if step_images_per_s is None else cores_needed(stages, step_images_per_s,
                                                                photometric_in_workers=in_workers,
                                                                decode_in_workers=not on_device)
    return {
        "source": d.name, "root": describe_source(d), "images": len(base), "batch": int(d.batch_size),
        "workers": workers,
        "threads": torch.get_num_threads(), "device": device.type, "augment_on": "cpu" if in_workers else "device",
        "decode_on": "device" if on_device else "cpu",
        "views": f"2 x {d.global_size} + {d.num_focal} x {d.focal_size}",
        "ours_images_per_s": ours, "reference_images_per_s": reference, "ratio": ours / reference,
        "rounds": [{"ours_images_per_s": o, "reference_images_per_s": r} for o, r in rounds],
        "stages": stages, "step_images_per_s": step_images_per_s, "cores_per_gpu": cores,
    }


def _forever(loader: DataLoader) -> Iterable[Any]:
    """The loader's epochs one after another (the reference restarts its iterator each epoch, as usual)."""
    while True:
        yield from loader
