"""The data sets of docs/studies.md's "Your own images, fitted": three folders of images as a user brings them.

    python scripts/fit_study.py DIR

writes DIR/digits (scikit-learn's 1,797 digits as 8 x 8 grey PNGs, a flat folder), DIR/fashion (Fashion-MNIST's
60,000 training images as 28 x 28 grey PNGs, flat; needs Debian's dataset-fashion-mnist) and DIR/shapes (a colour
set drawn here: 10 shapes in random colours, sizes, positions and rotations on noisy two-colour backgrounds, 64 x 64
px; train/ of 5,000 and val/ of 1,000 images in class folders, so msn-eval reads its labels). Then, for example:

    msn-pretrain data=folder data.root=DIR/shapes/train optim.budget=10m run_name=shapes_10m
    python scripts/proof_of_learning.py outputs/shapes_10m --dataset DIR/shapes --shots 5
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "ellipse", "diamond", "hexagon", "bar")


def polygon(sides: int, cx: float, cy: float, r: float, turn: float, star: bool = False) -> list[tuple[float, float]]:
    points = []
    count = sides * (2 if star else 1)
    for i in range(count):
        radius = r * (0.45 if star and i % 2 else 1.0)
        angle = turn + 2 * math.pi * i / count
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_shape(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One 64-px image of ``kind``: random colours, size, position and rotation, on a noisy gradient."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    background = (a * (1 - t) + b * t) + rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    turn = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(3, int(r / 3)))
    elif kind == "ellipse":
        box = Image.new("L", (size, size))
        ImageDraw.Draw(box).ellipse([cx - r, cy - r / 2.2, cx + r, cy + r / 2.2], fill=255)
        image.paste(Image.new("RGB", (size, size), colour), mask=box.rotate(math.degrees(turn), center=(cx, cy)))
    elif kind in ("square", "triangle", "hexagon", "diamond"):
        sides = {"square": 4, "triangle": 3, "hexagon": 6, "diamond": 4}[kind]
        pts = polygon(sides, cx, cy, r, turn)
        if kind == "diamond":
            pts = [(cx + (x - cx) * (0.55 if i % 2 else 1.0), cy + (y - cy) * (0.55 if i % 2 else 1.0))
                   for i, (x, y) in enumerate(pts)]
        draw.polygon(pts, fill=colour)
    elif kind == "star":
        draw.polygon(polygon(5, cx, cy, r, turn, star=True), fill=colour)
    elif kind in ("cross", "bar"):
        w = r / 3
        arms = [turn] + ([turn + math.pi / 2] if kind == "cross" else [])
        for arm in arms:
            dx, dy = math.cos(arm), math.sin(arm)
            draw.polygon([(cx - r * dx - w * dy, cy - r * dy + w * dx), (cx + r * dx - w * dy, cy + r * dy + w * dx),
                          (cx + r * dx + w * dy, cy + r * dy - w * dx), (cx - r * dx + w * dy, cy - r * dy - w * dx)],
                         fill=colour)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def write_shapes(root: Path, train: int = 500, val: int = 100) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for kind in SHAPES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_shape(kind, rng).save(folder / f"{kind}_{i:04d}.png")


def write_digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(load_digits().images):
        Image.fromarray((pixels * 255 / 16).round().astype(np.uint8), "L").save(root / f"{i:04d}.png")


def write_fashion(root: Path) -> None:
    from msn.data.sources.fashion_mnist import read_idx

    source = Path("/usr/share/datasets/fashion-mnist")
    found = sorted(source.glob("train-images*"))
    if not found:
        raise SystemExit(f"no Fashion-MNIST in {source}: apt-get install dataset-fashion-mnist")
    root.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(read_idx(found[0])):
        Image.fromarray(pixels, "L").save(root / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    write_digits(args.dir / "digits")
    write_shapes(args.dir / "shapes")
    write_fashion(args.dir / "fashion")


if __name__ == "__main__":
    main()
