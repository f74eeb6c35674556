"""Labelled splits for evaluation: the fixed digits split and ImageFolder ``train/`` + ``val/`` folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from msn.data import DataError, DigitsDataset, ImageFolderDataset

DIGITS_TEST_SIZE = 540  # fixed, stratified digits split: 1257 train / 540 test images (seed 0)


class _Subset(Dataset):
    def __init__(self, base: Any, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[int(self.indices[i])]


@dataclass
class Split:
    """Labelled images: ``images[i]`` is a PIL image; ``labels`` (N,); ``ident`` names it for the cache."""

    images: Dataset
    labels: np.ndarray
    ident: str
    names: list[str]  # per image: path relative to the split root (folders) or the index (digits)


def digits_splits() -> tuple[Split, Split]:
    """The fixed digits split: stratified, seed 0, 540 test images (30 %), the rest for training."""
    from sklearn.model_selection import train_test_split

    base = DigitsDataset(32)
    labels = np.array(base.targets)
    train_idx, test_idx = train_test_split(np.arange(len(base)), test_size=DIGITS_TEST_SIZE, stratify=labels,
                                           random_state=0)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    make = lambda idx, name: Split(_Subset(base, idx), labels[idx], f"digits-{name}", [str(i) for i in idx])  # noqa: E731
    return make(train_idx, "train"), make(test_idx, "test")


def folder_splits(root: Path) -> tuple[Split, Split]:
    """``root/train`` and ``root/val`` in ImageFolder layout (``val`` may be named ``test``)."""
    val = root / "val" if (root / "val").is_dir() else root / "test"
    if not (root / "train").is_dir() or not val.is_dir():
        raise DataError(f"--dataset {root}: expected {root}/train and {root}/val (ImageFolder layout)")
    splits = []
    for name, folder in (("train", root / "train"), ("val", val)):
        ds = ImageFolderDataset(folder)
        labels = np.array(ds.targets)
        if (labels < 0).any():
            raise DataError(f"{folder} has images outside class folders; use folder/CLASS/image.jpg")
        rel = [str(p.relative_to(folder)) for p in ds.paths]
        splits.append(Split(ds, labels, f"folder-{root.resolve()}-{name}", rel))
    return splits[0], splits[1]


def load_splits(dataset: str) -> tuple[Split, Split]:
    return digits_splits() if dataset == "digits" else folder_splits(Path(dataset))


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
