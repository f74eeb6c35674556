"""Base datasets: index -> PIL RGB image, with labels kept for evaluation (pretraining ignores them).

``folder`` (an ImageFolder or a flat folder, optionally restricted by a list file), ``digits``
(scikit-learn's bundled 8x8 digits), ``fashion_mnist`` (the standard idx files, as Debian's
``dataset-fashion-mnist`` package installs them) and ``synthetic`` (generated images for smoke tests).
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import numpy as np
from PIL import Image, ImageOps
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
    path relative to ``root``; symlinked folders are followed, but each real file counts once
    (:func:`scan_images`). Classes are the sorted top-level folders of ``root`` (as torchvision's
    ImageFolder, so a ``list_file`` subset and the full folder agree on class indices); an image directly
    under ``root`` has label -1 (unlabelled).

    What the scan left out (files that are not images by their extension, symlink loops, duplicate links)
    is in :attr:`notes`, one line each, for the caller to print once: left out silently, a symlink loop
    multiplied a dataset and a folder of GIFs looked like a smaller dataset, and nobody knew.

    Args:
        root: the image folder.
        list_file: optional text file with one image path per line, relative to ``root`` (its first
            whitespace-separated token is used, so ``path label`` lines work; blank lines and lines
            starting with ``#`` are skipped). The dataset then holds exactly the listed images.
        where: how :attr:`notes` name the folder (default ``data.root=ROOT``, the training option).
    """

    def __init__(self, root: str | os.PathLike | None, list_file: str | os.PathLike | None = None, *,
                 where: str | None = None) -> None:
        self.root = check_data_root(root)
        self.classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        self.notes: list[str] = []  # what the scan skipped, one line each (none for a list_file)
        if list_file:
            relative = _read_list_file(self.root, Path(list_file))
        else:
            scan = scan_images(self.root)
            relative = scan.paths
            self.notes = scan.notes(where or f"data.root={root}")
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
    """Decode ``path`` as an 8-bit RGB image, upright; a missing, truncated or non-image file is a
    :class:`DataError`.

    High-bit-depth images (16-bit grayscale PNG / TIFF: PIL modes ``I;16*``, ``I``, ``F``) are scaled to
    8 bits (:func:`to_8bit`); PIL's own ``convert("RGB")`` would clip them at 255. An EXIF orientation
    (a phone's portrait photo is stored sideways with a tag saying so) is applied, as every image viewer
    does, so training, evaluation and the figures all see the picture its owner sees.
    """
    return decode_rgb(path, str(path))


