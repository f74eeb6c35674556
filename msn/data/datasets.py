"""Base datasets: index -> PIL RGB image, with labels kept for evaluation (pretraining ignores them).

``folder`` (an ImageFolder or a flat folder, optionally restricted by a list file), ``digits``
(scikit-learn's bundled 8x8 digits), ``fashion_mnist`` (the standard idx files, as Debian's
``dataset-fashion-mnist`` package installs them) and ``synthetic`` (generated images for smoke tests).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import IO, Protocol

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from msn.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageDataset(Protocol):
    """What the multi-crop pipeline needs from a base dataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Image.Image: ...


class ImageFolderDataset(Dataset):
    """Images under ``root``: ImageFolder layout (``root/class/img.jpg``) or flat (``root/img.jpg``).

    Files are found recursively (extensions in :data:`IMAGE_EXTENSIONS`, any case) and sorted by their
    path relative to ``root``. Classes are the sorted top-level folders of ``root`` (as torchvision's
    ImageFolder, so a ``list_file`` subset and the full folder agree on class indices); an image directly
    under ``root`` has label -1 (unlabelled).

    Args:
        root: the image folder.
        list_file: optional text file with one image path per line, relative to ``root`` (its first
            whitespace-separated token is used, so ``path label`` lines work; blank lines and lines
            starting with ``#`` are skipped). The dataset then holds exactly the listed images.
    """

    def __init__(self, root: str | os.PathLike | None, list_file: str | os.PathLike | None = None) -> None:
        self.root = check_data_root(root)
        self.classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        relative = _read_list_file(self.root, Path(list_file)) if list_file else _scan_images(self.root)
        self.paths = [self.root / rel for rel in relative]
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.targets = [class_index.get(Path(rel).parts[0], -1) if len(Path(rel).parts) > 1 else -1
                        for rel in relative]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

    def label(self, index: int) -> int:
        """Class index of image ``index`` (-1 for an image directly under ``root``)."""
        return self.targets[index]


