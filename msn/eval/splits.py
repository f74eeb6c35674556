"""Labelled splits for evaluation: the fixed digits split, Fashion-MNIST's official split, and ImageFolder
``train/`` + ``val/`` folders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msn.data.sources.digits import DigitsDataset
from msn.data.sources.fashion_mnist import FashionMNISTDataset, find_fashion_mnist
from msn.data.sources.folder import ImageFolderDataset
from msn.errors import DataError

log = logging.getLogger(__name__)

DIGITS_TEST_SIZE = 540  # fixed, stratified digits split: 1257 train / 540 test images (seed 0)


class _Subset:
    def __init__(self, base: Any, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[int(self.indices[i])]


@dataclass
class Split:
    """Labelled images: ``images[i]`` is a PIL image; ``labels`` (N,); ``ident`` names it for the cache.

    ``classes[k]`` names label k. The splits of one dataset share one class index (the training
    split's), so a label means the same class in both.
    """

    images: Any  # index -> PIL image
    labels: np.ndarray
    ident: str
    names: list[str]  # per image: path relative to the split root (folders) or the index (digits)
    classes: list[str]


def digits_splits() -> tuple[Split, Split]:
    """The fixed digits split: stratified, seed 0, 540 test images (30 %), the rest for training."""
    from sklearn.model_selection import train_test_split

    base = DigitsDataset(32)
    labels = np.array(base.targets)
    train_idx, test_idx = train_test_split(np.arange(len(base)), test_size=DIGITS_TEST_SIZE, stratify=labels,
                                           random_state=0)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    classes = [str(c) for c in range(10)]
    make = lambda idx, name: Split(_Subset(base, idx), labels[idx], f"digits-{name}", [str(i) for i in idx],  # noqa: E731
                                   classes)
    return make(train_idx, "train"), make(test_idx, "test")


def fashion_mnist_splits(root: Path | None = None) -> tuple[Split, Split]:
    """Fashion-MNIST's official split: 60,000 training and 10,000 test images at 28 px (``root``: see
    :func:`msn.data.sources.fashion_mnist.find_fashion_mnist`; None for Debian's folder)."""
    where = find_fashion_mnist(root)["train-images-idx3-ubyte"].parent.resolve()
    splits = []
    for name in ("train", "test"):
        ds = FashionMNISTDataset(root, name)
        splits.append(Split(ds, np.array(ds.targets, dtype=np.int64), f"fashion_mnist-{where}-{name}",
                            [str(i) for i in range(len(ds))], list(ds.classes)))
    return splits[0], splits[1]


def folder_splits(root: Path) -> tuple[Split, Split]:
    """``root/train`` and ``root/val`` in ImageFolder layout (``val`` may be named ``test``).

    Labels follow the training split's class index (its sorted class folders) in both splits; a class
    that only ``val`` has gets a label after all of train's, which no classifier trained on train can
    predict, so its images count as errors (see :func:`class_coverage`). The folders are scanned as
    training scans ``data.root`` (:func:`msn.data.sources.folder.scan_images`), and what was skipped is printed
    to stderr, one line per kind.
    """
    val = root / "val" if (root / "val").is_dir() else root / "test"
    if not (root / "train").is_dir() or not val.is_dir():
        raise DataError(f"--dataset {root}: expected {root}/train and {root}/val (ImageFolder layout)")
    datasets = {name: ImageFolderDataset(folder, where=str(folder))
                for name, folder in (("train", root / "train"), ("val", val))}
    for ds in datasets.values():  # files left out (not images, symlink loops, duplicates): said, never silent
        for note in ds.notes:
            log.warning(note)
    classes = list(datasets["train"].classes)
    classes += [c for c in datasets["val"].classes if c not in classes]
    index = {name: i for i, name in enumerate(classes)}
    splits = []
    for name, ds in datasets.items():
        if any(t < 0 for t in ds.targets):
            raise DataError(f"{ds.root} has images outside class folders; use folder/CLASS/image.jpg")
        labels = np.array([index[ds.classes[t]] for t in ds.targets], dtype=np.int64)
        rel = [str(p.relative_to(ds.root)) for p in ds.paths]
        splits.append(Split(ds, labels, f"folder-{root.resolve()}-{name}", rel, classes))
    return splits[0], splits[1]


def class_coverage(train: Split, test: Split) -> tuple[list[str], list[str]]:
    """Classes with training images but no test images, and classes with test images but no training images."""
    seen_train = {train.classes[k] for k in np.unique(train.labels)}
    seen_test = {test.classes[k] for k in np.unique(test.labels)}
    return sorted(seen_train - seen_test), sorted(seen_test - seen_train)


def coverage_warnings(train: Split, test: Split) -> list[str]:
    """One line per problem :func:`class_coverage` finds (none when both splits have the same classes)."""
    only_train, only_test = class_coverage(train, test)
    lines = []
    if only_test:
        lines.append(f"warning: {len(only_test)} class(es) have test images but no training images and cannot be "
                     f"predicted: {', '.join(only_test[:10])}{' ...' if len(only_test) > 10 else ''}")
    if only_train:
        lines.append(f"warning: {len(only_train)} class(es) have no test images: "
                     f"{', '.join(only_train[:10])}{' ...' if len(only_train) > 10 else ''}")
    return lines


def _eval_reader(dataset: str, option: str = "--dataset", fix: str = "") -> tuple[str, Path | None]:
    """Which splits ``dataset`` names, cheaply: ``("digits", None)``, ``("fashion_mnist", ROOT or None)`` or
    ``("folder", ROOT)``; anything else is a :class:`DataError` naming ``option`` (and ``fix``)."""
    if dataset == "digits":
        return "digits", None
    if dataset == "fashion_mnist":
        find_fashion_mnist(None)
        return "fashion_mnist", None
    folder = Path(str(dataset)).expanduser()
    try:
        find_fashion_mnist(folder)
        return "fashion_mnist", folder
    except DataError:
        pass
    if not ((folder / "train").is_dir() and ((folder / "val").is_dir() or (folder / "test").is_dir())):
        raise DataError(f"{option}={dataset} is not digits, fashion_mnist or a folder with train/ and val/ class "
                        f"folders (expected {folder}/train and {folder}/val, ImageFolder layout)"
                        f"{'; ' + fix if fix else ''}")
    return "folder", folder


def check_eval_dataset(dataset: str, option: str, fix: str = "") -> None:
    """Refuse, cheaply, an evaluation dataset :func:`load_splits` cannot read: not ``digits``, Fashion-MNIST that
    is not installed, or a folder without ``train/`` and ``val/`` (nor Fashion-MNIST's idx files)."""
    _eval_reader(dataset, option, fix)


def load_splits(dataset: str) -> tuple[Split, Split]:
    """``digits``, ``fashion_mnist`` (Debian's folder), a folder holding Fashion-MNIST's idx files, or a folder
    with ``train/`` and ``val/`` in ImageFolder layout (the choice :func:`check_eval_dataset` makes)."""
    reader, root = _eval_reader(dataset)
    if reader == "digits":
        return digits_splits()
    if reader == "fashion_mnist":
        return fashion_mnist_splits(root)
    return folder_splits(root)


def subsample_split(split: Split, count: int, seed: int = 0) -> Split:
    """``count`` images of ``split``, drawn with ``seed`` and stratified: each class keeps its share of the images
    (rounded by largest remainder, so that the counts add up to ``count``; at least one image a class), in the
    split's order. ``msn-eval --train-subset``: features of a big training split cost minutes on a CPU.

    A :class:`DataError` names the fix when ``count`` exceeds the split or is below its number of classes.
    """
    present, sizes = np.unique(split.labels, return_counts=True)
    if count > len(split.labels):
        raise DataError(f"--train-subset {count}: the training split has {len(split.labels)} images; use "
                        f"--train-subset up to {len(split.labels)}, or leave it out to use them all")
    if count < len(present):
        raise DataError(f"--train-subset {count}: the training split has {len(present)} classes; use "
                        f"--train-subset {len(present)} or more, so that every class keeps an image")
    # one image a class first, then the rest shared in proportion to the class sizes (largest remainders first)
    quota = 1 + (count - len(present)) * (sizes - 1) / max(int(sizes.sum()) - len(present), 1)
    take = np.floor(quota).astype(int)
    for c in np.argsort(-(quota - take), kind="stable")[:count - int(take.sum())]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(split.labels == label), size=int(n), replace=False)
             for label, n in zip(present, take, strict=True)]
    idx = np.sort(np.concatenate(picks))
    return Split(_Subset(split.images, idx), split.labels[idx], f"{split.ident}-subset{count}-seed{seed}",
                 [split.names[i] for i in idx], split.classes)


def read_subset_file(path: Path, train: Split) -> np.ndarray:
    """Indices into ``train`` of the images a subset file lists (original MSN format: one path a line).

    For ``digits`` a line is an index into the digits training split. Every listed image must exist.
    """
    lookup = {name: i for i, name in enumerate(train.names)}
    indices = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        token = line.split()[0] if line.strip() else ""
        if not token or token.startswith("#"):
            continue
        if token not in lookup:
            raise DataError(f"{path}:{n}: {token!r} is not an image of the training split")
        indices.append(lookup[token])
    if not indices:
        raise DataError(f"{path} lists no images")
    return np.array(indices)
