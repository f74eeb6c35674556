"""``data=hf``: a Hugging Face dataset as a training source: a folder written by ``save_to_disk``, a folder of
parquet or arrow files, or a hub id (only when the hub is reachable). Rows are read by index, so the folder
source's guarantees hold as they are (see :mod:`msn.data.sources.webdataset`); the image column's bytes are
decoded here, exactly as image files are (:func:`msn.data.images.decode_rgb`), so an undecodable row is replaced
and counted.

The ``datasets`` package is imported only when this source is used (it is the ``[datasets]`` extra). Torch-free.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image

from msn.config import DataConfig
from msn.data.images import decode_rgb
from msn.data.registry import Source, register_source, require
from msn.errors import DataError

_DATA_FILES = (".parquet", ".arrow")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("data=hf needs the datasets package: pip install 'msn[datasets]' (or pip install datasets)"
                        ) from None
    return datasets


def _offline() -> bool:
    """HF_HUB_OFFLINE as it is now (the packages read it once, when first imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _offline_message(path: str) -> str:
    return (f"data.path={path} is no local folder, and the Hugging Face hub is offline here (HF_HUB_OFFLINE=1); "
            "download the dataset once elsewhere (save_to_disk) and pass its folder")


def check_hf_source(path: str, split: str = "train", image_key: str = "image") -> None:
    """The cheap part of :func:`load_hf_split`'s checks (before a run directory is made): the package is
    installed, a local path exists, its parquet files can be read (their footers: a truncated download is named
    here, not after seconds of start-up), and the image column holds images, not file paths."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        _import_datasets()
    local = Path(path).expanduser()
    if path.startswith(("/", ".", "~")) and not local.is_dir():
        raise DataError(f"data.path={path} {'is not a folder' if local.exists() else 'does not exist'}; pass a "
                        "save_to_disk folder, a folder of parquet or arrow files, or a hub id")
    if not local.is_dir() and _offline():
        raise DataError(_offline_message(path))
    if local.is_dir():
        _check_local_columns(path, local, split, image_key)


def _check_local_columns(path: str, folder: Path, split: str, image_key: str) -> None:
    """Read the schema of every parquet file under ``folder`` and a save_to_disk folder's ``dataset_info.json``:
    a damaged file, or an image column of strings, is one :class:`DataError`."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    for info in (folder / "dataset_info.json", folder / split / "dataset_info.json"):
        try:
            feature = json.loads(info.read_text()).get("features", {}).get(image_key)
        except (OSError, ValueError, AttributeError):
            continue  # absent, or not ours to judge: the datasets package reads it and says
        if isinstance(feature, dict) and feature.get("dtype") in ("string", "large_string"):
            raise DataError(paths_column_message(path, image_key))
    for file in sorted(folder.rglob("*.parquet")):
        try:
            schema = pq.read_schema(file)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{file} is not a readable parquet file ({str(e).splitlines()[0]}); download or write it "
                            "again, or move it out of data.path") from None
        kind = schema.field(image_key).type if image_key in schema.names else None
        if kind is not None and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(paths_column_message(path, image_key))


def paths_column_message(path: str, image_key: str) -> str:
    """What to do when the image column holds strings (file paths, as a table of paths and labels has)."""
    return (f"data.path={path}: column {image_key} holds strings (file paths?), not images; store it as an image "
            f"column (ds = ds.cast_column('{image_key}', datasets.Image()); ds.save_to_disk(DIR), then "
            "data.path=DIR), or train on the image files with data=folder data.root=DIR")


