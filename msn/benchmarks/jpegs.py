"""Photo-like JPEGs to benchmark the input pipeline on when no image folder is at hand (``msn-bench jpegs``).

Each image is 500 x 375 px, ImageNet's typical size: a smooth colour field (a coarse random grid enlarged
bicubically), a faint oriented texture and per-pixel noise, saved at JPEG quality 90, so that it compresses
and decodes about as a photograph does (tens of kB; decode and crop dominate the loader's work, as on
ImageNet), in class folders ``c0 ... c9`` (the ImageFolder layout).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 500, 375


def photo_like(seed: int, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """One image: a function of ``seed`` alone."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((9, 12, 3)) * 255).astype(np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
    texture = 10 * np.sin((x * np.cos(angle) + y * np.sin(angle)) * (2 * np.pi / period))
    pixels = field + texture[..., None] + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write(args: tuple[int, str, int]) -> None:
    index, out, classes = args
    folder = Path(out) / f"c{index % classes}"
    folder.mkdir(parents=True, exist_ok=True)
    photo_like(index).save(folder / f"{index:07d}.jpg", quality=90)


def write_jpegs(count: int, out: str | os.PathLike, *, classes: int = 10, workers: int | None = None) -> Path:
    """Write ``count`` images as ``OUT/c{i % classes}/{i:07d}.jpg`` (image i is the same on every machine)."""
    jobs = [(i, str(out), classes) for i in range(count)]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        list(pool.map(_write, jobs, chunksize=32))
    return Path(out)
