"""Writing WebDataset shards from a folder of images (``msn-shards``), for ``data=webdataset``
(:mod:`msn.data.sources.webdataset` reads them).

A set is written whole or not at all: the new shards go into ``OUT/.msn-shards-partial-PID/``, and only once
every image is in them (and their record, ``shards.json``, :mod:`msn.data.shard_set`) do they replace the
folder's earlier set, file by file, the record last. An interrupted, refused or failed write leaves the
earlier set as it was (or nothing), never a part of the images that looks like a whole set.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from msn.data.shard_set import (
    MANIFEST,
    PARTIAL_PREFIX,
    ShardRecord,
    fingerprint_of_set,
    fingerprint_of_shard,
    partial_writes,
    write_manifest,
)
from msn.data.sources.folder import check_data_root, scan_images
from msn.data.sources.webdataset import DEFAULT_IMAGE_KEYS, index_shard
from msn.errors import DataError, WriteStopped

_SHARD = re.compile(r"shard-\d{6,}\.tar")
_TAR_OVERHEAD = 1536  # bytes a sample adds to its image: two 512-byte member headers and the padding


@dataclass
class WrittenShards:
    """What :func:`write_shards` wrote: the ``data.shards`` pattern, the shard files, the sample count, the
    files of ``src`` left out (``skip_bad``: ``"PATH: why"``) and the set's fingerprint."""

    pattern: str
    files: list[Path]
    samples: int
    skipped: list[str] = field(default_factory=list)
    fingerprint: str = ""