def decode_rgb(source: Path | IO[bytes], name: str) -> Image.Image:
    """:func:`load_rgb` of a path or an open binary file (a tar member's or a dataset row's bytes); ``name``
    says in the :class:`DataError` which image could not be read.

    This is the one decoder of every image file the package reads (folders, shards, Hugging Face rows,
    msn-eval, msn-viz), so the EXIF orientation is applied here and nowhere else.
    """
    try:
        with Image.open(source) as image:
            image.load()  # forces the decode, so a corrupt file fails here
            _apply_orientation(image)
            return to_8bit(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL signals bad data with OSError (incl. UnidentifiedImageError), SyntaxError or ValueError
        raise DataError(f"cannot read image {name}: {err}") from err


def _apply_orientation(image: Image.Image) -> None:
    """Turn a decoded ``image`` upright, in memory, by its EXIF Orientation tag (none or 1: as it is).

    ``in_place`` spares the copy that ``exif_transpose`` makes of every image without a tag. A malformed
    EXIF block leaves the pixels as stored: they decoded fine, and losing the image to its metadata
    would be worse than a sideways picture.
    """
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # PIL's EXIF parser fails in many ways on bad metadata (struct.error, KeyError, ...)
        pass


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


@dataclass
class FolderScan:
    """What :func:`scan_images` found below a folder, and what it left out and why (examples as text)."""

    paths: list[str] = field(default_factory=list)  # images: POSIX paths relative to the root, sorted
    other_extensions: Counter[str] = field(default_factory=Counter)  # not images by their extension: ext -> count
    loops: list[str] = field(default_factory=list)  # "a/loop -> ..": folder links into their own ancestors
    duplicate_folders: list[str] = field(default_factory=list)  # folders already listed under another path
    duplicate_files: list[str] = field(default_factory=list)  # image paths to a file already listed
    unreadable: list[str] = field(default_factory=list)  # "secret: Permission denied"

    def notes(self, where: str) -> list[str]:
        """One line per kind of thing skipped, each starting with ``where`` (e.g. ``data.root=/x``); none
        when nothing was."""
        notes = []
        links = [_counted(self.loops, "symlink loop"), _counted(self.duplicate_folders, "duplicate folder"),
                 _counted(self.duplicate_files, "duplicate path to a file already listed",
                          "duplicate paths to files already listed")]
        links = [text for text in links if text]
        if links:
            joined = links[0] if len(links) == 1 else f"{', '.join(links[:-1])} and {links[-1]}"
            notes.append(f"{where}: skipped {joined}; each file counts once")
        skipped = sum(self.other_extensions.values())
        if skipped:
            counts = ", ".join(f"{n:,} {ext}" for ext, n in sorted(self.other_extensions.items(),
                                                                    key=lambda item: (-item[1], item[0])))
            noun = "file that is not an image by its" if skipped == 1 else "files that are not images by their"
            images = f"{len(self.paths):,} image{'' if len(self.paths) == 1 else 's'}"
            notes.append(f"{where}: {images}; skipped {skipped:,} {noun} extension ({counts}; images are "
                         f"{' '.join(IMAGE_EXTENSIONS)})")
        if self.unreadable:
            folders = _counted(self.unreadable, "folder that cannot be read", "folders that cannot be read")
            notes.append(f"{where}: skipped {folders}; check their permissions")
        return notes


def _counted(examples: list[str], singular: str, plural: str | None = None) -> str:
    """``"2 symlink loops (a/loop -> .., b/up -> ../..)"``: a count and its first examples ("" for none)."""
    if not examples:
        return ""
    shown = ", ".join(examples[:2]) + (", ..." if len(examples) > 2 else "")
    noun = singular if len(examples) == 1 else (plural or f"{singular}s")
    return f"{len(examples):,} {noun} ({shown})"


def scan_images(root: Path) -> FolderScan:
    """Every image file below ``root`` (by extension, any case), each real file once, sorted by its path.

    Symlinked folders are followed (datasets are often assembled from links), but a folder is entered
    once: a link back into one of its own ancestors (``a/loop -> ..``) is a loop, skipped, and a second
    path to a folder already entered is a duplicate, skipped; a second path to an image already listed
    (a file link) is skipped too. Without this a single ``loop -> ..`` made ``os.walk(followlinks=True)``
    list every image dozens of times over, silently. Entries are visited in the order of their full
    relative paths, so the path kept for a real file is its first in sorted order (apart from paths
    through a loop). Identity is the real path (symlinks resolved), so hard links, which are separate
    files as far as the user can tell, still count separately. Broken links are listed (the loader
    reports them as undecodable, as before). No image at all is a :class:`DataError`.
    """
    scan = FolderScan()
    root_real = os.path.realpath(root)
    folders: dict[str, str] = {root_real: ""}  # real path -> the relative path it is listed under
    files: dict[str, str] = {}  # key of a file's real path (:func:`_real_key`) -> its listed relative path
    # Each frame: (its sorted entries, the folder's real path, the key prefix of its files, its relative path/)
    stack = [(_sorted_entries(root, "", scan), root_real, "", "")]
    if scan.unreadable:
        raise DataError(f"data.root={root} cannot be read ({scan.unreadable[0]}); check its permissions")
    while stack:
        entries, real, key_prefix, rel = stack[-1]
        item = next(entries, None)
        if item is None:
            stack.pop()
            continue
        entry, is_dir = item
        path = rel + entry.name
        link = entry.is_symlink()
        if is_dir:
            target = os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
            first = folders.get(target)
            if first is None:
                folders[target] = path
                prefix = _real_key(target, root_real) + "/"
                stack.append((_sorted_entries(Path(entry.path), path, scan), target, prefix, path + "/"))
            elif first == "" or path.startswith(first + "/"):  # an ancestor of this very entry
                scan.loops.append(_link_text(entry, path))
            else:
                scan.duplicate_folders.append(f"{_link_text(entry, path)}: already listed as {first}")
            continue
        # A plain file under a folder reached without links has the key ``path`` itself: no new string for
        # the common case (millions of files), and no system call; a link's target is resolved.
        key = _real_key(os.path.realpath(entry.path), root_real) if link else (
            path if key_prefix == rel else key_prefix + entry.name)
        first = files.setdefault(key, path)
        is_image = entry.name.lower().endswith(IMAGE_EXTENSIONS)
        if first is not path:  # identity, not equality: a later path to a file already seen
            if is_image:
                scan.duplicate_files.append(f"{_link_text(entry, path)}: already listed as {first}")
        elif is_image:
            scan.paths.append(path)
        else:
            scan.other_extensions[os.path.splitext(entry.name)[1].lower() or "without extension"] += 1
    scan.paths.sort()  # already in this order (see above); sorting a sorted list costs one pass
    if not scan.paths:
        others = sum(scan.other_extensions.values())
        held = f"; it holds {others:,} other file{'' if others == 1 else 's'}" if others else ""
        raise DataError(f"data.root={root} holds no images (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}{held}); pass data.root=/path/to/images")
    return scan


def _sorted_entries(folder: Path, rel: str, scan: FolderScan) -> Iterator[tuple[os.DirEntry, bool]]:
    """The entries of ``folder`` with whether each is a folder (links followed), sorted so that a depth-first
    walk meets the files in the sorted order of their full relative paths: a folder sorts as ``name/``
    (``a.b/x`` < ``a/x`` < ``a0/x``, as the full paths do). An unreadable folder is noted and has none."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as err:
        scan.unreadable.append(f"{rel or '.'}: {err.strerror or err}")
        return iter(())
    keyed = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:  # a link whose target cannot be examined: left to the loader, as a file
            is_dir = False
        keyed.append((entry.name + "/" if is_dir else entry.name, entry, is_dir))
    keyed.sort(key=lambda k: k[0])
    return ((entry, is_dir) for _, entry, is_dir in keyed)


def _real_key(real: str, root_real: str) -> str:
    """A real path as a key: relative to the root's real path when inside it (so that it equals the listed
    path of a file reached without links), else absolute (a leading ``/``: never equal to a relative one)."""
    base = root_real if root_real.endswith(os.sep) else root_real + os.sep  # data.root=/ is "/" already
    return real[len(base):].replace(os.sep, "/") if real.startswith(base) else real


def _link_text(entry: os.DirEntry, path: str) -> str:
    """``a/loop -> ..`` for a symlink (its target as written), ``path`` for anything else."""
    if entry.is_symlink():
        try:
            return f"{path} -> {os.readlink(entry.path)}"
        except OSError:
            pass
    return path


def _scan_images(root: Path) -> list[str]:
    """The image paths of :func:`scan_images` (for callers that only need the list: ``msn-shards``)."""
    return scan_images(root).paths


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
