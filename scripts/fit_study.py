"""The data sets of docs/studies.md's "Your own images, fitted": three folders of images as a user brings them.

    python scripts/fit_study.py DIR [--variants]

writes DIR/digits (scikit-learn's 1,797 digits as 8 x 8 grey PNGs, a flat folder), DIR/fashion (Fashion-MNIST's
60,000 training images as 28 x 28 grey PNGs, flat; needs Debian's dataset-fashion-mnist) and DIR/clothes (a colour
set at 64 px made from Fashion-MNIST: each garment scaled to 36-56 px at a random place, in a random dark colour, on a
random light two-colour gradient; train/ of 10,000 and val/ of 2,000 images in class folders, so msn-eval reads its
labels). `--variants` writes instead the four sets that took the clothes apart, each with one change, in the same
layout: DIR/clothes_flat (no gradient, no noise), DIR/clothes_contrast (flat, a very dark garment on a very light
colour), DIR/clothes_grey (white garments placed as in the clothes, on black) and DIR/fashion_light (Fashion-MNIST's
28-px garments inverted, dark on light). Then, for example:

    msn-pretrain data=folder data.root=DIR/clothes/train optim.budget=10m run_name=clothes_10m
    python scripts/proof_of_learning.py outputs/clothes_10m --dataset DIR/clothes --shots 5
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def _placed(garment: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 1) float32 opacity in [0, 1]: a 28-px garment scaled to 36-56 px at a random place."""
    side = int(rng.integers(36, 57))
    alpha = np.asarray(Image.fromarray(garment, "L").resize((side, side), Image.BICUBIC), np.float32) / 255
    x, y = rng.integers(0, size - side + 1, 2)
    mask = np.zeros((size, size, 1), np.float32)
    mask[y:y + side, x:x + side, 0] = alpha
    return mask


def _rgb(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def recolour(garment: np.ndarray, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One ``size``-px colour image of a 28-px Fashion-MNIST garment: scaled to 36-56 px at a random place, in a
    random dark colour (its grey levels kept as shading) over a random light two-colour gradient with noise."""
    mask = _placed(garment, rng, size)
    a, b = rng.uniform(140, 255, 3), rng.uniform(140, 255, 3)
    t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    background = a * (1 - t) + b * t + rng.normal(0, 6, (size, size, 3))
    colour = rng.uniform(0, 150, 3)
    return _rgb(background * (1 - mask) + colour * mask)  # grey levels as opacity: seams and prints show


# The variants that took the clothes set apart (docs/studies.md): each changes one thing of it.
def flat(garment: np.ndarray, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """The clothes without the gradient and the noise: a random dark garment on one random light colour."""
    mask = _placed(garment, rng, size)
    background = np.ones((size, size, 3)) * rng.uniform(140, 255, 3)
    return _rgb(background * (1 - mask) + rng.uniform(0, 150, 3) * mask)


def contrast(garment: np.ndarray, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """The flat clothes in high contrast: a random very dark garment (0-60) on a random very light colour (200-255)."""
    mask = _placed(garment, rng, size)
    background = np.ones((size, size, 3)) * rng.uniform(200, 255, 3)
    return _rgb(background * (1 - mask) + rng.uniform(0, 60, 3) * mask)


def grey_placed(garment: np.ndarray, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """No colour: Fashion-MNIST's white garment, scaled and placed as in the clothes, on black."""
    return Image.fromarray(np.round(_placed(garment, rng, size)[..., 0] * 255).astype(np.uint8), "L")


def light(garment: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Fashion-MNIST's 28-px garment as it is, its grey levels inverted: dark on light, as the clothes are."""
    return Image.fromarray(255 - garment, "L")


VARIANTS = {"clothes_flat": flat, "clothes_contrast": contrast, "clothes_grey": grey_placed, "fashion_light": light}


def write_clothes(root: Path, train: int = 10_000, val: int = 2_000,
                  paint: Callable[[np.ndarray, np.random.Generator], Image.Image] = recolour) -> None:
    """Fashion-MNIST's first ``train`` training and ``val`` test garments, each painted by ``paint`` (the clothes:
    recoloured at 64 px), in class folders."""
    from msn.data.sources.fashion_mnist import read_idx

    rng = np.random.default_rng(0)
    for split, prefix, count in (("train", "train", train), ("val", "t10k", val)):
        images = read_idx(_fashion_file(f"{prefix}-images*"))[:count]
        labels = read_idx(_fashion_file(f"{prefix}-labels*"))[:count]
        for i, (garment, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / CLASSES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            paint(garment, rng).save(folder / f"{i:05d}.png")


def write_digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(load_digits().images):
        Image.fromarray((pixels * 255 / 16).round().astype(np.uint8), "L").save(root / f"{i:04d}.png")


def _fashion_file(pattern: str) -> Path:
    found = sorted(FASHION.glob(pattern))
    if not found:
        raise SystemExit(f"no Fashion-MNIST in {FASHION}: apt-get install dataset-fashion-mnist")
    return found[0]


def write_fashion(root: Path) -> None:
    from msn.data.sources.fashion_mnist import read_idx

    root.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(read_idx(_fashion_file("train-images*"))):
        Image.fromarray(pixels, "L").save(root / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--variants", action="store_true",
                        help="write only the clothes' variants: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    if args.variants:
        for name, paint in VARIANTS.items():
            write_clothes(args.dir / name, paint=paint)
        return
    write_digits(args.dir / "digits")
    write_clothes(args.dir / "clothes")
    write_fashion(args.dir / "fashion")


if __name__ == "__main__":
    main()