def load_hf_split(path: str, split: str) -> Any:
    """The ``split`` of the dataset at ``path`` (a ``datasets.Dataset``); each failure is one :class:`DataError`."""
    datasets = _import_datasets()
    folder = Path(path).expanduser()
    if folder.is_dir():
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            loaded = datasets.load_from_disk(str(folder))  # save_to_disk's folder: a DatasetDict or one Dataset
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"data.split={split}: {folder} holds the splits {', '.join(loaded)}; pass "
                                    "data.split=NAME")
                return loaded[split]
            return loaded
        if not any(p.suffix in _DATA_FILES for p in folder.rglob("*")):
            raise DataError(f"data.path={path} holds neither a save_to_disk dataset nor parquet / arrow files")
        try:
            return datasets.load_dataset(str(folder), split=split)
        except ValueError as e:  # an unknown split, files of several formats, ...
            raise DataError(f"data.path={path}, data.split={split}: {str(e).splitlines()[0]}") from None
    if folder.exists() or path.startswith(("/", ".", "~")):  # a local path, not a hub id (user/name)
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"data.path={path} {what}; pass a save_to_disk folder, a folder of parquet or arrow files, "
                        "or a hub id")
    if datasets.config.HF_HUB_OFFLINE or _offline():
        raise DataError(_offline_message(path))
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as e:  # no network, an unknown id, a gated dataset: say which, in one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data.path={path}: not a local folder, and the hub could not provide it ({reason}); pass a "
                        "local folder, or check the id and the network") from None


class HFImages:
    """index -> PIL RGB image of column ``image_key`` of a Hugging Face dataset split.

    Args:
        path: ``save_to_disk`` folder, folder of parquet / arrow files, or hub id.
        split: the split to train on (``train``).
        image_key: the image column: an ``Image`` feature, bytes, or a dict with ``bytes`` / ``path``.
    """

    decodes_read_bytes = True  # self[index] is decode_rgb(read_bytes(index)): msn.data.images.stored_bytes

    def __init__(self, path: str, split: str = "train", image_key: str = "image") -> None:
        datasets = _import_datasets()
        table = load_hf_split(str(path), split)
        if image_key not in table.column_names:
            raise DataError(f"data.image_key={image_key}: {path} [{split}] has the columns "
                            f"{', '.join(table.column_names)}; pass data.image_key=COLUMN")
        feature = table.features[image_key]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            raise DataError(paths_column_message(str(path), image_key))  # a hub dataset's (local ones: the check)
        if isinstance(feature, datasets.Image):
            table = table.cast_column(image_key, datasets.Image(decode=False))  # we decode, as for files
        self.table = table.select_columns([image_key])
        self.path, self.split, self.image_key = str(path), split, image_key
        if len(self.table) == 0:
            raise DataError(f"data.path={path} [{split}] has no rows")

    def __len__(self) -> int:
        return len(self.table)

    def name(self, index: int) -> str:
        return f"{self.path} [{self.split}] row {index}"

    def __getitem__(self, index: int) -> Image.Image:
        value = self.table[int(index)][self.image_key]
        if isinstance(value, dict):  # an Image feature left undecoded: bytes, or a path to the file
            if value.get("bytes"):
                return decode_rgb(io.BytesIO(value["bytes"]), self.name(index))
            if value.get("path"):
                return decode_rgb(Path(value["path"]), f"{self.name(index)} ({value['path']})")
        if isinstance(value, (bytes, bytearray)):
            return decode_rgb(io.BytesIO(bytes(value)), self.name(index))
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        raise DataError(f"{self.name(index)}: column {self.image_key} holds no image ({type(value).__name__})")

    def read_bytes(self, index: int) -> bytes:
        """Row ``index``'s image as stored (its bytes, or its file's), undecoded."""
        value = self.table[int(index)][self.image_key]
        if isinstance(value, dict) and value.get("bytes"):
            return bytes(value["bytes"])
        if isinstance(value, dict) and value.get("path"):
            return Path(value["path"]).read_bytes()
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise DataError(f"{self.name(index)}: column {self.image_key} holds no stored image bytes")


@register_source
class HFSource(Source):
    """``data=hf``: column ``data.image_key`` of split ``data.split`` of ``data.path`` (:class:`HFImages`)."""

    name = "hf"
    summary = "a Hugging Face dataset: data.path=DIR (save_to_disk, parquet / arrow files) or a hub id; data.split"

    def check(self, cfg: DataConfig | DictConfig) -> None:
        check_hf_source(require(cfg, "path", "data.path=/path/to/saved_dataset (save_to_disk), a folder of parquet "
                                "/ arrow files, or a hub id"), cfg.split, cfg.image_key)

    def build(self, cfg: DataConfig | DictConfig) -> HFImages:
        return HFImages(cfg.path, cfg.split, cfg.image_key)

    def where(self, cfg: DataConfig | DictConfig) -> str:
        return f"{cfg.path} [{cfg.split}]"