class UnreadableImage(DataError):
    """A file of ``src`` that cannot be read as an image; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"SRC file {path} cannot be read as an image ({reason})")
        self.reason = reason


def write_shards(src: str | os.PathLike, out: str | os.PathLike, *, per_shard: int = 1000,
                 shuffle_seed: int | None = None, overwrite: bool = False, skip_bad: bool = False,
                 stopping: Callable[[], str | None] | None = None) -> WrittenShards:
    """Write the images under ``src`` as WebDataset shards ``OUT/shard-000000.tar``, ... of ``per_shard``
    samples each (the ``webdataset`` package's ``ShardWriter``), and their record ``OUT/shards.json``.

    Each sample is ``NNNNNNNNN.EXT`` with the image's own bytes (``jpg``, ``jpeg``, ``png``, ``webp``; other
    formats are re-encoded as PNG, losslessly) and, when the image lies in a class folder of ``src``,
    ``NNNNNNNNN.cls`` with the class index (the sorted class folders, as ImageFolder numbers them), listed in
    ``OUT/classes.txt``. The order is the sorted paths, or a shuffle of them by ``shuffle_seed``.

    Every file is opened as an image first (its header: cheap); one that is not (a broken link, a file that
    is not an image) stops the write naming it, or with ``skip_bad`` is left out and listed in the record.
    ``OUT`` must be new, empty or hold a set msn-shards wrote (replaced only with ``overwrite``); a folder
    holding other files is refused, so nothing of the user's is ever deleted. ``stopping()`` is polled between
    images: a non-empty answer (``"SIGTERM"``) abandons the write (:class:`WriteStopped`).
    """
    root = check_data_root(src, where=f"SRC {src}", fix="give msn-shards a folder of images")
    out = Path(out).expanduser()
    if per_shard < 1:
        raise DataError(f"--per-shard {per_shard} must be >= 1")
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {out} is a file, not a folder; give a folder for the shards")
    poll = _Poll(stopping, out)
    relative = scan_images(root, where=f"SRC {src}", fix="give msn-shards a folder of images").paths
    poll()
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(relative)
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    try:
        out.mkdir(parents=True)
        created = True  # only the call whose mkdir made it: a second msn-shards racing for OUT sees it exist
    except FileExistsError:
        created = False
    staging = out / f"{PARTIAL_PREFIX}{os.getpid()}"
    replacing = False
    try:
        with _exclusive(out):
            earlier = _earlier_set(out, overwrite)  # under the lock: a set another call finished meanwhile counts
            for stale in partial_writes(out):  # an earlier write killed outright (we hold the lock: nobody's)
                shutil.rmtree(stale, ignore_errors=True)
            _check_space(out, root, relative, poll)
            staging.mkdir()
            skipped = _write_samples(staging, root, relative, classes, per_shard, skip_bad, poll)
            records = _records(staging, poll)
            if classes:
                (staging / "classes.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(classes)))
            write_manifest(staging / MANIFEST, out.resolve().name, records, {
                "image_keys": list(DEFAULT_IMAGE_KEYS), "source": str(root.resolve()), "per_shard": per_shard,
                "shuffle_seed": shuffle_seed, "classes": len(classes), "left_out": skipped,
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            poll()
            replacing = True  # from here OUT holds no record until the new one arrives: no way back
            _replace(staging, out, earlier)
    except BaseException as e:
        if replacing:  # keep what is left of the new set: with no record beside it, data=webdataset refuses OUT
            if isinstance(e, OSError):
                raise DataError(f"cannot finish replacing the set in {out} ({e.strerror or e}): it now holds an "
                                "unfinished replacement, which data=webdataset refuses; run the same command "
                                "again") from None
            raise
        shutil.rmtree(staging, ignore_errors=True)
        if created and not isinstance(e, _Busy):
            shutil.rmtree(out, ignore_errors=True)  # a folder this call made holds nothing of anyone's
        if isinstance(e, OSError):  # writing (reading a source file is an UnreadableImage): the disk, the folder
            raise _write_failure(out, e) from None
        raise
    files = [out / r.url for r in records]
    last = len(files) - 1
    pattern = str(out / ("shard-000000.tar" if last == 0 else f"shard-{{000000..{last:06d}}}.tar"))
    return WrittenShards(pattern, files, sum(r.nsamples for r in records), skipped,
                         fingerprint_of_set([r.fingerprint for r in records]))


class _Busy(DataError):
    """Another msn-shards holds OUT."""


class _Poll:
    """``poll()`` raises :class:`WriteStopped` once ``stopping()`` answers (a signal the caller caught)."""

    def __init__(self, stopping: Callable[[], str | None] | None, out: Path) -> None:
        self.stopping, self.out = stopping, out

    def __call__(self) -> None:
        reason = self.stopping() if self.stopping is not None else None
        if reason:
            raise WriteStopped(f"stopped by {reason} before the set was complete; {self.out} is unchanged (run the "
                               "same command again to write the set)")


def _write_samples(staging: Path, root: Path, relative: list[str], classes: list[str], per_shard: int,
                   skip_bad: bool, poll: _Poll) -> list[str]:
    """Write the images ``root/relative`` into shards in ``staging``; return the files left out (``skip_bad``)."""
    import webdataset as wds

    class_index = {name: i for i, name in enumerate(classes)}
    skipped: list[str] = []
    number = 0
    with wds.ShardWriter(str(staging / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for rel in relative:
            poll()
            label = class_index.get(Path(rel).parts[0]) if len(Path(rel).parts) > 1 else None
            try:
                sample = _sample(root / rel, f"{number:09d}", label)
            except UnreadableImage as bad:
                if not skip_bad:
                    raise DataError(f"{bad}; remove it, or pass --skip-bad to leave such files out (they are "
                                    f"listed in {MANIFEST}); {poll.out} is unchanged") from None
                skipped.append(f"{rel}: {bad.reason}")
                continue
            sink.write(sample)
            number += 1
    if not number:
        raise DataError(f"SRC {root}: none of its {len(relative)} images could be read ({skipped[0]}, ...); "
                        f"{poll.out} is unchanged")
    return skipped


def _earlier_set(out: Path, overwrite: bool) -> list[Path]:
    """The files of a set msn-shards wrote earlier in ``out`` (to replace), after refusing what must not be
    replaced: another file of the user's there, or a set without ``overwrite``."""
    entries = sorted(out.iterdir())
    shards = [p for p in entries if _SHARD.fullmatch(p.name) and p.is_file()]
    record = [p for p in entries if p.name == MANIFEST]
    classes = [p for p in entries if p.name == "classes.txt" and p.is_file()]
    # a classes.txt beside shards is the set's; alone, it is the user's own
    ours = {*shards, *record, *partial_writes(out), *(classes if shards or record else [])}
    foreign = [p.name for p in entries if p not in ours]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DataError(f"OUT {out} holds {len(foreign)} file{'s' if len(foreign) > 1 else ''} msn-shards did not "
                        f"write ({shown}); give an empty or new folder for the shards")
    if (shards or record) and not overwrite:
        raise DataError(f"{out} already holds {len(shards)} shards; pass --overwrite to replace them, or another OUT")
    return [*shards, *record, *classes]


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``out`` against a second msn-shards writing into it (a lock on the folder itself)."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _Busy(f"another msn-shards is writing {out}; wait for it to end, or give another OUT") from None
            # a file system without locks: go on unguarded
        yield
    finally:
        os.close(fd)


