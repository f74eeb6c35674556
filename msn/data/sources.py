"""The training sources by name: ``data.name`` -> the base dataset (index -> PIL RGB image) it reads."""

from __future__ import annotations

from torch.utils.data import Dataset

from msn.config import DataConfig
from msn.data.datasets import DigitsDataset, FashionMNISTDataset, ImageFolderDataset, SyntheticDataset
from msn.data.hf import HFImages
from msn.data.shards import WebDatasetImages, expand_shards
from msn.errors import DataError

DATASETS = ("digits", "fashion_mnist", "folder", "synthetic", "webdataset", "hf")


def build_dataset(cfg: DataConfig) -> Dataset:
    """The base dataset that ``cfg.name`` selects (digits | fashion_mnist | folder | synthetic | webdataset | hf)."""
    if cfg.name == "digits":
        return DigitsDataset(cfg.image_size)
    if cfg.name == "fashion_mnist":
        return FashionMNISTDataset(cfg.root, "train", cfg.image_size)
    if cfg.name == "folder":
        return ImageFolderDataset(cfg.root, cfg.list_file)
    if cfg.name == "synthetic":
        return SyntheticDataset(cfg.synthetic_size, cfg.image_size)
    if cfg.name == "webdataset":
        return WebDatasetImages(expand_shards(cfg.shards), list(cfg.image_keys), cfg.shard_cache)
    if cfg.name == "hf":
        return HFImages(cfg.path, cfg.split, cfg.image_key)
    raise DataError(f"data.name={cfg.name!r} is unknown; choose one of {', '.join(DATASETS)}")
