"""Throughput of the multi-crop pipeline (msn.data), single process.

Two settings:
  digits: the default run (8x8 digits upsampled to 32 px; 2 x 32-px + 6 x 16-px views; batch 128);
  large:  the paper's views (2 x 224-px + 10 x 96-px) of synthetic 256-px images; batch 32.

For each it reports images/s and views/s of
  pipeline:  MultiCropTransform on images already decoded to PIL (the augmentation alone);
  dataset:   MultiCropDataset.__getitems__ (base dataset + augmentation: what one DataLoader worker does);
  per-view torchvision.transforms.v2 (optional, --baseline): the naive Compose applied view by view.

The pipeline runs on one thread whatever torch's setting (msn.data.multicrop.single_threaded); the baseline is
timed on one thread too. Usage: python scripts/bench_data.py [--batches 5] [--baseline] [--setting digits]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from PIL import Image
from torchvision.transforms import v2

from msn.config import DataConfig
from msn.data.loader import MultiCropDataset
from msn.data.multicrop import MultiCropTransform
from msn.data.photometric import blur_kernel_size
from msn.data.registry import build_dataset

SETTINGS = {
    "digits": DataConfig(name="digits", image_size=32, global_size=32, focal_size=16, num_focal=6, batch_size=128),
    "large": DataConfig(name="synthetic", image_size=256, synthetic_size=64, global_size=224, focal_size=96,
                        num_focal=10, batch_size=32),
}


def v2_view_pipeline(cfg: DataConfig, size: int, scale: list[float]) -> v2.Compose:
    """The per-view torchvision v2 Compose that msn.data reimplements batched (the baseline)."""
    s = cfg.color_jitter
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip_p),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cfg.color_jitter_p),
        v2.RandomGrayscale(cfg.grayscale_p),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(cfg.blur_sigma[1], size), tuple(cfg.blur_sigma))],
                       p=cfg.blur_p),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(cfg.mean, cfg.std),
    ])


def time_batches(run_batch: Callable[[int], None], batches: int) -> float:
    """Seconds per batch (the fastest of ``batches`` runs after one warm-up: least disturbed by other load)."""
    run_batch(0)
    times = []
    for b in range(batches):
        tic = time.perf_counter()
        run_batch(b + 1)
        times.append(time.perf_counter() - tic)
    return min(times)


def report(name: str, seconds: float, cfg: DataConfig) -> None:
    images = cfg.batch_size / seconds
    print(f"  {name:<28} {seconds * 1e3:8.1f} ms/batch  {images:9.0f} images/s  {images * (2 + cfg.num_focal):9.0f} "
          "views/s", flush=True)


def bench(setting: str, cfg: DataConfig, batches: int, baseline: bool) -> None:
    base = build_dataset(cfg)
    n = min(len(base), cfg.batch_size * (batches + 1))
    cfg = replace(cfg, batch_size=min(cfg.batch_size, n))
    transform = MultiCropTransform(cfg)
    dataset = MultiCropDataset(base, transform, seed=0)
    pil: list[Image.Image] = [base[i] for i in range(n)]
    print(f"{setting}: {len(base)} images of {pil[0].size[0]} px -> 2 x {cfg.global_size} px + {cfg.num_focal} x "
          f"{cfg.focal_size} px views, batch {cfg.batch_size}, {torch.get_num_threads()} thread(s)")

    def batch_keys(b: int) -> list[int]:
        return [(b * cfg.batch_size + i) % n for i in range(cfg.batch_size)]

    def pipeline(b: int) -> None:
        keys = batch_keys(b)
        transform.apply([pil[i] for i in keys], [transform.draw() for _ in keys])

    def full(b: int) -> None:
        dataset.__getitems__([(0, i) for i in batch_keys(b)])

    report("pipeline (decoded images)", time_batches(pipeline, batches), cfg)
    report("dataset (__getitems__)", time_batches(full, batches), cfg)
    if baseline:
        globals_ = v2_view_pipeline(cfg, cfg.global_size, cfg.global_scale)
        focals = v2_view_pipeline(cfg, cfg.focal_size, cfg.focal_scale)

        def naive(b: int) -> None:
            for i in batch_keys(b):
                [globals_(pil[i]) for _ in range(2)] + [focals(pil[i]) for _ in range(cfg.num_focal)]

        report("per-view torchvision v2", time_batches(naive, max(1, batches // 3)), cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per measurement")
    parser.add_argument("--baseline", action="store_true", help="also time the per-view torchvision v2 Compose")
    parser.add_argument("--setting", choices=[*SETTINGS, "all"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a DataLoader worker (and as msn.data runs its pipeline anyway)
    for setting, cfg in SETTINGS.items():
        if args.setting in (setting, "all"):
            bench(setting, cfg, args.batches, args.baseline)


if __name__ == "__main__":
    main()