def load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` as an 8-bit RGB image; a missing, truncated or non-image file is a :class:`DataError`.

    High-bit-depth images (16-bit grayscale PNG / TIFF: PIL modes ``I;16*``, ``I``, ``F``) are scaled to
    8 bits (:func:`to_8bit`); PIL's own ``convert("RGB")`` would clip them at 255.
    """
    return decode_rgb(path, str(path))


def decode_rgb(source: Path | IO[bytes], name: str) -> Image.Image:
    """:func:`load_rgb` of a path or an open binary file (a tar member's or a dataset row's bytes); ``name``
    says in the :class:`DataError` which image could not be read."""
    try:
        with Image.open(source) as image:
            image.load()  # forces the decode, so a corrupt file fails here
            return to_8bit(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL signals bad data with OSError (incl. UnidentifiedImageError), SyntaxError or ValueError
        raise DataError(f"cannot read image {name}: {err}") from err


def to_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit grayscale copy of a 16-bit, 32-bit integer or float image; other modes as they are.

    16-bit values v in [0, 65535] become round(v * 255 / 65535) (``I`` images, which PIL also uses for
    16-bit files, are taken as 16-bit when they fit in 0..65535, else scaled by their own maximum);
    float images are taken as [0, 1] when they fit, else scaled by their maximum.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.size == 0 or (values.min() >= 0 and values.max() <= 1.0) else max(values.max(), 1e-12)
    else:
        top = 65535.0 if values.size == 0 or (values.min() >= 0 and values.max() <= 65535) else max(values.max(), 1)
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # (H, W) uint8: mode "L"


def check_data_root(root: str | os.PathLike | None) -> Path:
    """``root`` as a Path when it is an existing folder, else a :class:`DataError` that says how to fix it."""
    if root is None or str(root) == "":
        raise DataError("data.root is not set; pass data.root=/path/to/images")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root={root} does not exist; pass data.root=/path/to/images")
    if not path.is_dir():
        raise DataError(f"data.root={root} is not a folder; pass data.root=/path/to/images")
    return path


def _scan_images(root: Path) -> list[str]:
    """Paths (POSIX, relative to ``root``) of every image file below ``root``, sorted."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        rel_folder = Path(folder).relative_to(root)
        found.extend((rel_folder / name).as_posix() for name in files if name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise DataError(f"data.root={root} holds no images (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}); pass data.root=/path/to/images")
    return sorted(found)


def _read_list_file(root: Path, list_file: Path) -> list[str]:
    """The sorted, de-duplicated image paths that ``list_file`` names; every one must exist under ``root``."""
    if not list_file.is_file():
        raise DataError(f"data.list_file={list_file} does not exist; pass a text file of image paths "
                        "relative to data.root, or data.list_file=null")
    listed: dict[str, int] = {}  # path -> line number, for the error message
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        tokens = line.split()
        if tokens and not tokens[0].startswith("#"):
            listed.setdefault(tokens[0], number)
    if not listed:
        raise DataError(f"data.list_file={list_file} lists no image paths")
    missing = [(number, rel) for rel, number in listed.items() if not (root / rel).is_file()]
    if missing:
        number, rel = missing[0]
        raise DataError(f"data.list_file={list_file} line {number} names {rel}, which does not exist under "
                        f"data.root={root} ({len(missing)} of {len(listed)} listed files are missing)")
    return sorted(listed)


class DigitsDataset(Dataset):
    """scikit-learn's bundled digits: 1797 real 8x8 grayscale images (0..16), 10 classes, no download.

    Each image is scaled to 0..255 and upsampled (PIL bicubic) to ``image_size`` px, returned as RGB.
    """

    def __init__(self, image_size: int = 32) -> None:
        from sklearn.datasets import load_digits  # deferred: sklearn's import costs ~1 s

        digits = load_digits()
        # (1797, 8, 8) in 0..16 -> uint8 0..255
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self.targets = [int(t) for t in digits.target]
        self.classes = [str(d) for d in range(10)]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        small = Image.fromarray(self.images[index])  # 2-D uint8: mode L
        return small.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC).convert("RGB")

    def label(self, index: int) -> int:
        return self.targets[index]


class SyntheticDataset(Dataset):
    """Deterministic random images for smoke tests: a colour gradient plus 1-4 soft colour blobs.

    Image ``i`` depends only on ``(seed, i)``. Its label is the number of blobs minus one (4 classes), so
    an evaluation smoke test has something learnable.
    """

    max_blobs = 4

    def __init__(self, num_images: int, image_size: int, seed: int = 0) -> None:
        if num_images <= 0 or image_size <= 0:
            raise DataError(f"synthetic data needs positive sizes; got {num_images} images of {image_size} px "
                            "(data.synthetic_size, data.image_size)")
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        self.classes = [f"{n} blobs" for n in range(1, self.max_blobs + 1)]
        self.targets = [self._draw(i)[0] - 1 for i in range(num_images)]

    def __len__(self) -> int:
        return self.num_images

    def _draw(self, index: int) -> tuple[int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, index])
        return int(rng.integers(1, self.max_blobs + 1)), rng

    def __getitem__(self, index: int) -> Image.Image:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        num_blobs, rng = self._draw(index)
        coords = np.arange(self.image_size, dtype=np.float32) / self.image_size  # (s,) in [0, 1)
        c0, c1 = rng.random((2, 3), dtype=np.float32)  # gradient end colours
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None] + 1.5) / 3.0  # (s, s) in [0, 1]
        image = c0 + ramp[..., None] * (c1 - c0)  # (s, s, 3)
        for _ in range(num_blobs):
            cy, cx = rng.random(2)
            radius = rng.uniform(0.08, 0.25)
            colour = rng.random(3, dtype=np.float32)
            # a Gaussian is separable: outer product of two 1-D profiles instead of a 2-D exp
            gy, gx = (np.exp(-((coords - c) ** 2) / (2 * radius**2)).astype(np.float32) for c in (cy, cx))
            weight = np.outer(gy, gx)[..., None]  # (s, s, 1)
            image = image * (1 - weight) + colour * weight
        return Image.fromarray(np.round(image * 255).astype(np.uint8))  # (s, s, 3) uint8: RGB

    def label(self, index: int) -> int:
        return self.targets[index]


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


class FashionMNISTDataset(Dataset):
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
