"""Writing WebDataset shards from a folder of images (``msn-shards``), for ``data=webdataset``
(:mod:`msn.data.sources.webdataset` reads them)."""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from msn.data.sources.folder import check_data_root, scan_images
from msn.data.sources.webdataset import DEFAULT_IMAGE_KEYS
from msn.errors import DataError


@dataclass
class WrittenShards:
    """What :func:`write_shards` wrote: the ``data.shards`` pattern, the shard files and the sample count."""

    pattern: str
    files: list[Path]
    samples: int


def write_shards(src: str | os.PathLike, out: str | os.PathLike, *, per_shard: int = 1000,
                 shuffle_seed: int | None = None, overwrite: bool = False) -> WrittenShards:
    """Write the images under ``src`` as WebDataset shards ``OUT/shard-000000.tar``, ... of ``per_shard``
    samples each (the ``webdataset`` package's ``ShardWriter``).

    Each sample is ``NNNNNNNNN.EXT`` with the image's own bytes (``jpg``, ``jpeg``, ``png``, ``webp``; other
    formats are re-encoded as PNG, losslessly) and, when the image lies in a class folder of ``src``,
    ``NNNNNNNNN.cls`` with the class index (the sorted class folders, as ImageFolder numbers them), listed in
    ``OUT/classes.txt``. The order is the sorted paths, or a shuffle of them by ``shuffle_seed``.
    """
    import webdataset as wds

    root = check_data_root(src)
    out = Path(out)
    if per_shard < 1:
        raise DataError(f"--per-shard {per_shard} must be >= 1")
    existing = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if existing and not overwrite:
        raise DataError(f"{out} already holds {len(existing)} shards; pass --overwrite to replace them, or another OUT")
    for old in existing:
        old.unlink()
    relative = scan_images(root).paths
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(relative)
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    class_index = {name: i for i, name in enumerate(classes)}
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for number, rel in enumerate(relative):
            sink.write(_sample(root / rel, f"{number:09d}", class_index.get(Path(rel).parts[0])
                               if len(Path(rel).parts) > 1 else None))
    if classes:
        (out / "classes.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(classes)))
    files = sorted(out.glob("shard-*.tar"))
    last = len(files) - 1
    pattern = str(out / ("shard-000000.tar" if last == 0 else f"shard-{{000000..{last:06d}}}.tar"))
    return WrittenShards(pattern, files, len(relative))


def _sample(path: Path, key: str, label: int | None) -> dict[str, bytes | str]:
    """One WebDataset sample: the image's bytes under its extension (PNG for other formats), its class."""
    ext = path.suffix.lower().lstrip(".")
    if ext in DEFAULT_IMAGE_KEYS:
        data = path.read_bytes()
    else:
        buffer = io.BytesIO()
        with Image.open(path) as image:
            image.save(buffer, format="PNG")
        ext, data = "png", buffer.getvalue()
    sample: dict[str, bytes | str] = {"__key__": key, ext: data}
    if label is not None:
        sample["cls"] = str(label)
    return sample