def _check_space(out: Path, root: Path, relative: list[str], poll: _Poll) -> None:
    """Refuse before writing when ``out``'s file system cannot hold the new set beside the earlier one."""
    needed = 0
    for i, rel in enumerate(relative):
        if i % 1000 == 0:
            poll()
        try:
            needed += os.stat(root / rel).st_size + _TAR_OVERHEAD
        except OSError:
            pass  # a broken link: reported, with its name, when it is read
    free = shutil.disk_usage(out).free
    if needed > free:
        raise DataError(f"OUT {out} has {_size(free)} free, and the new set needs about {_size(needed)} (beside any "
                        "set it replaces, which is kept until the new one is complete); free some space or give "
                        "another OUT")


def _write_failure(out: Path, e: OSError) -> DataError:
    reason = "no space left on its device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return DataError(f"cannot write the shards into {out}: {reason}; {out} is unchanged (the new set replaces an "
                     "earlier one only once it is complete)")


def _records(staging: Path, poll: _Poll) -> list[ShardRecord]:
    """The record of each shard written in ``staging``, read back through the index a run uses."""
    records = []
    for path in sorted(staging.glob("shard-*.tar")):
        poll()
        scan = index_shard(path, DEFAULT_IMAGE_KEYS)
        records.append(ShardRecord(path.name, len(scan.keys), path.stat().st_size,
                                   fingerprint_of_shard(scan.keys, scan.offsets, scan.sizes, scan.probes)))
    return records


def _replace(staging: Path, out: Path, earlier: list[Path]) -> None:
    """Move the complete set from ``staging`` into ``out`` over the ``earlier`` one: the old record goes
    first and the new one comes last, so a kill or a failure in between leaves no record and the staging
    folder (never removed then), and ``data=webdataset`` refuses the mix rather than training on it."""
    (out / MANIFEST).unlink(missing_ok=True)
    moved = {p.name for p in staging.iterdir() if p.name != MANIFEST}
    for name in sorted(moved):
        os.replace(staging / name, out / name)
    for old in earlier:
        if old.name not in moved and old.name != MANIFEST:
            old.unlink(missing_ok=True)
    os.replace(staging / MANIFEST, out / MANIFEST)
    staging.rmdir()


def _sample(path: Path, key: str, label: int | None) -> dict[str, bytes | str]:
    """One WebDataset sample: the image's bytes under its extension (PNG for other formats), its class. A file
    that cannot be read or is not an image is an :class:`UnreadableImage`."""
    ext = path.suffix.lower().lstrip(".")
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            if ext in DEFAULT_IMAGE_KEYS:
                image.verify()  # the header and, for PNG, the chunks' checksums: no pixel decoding
            else:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                ext, data = "png", buffer.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = ("a broken link" if path.is_symlink() and not path.exists()
                  else e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__)
        raise UnreadableImage(path, reason) from e
    sample: dict[str, bytes | str] = {"__key__": key, ext: data}
    if label is not None:
        sample["cls"] = str(label)
    return sample


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
