"""``data=fashion_mnist``: Fashion-MNIST read from the standard idx files (as Debian's ``dataset-fashion-mnist``
package installs them; nothing is downloaded). Torch-free."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from msn.config import DataConfig
from msn.data.registry import Source, register_source
from msn.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian/Ubuntu: apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format: 2 zero bytes, a type byte, the number of dimensions, big-endian int32
    sizes, then the values), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
            raise ValueError("not an idx file")
        ndim = data[3]
        shape = tuple(int(n) for n in np.frombuffer(data, ">i4", count=ndim, offset=4))
        values = np.frombuffer(data, _IDX_TYPES[data[2]], offset=4 + 4 * ndim)
        if values.size != int(np.prod(shape)):
            raise ValueError(f"{values.size} values for shape {shape}")
    except (OSError, EOFError, ValueError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {err}; reinstall the dataset") from err
    return values.reshape(shape)


def find_fashion_mnist(root: str | os.PathLike | None) -> dict[str, Path]:
    """The four idx files under ``root`` (default: Debian's folder), plain or ``.gz``, in ``root`` itself or
    in torchvision's ``FashionMNIST/raw`` (or ``raw``) below it: ``{"train-images-idx3-ubyte": path, ...}``."""
    base = Path(root).expanduser() if root else FASHION_MNIST_DIR
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for folder in (base, base / "FashionMNIST" / "raw", base / "raw"):
        found = {}
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(names):
            return found
    where = f"data.root={root}" if root else str(FASHION_MNIST_DIR)
    raise DataError(f"Fashion-MNIST is not in {where} (looked for {names[0]}[.gz] and the other idx files); install "
                    "it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass data.root=DIR holding "
                    "the four idx files (torchvision's FashionMNIST/raw works)")


class FashionMNISTDataset:
    """Fashion-MNIST: 28x28 grayscale clothing images, 10 classes; 60,000 train and 10,000 test images.

    Read from the standard idx files (nothing is downloaded, see :func:`find_fashion_mnist`). Images are
    returned as RGB, resized (PIL bicubic) to ``image_size`` px when that is not 28.

    Args:
        root: folder holding the idx files; None for Debian's ``/usr/share/datasets/fashion-mnist``.
        split: ``train`` or ``test`` (the official split).
        image_size: output side in px.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", image_size: int = 28) -> None:
        if split not in FASHION_MNIST_FILES:
            raise DataError(f"Fashion-MNIST split {split!r} is unknown; choose train or test")
        files = find_fashion_mnist(root)
        image_file, label_file = FASHION_MNIST_FILES[split]
        self.images = read_idx(files[image_file])  # (N, 28, 28) uint8
        labels = read_idx(files[label_file])  # (N,) uint8
        if self.images.ndim != 3 or labels.shape != self.images.shape[:1]:
            raise DataError(f"{files[image_file]} and {files[label_file]} do not match: images "
                            f"{self.images.shape}, labels {labels.shape}; reinstall the dataset")
        self.targets = [int(t) for t in labels]
        self.classes = list(FASHION_MNIST_CLASSES)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        image = Image.fromarray(self.images[index])  # 2-D uint8: mode L
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return image.convert("RGB")

    def label(self, index: int) -> int:
        return self.targets[index]


@register_source
class FashionMNISTSource(Source):
    """``data=fashion_mnist``: the training split of :class:`FashionMNISTDataset` at ``data.image_size`` px."""

    name = "fashion_mnist"
    summary = "Fashion-MNIST's 60,000 training images from the idx files (data.root, default Debian's folder)"

    def check(self, cfg: DataConfig | DictConfig) -> None:
        find_fashion_mnist(cfg.root)

    def build(self, cfg: DataConfig | DictConfig) -> FashionMNISTDataset:
        return FashionMNISTDataset(cfg.root, "train", cfg.image_size)

    def where(self, cfg: DataConfig | DictConfig) -> str:
        return str(cfg.root or FASHION_MNIST_DIR)
