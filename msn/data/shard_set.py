"""The record of a complete shard set: ``OUT/shards.json``, written last by ``msn-shards``, checked by
``data=webdataset`` when a run starts and compared when it resumes. Torch-free.

The file is a `wids <https://github.com/webdataset/webdataset>`_ dataset description (``wids_version`` 1, a
``shardlist`` of ``{"url", "nsamples"}`` relative to the file), so other WebDataset tools read it too, with
msn's own fields beside: each shard's size in bytes and fingerprint, and the set's.

A fingerprint is a hash of a shard's index (its samples' keys, in order, the offset and size of each image
member in the tar file, and 8 bytes from the middle of each image), the same index a run reads through
(:func:`msn.data.sources.webdataset.index_shard`, cached between runs). It costs nothing at a run's start (the
index is built or loaded anyway), and it changes when a sample is added, dropped, renamed, reordered or
resized; an image replaced by another of exactly the same size that agrees in those 8 bytes goes unnoticed
(comparing every byte would mean reading every shard whole at every start).

A set being written lives in ``OUT/.msn-shards-partial-PID/`` until it is complete; the folder's presence
without a ``shards.json`` says that a write was interrupted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msn.errors import DataError
from msn.utils.files import atomic_write_text

MANIFEST = "shards.json"
PARTIAL_PREFIX = ".msn-shards-partial-"
KIND = "msn-shards-set-v1"


def fingerprint_of_shard(keys: Sequence[str], offsets: Sequence[int], sizes: Sequence[int], probes: str) -> str:
    """sha256 of one shard's index: for each sample, in order, its key and its image member's offset and size,
    and ``probes``, a few bytes from the middle of each image (:func:`msn.data.sources.webdataset.index_shard`)."""
    digest = hashlib.sha256()
    for key, offset, size in zip(keys, offsets, sizes, strict=True):
        digest.update(f"{key}\0{int(offset)}\0{int(size)}\n".encode())
    digest.update(probes.encode())
    return digest.hexdigest()


def fingerprint_of_set(fingerprints: Sequence[str]) -> str:
    """sha256 of the shards' fingerprints in the order the run reads them: another order is another set."""
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()


@dataclass
class ShardRecord:
    """One shard as ``shards.json`` records it: its file name (relative to the set's folder), samples, bytes,
    fingerprint."""

    url: str
    nsamples: int
    filesize: int
    fingerprint: str


def write_manifest(path: Path, name: str, shards: Sequence[ShardRecord], extra: dict[str, Any]) -> None:
    """Write ``path`` (a ``shards.json``) for ``shards`` of the set ``name``; ``extra``: msn's description of how
    they were made."""
    body = {
        "__kind__": KIND, "wids_version": 1, "name": name,
        "shardlist": [{"url": s.url, "nsamples": s.nsamples, "filesize": s.filesize, "fingerprint": s.fingerprint}
                      for s in shards],
        "samples": sum(s.nsamples for s in shards),
        "fingerprint": fingerprint_of_set([s.fingerprint for s in shards]),
        **extra,
    }
    atomic_write_text(path, json.dumps(body, indent=1) + "\n", fsync=True)


@dataclass
class ShardSet:
    """A ``shards.json`` as read: its shards by file name, and the image keys its fingerprints were made with."""

    records: dict[str, ShardRecord]
    image_keys: tuple[str, ...]


def read_manifest(folder: Path) -> ShardSet | None:
    """The set that ``folder/shards.json`` records; None when the folder has none (or another tool's). A file
    that is not a readable record is a :class:`DataError`."""
    path = folder / MANIFEST
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read as a shard set's record ({e}); write the set again with "
                        "msn-shards, or remove the file to train on the shards unchecked") from None
    if not isinstance(body, dict) or body.get("__kind__") != KIND:
        return None  # another tool's description (a plain wids one): not ours to check
    try:
        records = [ShardRecord(str(s["url"]), int(s["nsamples"]), int(s["filesize"]), str(s["fingerprint"]))
                   for s in body["shardlist"]]
        keys = tuple(str(k) for k in body["image_keys"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path} is damaged; write the set again with msn-shards") from None
    return ShardSet({r.url: r for r in records}, keys)


def partial_writes(folder: Path) -> list[Path]:
    """The unfinished ``msn-shards`` writes in ``folder`` (``.msn-shards-partial-PID``)."""
    try:
        return sorted(p for p in folder.iterdir() if p.name.startswith(PARTIAL_PREFIX))
    except OSError:
        return []


def check_shard_set(paths: Sequence[Path], fingerprints: Sequence[str], counts: Sequence[int],
                    file_sizes: Sequence[int], image_keys: Sequence[str]) -> list[str]:
    """Check local shards against the records of the sets they belong to; return notes to print once.

    ``paths``: the shard files a run reads, ``fingerprints`` and ``counts`` their indexes' (same order), made
    with ``image_keys``, and ``file_sizes`` their sizes in bytes. A shard whose folder has a ``shards.json``
    must be recorded there with the same sample count and size (and fingerprint, when the record's image keys
    are the run's), and every shard the record lists must still exist; a folder holding an unfinished write and
    no record is refused. A :class:`DataError` names the first problem and the fix.
    """
    notes: list[str] = []
    by_folder: dict[Path, list[int]] = {}
    for i, path in enumerate(paths):
        by_folder.setdefault(Path(path).parent, []).append(i)
    for folder, members in by_folder.items():
        shard_set = read_manifest(folder)
        if shard_set is None:
            if partial_writes(folder):
                raise DataError(f"{folder} holds an unfinished msn-shards write (interrupted) and no {MANIFEST}: its "
                                "shards may be a part of the images; run msn-shards again to write the whole set")
            continue
        records = shard_set.records
        same_keys = tuple(k.lower().lstrip(".") for k in image_keys) == shard_set.image_keys
        missing = [name for name in records if not (folder / name).is_file()]
        if missing:
            raise DataError(f"{folder}/{MANIFEST} lists {len(records)} shards, {len(missing)} of them missing "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); restore them or "
                            "write the set again with msn-shards")
        for i in members:
            name = Path(paths[i]).name
            record = records.get(name)
            if record is None:
                raise DataError(f"{paths[i]} is not part of the set that {folder}/{MANIFEST} records (it lists "
                                f"{len(records)} shards); remove the stray file or write the set again with msn-shards")
            size = file_sizes[i]
            if (record.nsamples, record.filesize) != (counts[i], size):
                differs = (f"{record.nsamples} samples, {record.filesize} bytes recorded in {MANIFEST}; {counts[i]} "
                           f"samples, {size} bytes now")
            elif same_keys and record.fingerprint != fingerprints[i]:
                differs = f"its samples or their order differ from those {MANIFEST} records"
            else:
                continue
            raise DataError(f"{paths[i]} is not the shard msn-shards wrote ({differs}); restore the set, or write it "
                            "again with msn-shards")
        if len(members) < len(records):
            notes.append(f"data.shards: {len(members)} of the {len(records)} shards of the set in {folder}")
    return notes
