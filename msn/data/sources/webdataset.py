"""``data=webdataset``: WebDataset tar shards, read by random access through an index of their tar headers.

A shard is a tar file whose consecutive members sharing a key (``dir/0001.jpg``, ``dir/0001.cls``) form one
sample (the WebDataset convention). :class:`WebDatasetImages` indexes every shard once, when the run starts
(a scan of the raw tar headers, :class:`tar_members`; the index is cached for the next run), and then reads a
sample's image member at its offset with one ``pread``. So a sample is an index like a file of a folder, and
everything the folder source guarantees holds unchanged: the epoch order is the same function of (seed, epoch),
each process reads its own share of every global batch, a resume at any step skips nothing it would have to
read, and an undecodable sample is replaced and counted (:class:`msn.data.MultiCropDataset`).

Shards are named by a brace pattern (``/data/in21k/shard-{000000..001023}.tar``), a glob, a list, or
``pipe:COMMAND`` URLs (``pipe:aws s3 cp s3://bucket/shard-000000.tar -``), the way object stores are read; a
``pipe:`` or ``http(s)://`` shard is copied once into ``data.shard_cache`` (it must be seekable), through the
``webdataset`` package's ``gopen``. :func:`msn.data.shard_writer.write_shards` (``msn-shards``) writes shards
from a folder of images. Torch-free.
"""


from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from msn.config import DataConfig
from msn.data.images import decode_rgb
from msn.data.registry import Source, register_source, require
from msn.data.shard_set import check_shard_set, fingerprint_of_set, fingerprint_of_shard
from msn.errors import BadSample, ConfigError, DataError, DataGone
from msn.utils.files import atomic_write

DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://")
_NO_IMAGE, _CUT = -1, -2  # offsets of a sample without an image member, and of the unreadable tail of a shard


def shard_cache(cache_dir: str | os.PathLike | None) -> Path:
    """``data.shard_cache``, by default ``$XDG_CACHE_HOME/msn/shards`` (``~/.cache/msn/shards``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "msn" / "shards"


def is_remote(url: str) -> bool:
    """Whether ``url`` must be fetched (``pipe:``, ``http(s)://``, ...) rather than read in place."""
    return url.startswith(_REMOTE)


def expand_shards(spec: str | Sequence[str] | None) -> list[str]:
    """The shard URLs ``spec`` names, in order: brace patterns expanded, local globs matched, each local file
    checked. A pattern that names nothing or a local shard that does not exist is a :class:`DataError`."""
    from braceexpand import braceexpand  # a dependency of webdataset

    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise DataError("data.shards is not set; pass data.shards='/data/shard-{000000..000099}.tar' "
                        "(a brace pattern, a glob, a list, or pipe:COMMAND URLs)")
    patterns = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if is_remote(url):
                urls.append(url)
            elif glob.has_magic(url):
                matched = sorted(glob.glob(os.path.expanduser(url)))
                if not matched:
                    raise DataError(f"data.shards: the pattern {url} matches no file; check the path")
                urls.extend(matched)
            else:
                urls.append(os.path.expanduser(url))
    if not urls:
        raise DataError(f"data.shards={spec} names no shard; pass a brace pattern, a glob or a list of tar files")
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise DataError(f"data.shards: {missing[0]} does not exist ({len(missing)} of the {len(urls)} shards named "
                        "are missing); check data.shards")
    return urls


def fetch_shard(url: str, cache_dir: str | os.PathLike | None) -> Path:
    """A local, seekable copy of ``url``: the file itself when it is local, else a copy in ``cache_dir``
    (made once, atomically, through ``webdataset.gopen``; later runs reuse it)."""
    if not is_remote(url):
        return Path(url)
    from webdataset.gopen import gopen

    local = cached_copy(url, cache_dir)
    if local.is_file():
        return local
    try:
        stream = gopen(url, "rb")
        try:
            atomic_write(local, lambda f: shutil.copyfileobj(stream, f, 1 << 20), fsync=False)
        finally:
            stream.close()  # a pipe: command that failed raises here
    except Exception as e:  # the command's own failure, whatever the fetcher reports it as
        local.unlink(missing_ok=True)
        status = re.search(r"exit (-?\d+)", str(e))
        reason = f"the command exited with status {status.group(1)}" if status else (str(e).splitlines() or [
            type(e).__name__])[0]
        raise DataError(f"data.shards: could not fetch {url} ({reason}); check the command or URL, or copy the "
                        "shards to a local folder") from None
    return local


def cached_copy(url: str, cache_dir: str | os.PathLike | None) -> Path:
    """Where :func:`fetch_shard` keeps its copy of the remote shard ``url`` (it may not exist yet)."""
    name = url.rstrip("/").split("/")[-1].split()[-1] or "shard.tar"
    return shard_cache(cache_dir) / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{Path(name).name}"


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's key and extension of a member: ``a/b/0001.seg.png`` -> (``a/b/0001``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class ShardIndex:
    """Where each sample's image is: per sample its shard (S,), the image member's offset and size in bytes
    (S,) (offset -1: the sample has no image member; -2: the shard's unreadable tail) and its key."""

    shard: np.ndarray  # int32
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    keys: list[str]


class ShardScan(NamedTuple):
    """:func:`index_shard`'s answer for one shard: per sample (in order) its image member's offset and size and
    its key (see :class:`ShardIndex`); the members that repeat a member name of their sample (not read), the
    image members beside the one read (a sample is one image: the first), and the keys of samples that reuse a
    key met earlier in the shard (read as separate samples)."""

    offsets: list[int]
    sizes: list[int]
    keys: list[str]
    repeated: list[str]
    extra_images: list[str]
    reused_keys: list[str]
    probes: str  # 8 bytes from the middle of each image member, in hex: a content check a start can afford


def index_shard(path: Path, image_keys: Sequence[str]) -> ShardScan:
    """The samples of one shard, in order; see :class:`ShardScan`.

    Reads only the tar headers (:func:`tar_members`). A member whose data runs past the end of the file keeps
    its place (its read fails later and is counted as a bad sample). A shard that ends without tar's
    end-of-archive blocks, or with a damaged header, was cut short: one ``_CUT`` sample stands for whatever
    followed, so that the loss is counted too.
    """
    wanted = {k.lower().lstrip(".") for k in image_keys}
    offsets: list[int] = []
    sizes: list[int] = []
    keys: list[str] = []
    repeated: list[str] = []
    extra_images: list[str] = []
    reused_keys: list[str] = []
    seen: set[str] = set()
    names: set[str] = set()  # the current sample's member names
    current = None
    try:
        file_size = path.stat().st_size
        members = tar_members(path)
        for name, offset, size, regular in members:
            if not regular:
                continue
            key, ext = split_member(name)
            if key != current:  # a new sample starts
                if key in seen:
                    reused_keys.append(key)
                current, names = key, set()
                seen.add(key)
                offsets.append(_NO_IMAGE)
                sizes.append(0)
                keys.append(key)
            if name in names:  # tar allows a name twice; extracting would keep the last, we keep the first
                repeated.append(name)
                continue
            names.add(name)
            if ext in wanted:
                if offsets[-1] == _NO_IMAGE:
                    offsets[-1], sizes[-1] = offset, size
                else:
                    extra_images.append(name)
        complete = members.complete
    except OSError as e:
        raise DataError(f"data.shards: cannot read {path} ({e.strerror or e})") from None
    if not complete:
        offsets.append(_CUT)
        sizes.append(0)
        keys.append("(the unreadable rest of the shard)")
    for i, (offset, size) in enumerate(zip(offsets, sizes, strict=True)):
        if offset >= 0 and offset + size > file_size:
            sizes[i] = max(file_size - offset, 0)  # truncated: the decode fails and the sample is counted
    return ShardScan(offsets, sizes, keys, repeated, extra_images, reused_keys, _probes(path, offsets, sizes))


def _probes(path: Path, offsets: Sequence[int], sizes: Sequence[int]) -> str:
    """8 bytes from the middle of each image member (hex): two shards whose samples have the same keys and
    sizes (a set written again in another order, of images of one size) still differ here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return "".join(os.pread(fd, 8, o + max(s // 2 - 4, 0)).hex().ljust(16, "0") if o >= 0 else "-" * 16
                       for o, s in zip(offsets, sizes, strict=True))
    finally:
        os.close(fd)


class tar_members:  # noqa: N801  (used as a function that also reports how the archive ended)
    """Iterate ``(name, data offset, size, is a regular file)`` over a tar file's members from their raw
    headers (ustar, GNU long names and PAX ``path`` / ``size`` records), about 8x faster than :mod:`tarfile`,
    whose per-member objects dominate the cost of indexing millions of samples. After the loop, ``complete``
    says whether the archive ended with its end-of-archive block (False: truncated or a damaged header).
    """

    def __init__(self, path: Path) -> None:
        self.path, self.complete = path, False

    def __iter__(self):
        fd = os.open(self.path, os.O_RDONLY)
        try:
            end, position = os.fstat(fd).st_size, 0
            pax: dict[bytes, bytes] = {}
            long_name = None
            while position + 512 <= end:
                header = os.pread(fd, 512, position)
                if header == _ZERO_BLOCK:
                    self.complete = True
                    return
                if not _checksum_ok(header):
                    return  # a damaged header: nothing after it can be located
                size, kind, data = _octal_size(header), header[156:157], position + 512
                if kind == b"x":  # PAX extended header: records for the next member
                    pax = _pax_records(os.pread(fd, size, data))
                elif kind == b"L":  # GNU long name of the next member
                    long_name = os.pread(fd, size, data).split(b"\0", 1)[0].decode("utf-8", "replace")
                elif kind != b"g":
                    name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                    if prefix:
                        name = f"{prefix.decode('utf-8', 'replace')}/{name}"
                    if b"path" in pax:
                        name = pax[b"path"].decode("utf-8", "replace")
                    elif long_name is not None:
                        name = long_name
                    if b"size" in pax:
                        size = int(pax[b"size"])
                    yield name.rstrip("/"), data, size, kind in (b"0", b"\0", b"7")  # folders: no trailing /
                    pax, long_name = {}, None
                position = data + (size + 511) // 512 * 512
        except ValueError:  # a size or record that is not a number: a damaged header
            return
        finally:
            os.close(fd)


_ZERO_BLOCK = b"\0" * 512


def _checksum_ok(header: bytes) -> bool:
    """tar's header checksum: the sum of its bytes with the checksum field read as spaces."""
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _octal_size(header: bytes) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``LENGTH KEY=VALUE\\n`` records of a PAX extended header."""
    records, i = {}, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        records[key] = value
        i += length
    return records


def cached_index(path: Path, image_keys: Sequence[str], cache_dir: str | os.PathLike | None) -> ShardScan:
    """:func:`index_shard`, kept in ``CACHE/index/`` for the next run: keyed by the shard's real path, size and
    modification time and the image keys, so a changed shard is indexed again. Scanning costs about 0.1 ms a
    sample in Python; a cached index loads in a fraction of that."""
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{','.join(image_keys)}"
    cached = shard_cache(cache_dir) / "index" / f"{hashlib.sha1(ident.encode()).hexdigest()}.json"
    try:
        return ShardScan(*json.loads(cached.read_text()))
    except (OSError, ValueError, TypeError):  # none yet, or an earlier version's (three lists)
        pass
    scan = index_shard(path, image_keys)
    try:
        atomic_write(cached, lambda f: f.write(json.dumps(list(scan)).encode()), fsync=False)
    except OSError:  # a read-only cache: index again next time
        pass
    return scan


class WebDatasetImages:
    """index -> PIL RGB image of WebDataset shards (``data=webdataset``), by random access.

    Args:
        shards: shard URLs (:func:`expand_shards`).
        image_keys: the extensions that hold a sample's image, tried in order (``jpg``, ``jpeg``, ``png``,
            ``webp``); a sample with none of them is a bad sample.
        cache_dir: where ``pipe:`` / ``http(s)://`` shards are copied (default ``~/.cache/msn/shards``).

    File descriptors are opened lazily in each process (loader workers included) and read with ``pread``,
    so processes share no file position.
    """

    decodes_read_bytes = True  # self[index] is decode_rgb(read_bytes(index)): msn.data.images.stored_bytes

    def __init__(self, shards: Sequence[str], image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.urls = list(shards)
        self.notes: list[str] = []  # said once when the run starts (msn.train prints them)
        remote = [url for url in self.urls if is_remote(url)]
        reused = sum(cached_copy(url, cache_dir).is_file() for url in remote)
        if reused:  # a changed source would go unnoticed: say that copies are read
            self.notes.append(
                f"data.shards: {reused} of the {len(remote)} remote shards are read from the copies fetched earlier "
                f"into {shard_cache(cache_dir)} (a source changed since is not fetched again: delete them, or pass "
                "data.shard_cache=ANOTHER_FOLDER, to fetch anew)")
        self.paths = [fetch_shard(url, cache_dir) for url in self.urls]
        parts = [cached_index(path, image_keys, cache_dir) for path in self.paths]
        counts = [len(part.offsets) for part in parts]
        self.index = ShardIndex(
            shard=np.repeat(np.arange(len(parts), dtype=np.int32), counts),
            offset=np.fromiter((o for p in parts for o in p.offsets), dtype=np.int64, count=sum(counts)),
            size=np.fromiter((s for p in parts for s in p.sizes), dtype=np.int64, count=sum(counts)),
            keys=[k for p in parts for k in p.keys],
        )
        if not (self.index.offset >= 0).any():
            raise DataError(f"data.shards: the {len(self.urls)} shards hold no readable image (data.image_keys="
                            f"{','.join(image_keys)}); check that they are WebDataset tar files")
        fingerprints = [fingerprint_of_shard(p.keys, p.offsets, p.sizes, p.probes) for p in parts]
        self.fingerprint = fingerprint_of_set(fingerprints)  # what a resume compares: the samples and their order
        # (size, modification time) of each shard as indexed: a shard changed in place later is a stop
        self._stamps = [_stamp(path.stat()) for path in self.paths]
        local = [i for i, url in enumerate(self.urls) if not is_remote(url)]
        self.notes += check_shard_set([self.paths[i] for i in local], [fingerprints[i] for i in local],
                                      [counts[i] for i in local], [self._stamps[i][0] for i in local], image_keys)
        self.notes += _member_notes(self.urls, parts)
        self.image_keys = ",".join(image_keys)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index.keys)

    def name(self, index: int) -> str:
        """``SHARD#KEY``: what a skipped-sample message calls sample ``index``."""
        return f"{self.urls[int(self.index.shard[index])]}#{self.index.keys[index]}"

    def __getitem__(self, index: int) -> Image.Image:
        offset = int(self.index.offset[index])
        if offset == _NO_IMAGE:
            raise BadSample(f"sample {self.name(index)} has no image member (data.image_keys={self.image_keys})",
                            f"sample without an image member (data.image_keys={self.image_keys})")
        if offset == _CUT:
            raise BadSample(f"{self.urls[int(self.index.shard[index])]} is truncated or damaged after its "
                            f"{self._position(index)} readable samples", "rest of a truncated or damaged shard")
        return decode_rgb(io.BytesIO(self.read_bytes(index)), self.name(index))

    def read_bytes(self, index: int) -> bytes:
        """Sample ``index``'s image member as stored (undecoded), by one ``pread``."""
        offset, size = int(self.index.offset[index]), int(self.index.size[index])
        if offset < 0:
            raise BadSample(f"sample {self.name(index)} has no image to read")
        return os.pread(self._fd(int(self.index.shard[index])), size, offset)

    def _position(self, index: int) -> int:
        shard = self.index.shard[index]
        return int(index - np.searchsorted(self.index.shard, shard, side="left"))

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker: descriptors of its own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= 256:  # many shards: keep the number of open files bounded
                os.close(self._fds.pop(next(iter(self._fds))))
            try:
                fd = os.open(self.paths[shard], os.O_RDONLY)
            except FileNotFoundError:
                raise DataGone(f"shard {self.paths[shard]} is gone (removed or moved while the run read it); restore "
                               "it and run the same command again to continue from the last checkpoint") from None
            except OSError as e:
                raise DataError(f"cannot open shard {self.paths[shard]}: {e.strerror or e}") from None
            self._fds[shard] = fd
        now = _stamp(os.fstat(fd))  # every read (a microsecond): a shard rewritten in place after its first read
        if now != self._stamps[shard]:
            raise DataGone(f"shard {self.paths[shard]} changed while the run read it ({self._stamps[shard][0]} bytes "
                           f"when the run started, {now[0]} now, or rewritten); put the set back as it was and run "
                           "the same command again, or start a new run on the new set")
        return fd

    def __getstate__(self) -> dict:  # to spawned workers: without descriptors
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass


def _member_notes(urls: Sequence[str], parts: Sequence[ShardScan]) -> list[str]:
    """What the start says once about members a sample does not read and keys used twice (none: nothing)."""
    said = [  # (field, one, several, what then)
        ("repeated", "member repeats a member name of its sample and is not read",
         "members repeat a member name of their sample and are not read", "give each image its own key"),
        ("extra_images", "image member lies beside its sample's first image and is not read",
         "image members lie beside their sample's first image and are not read",
         "a sample is one image: give each image to train on a sample of its own"),
        ("reused_keys", "sample reuses a key met earlier in its shard", "samples reuse a key met earlier in their "
         "shard", "each is read as a sample of its own")]
    notes = []
    for field, one, several, then in said:
        found = [f"{urls[i]}#{name}" for i, part in enumerate(parts) for name in getattr(part, field)]
        if found:
            shown = ", ".join(found[:2]) + (", ..." if len(found) > 2 else "")
            notes.append(f"data.shards: {len(found)} {one if len(found) == 1 else several} ({shown}); {then}")
    return notes


def _stamp(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_size, stat.st_mtime_ns


@register_source
class WebDatasetSource(Source):
    """``data=webdataset``: ``data.shards`` read by :class:`WebDatasetImages` (``data.image_keys``,
    ``data.shard_cache``)."""

    name = "webdataset"
    summary = "WebDataset tar shards: data.shards='/data/shard-{000000..000099}.tar' (a brace pattern, glob, list)"

    def check(self, cfg: DataConfig | DictConfig) -> None:
        shards = require(cfg, "shards", "data.shards='/data/shard-{000000..000099}.tar' (quoted: the braces are the "
                         "shell's too)")
        if not cfg.image_keys:
            raise ConfigError("data.image_keys must name at least one extension, e.g. [jpg,png]")
        expand_shards(shards)

    def build(self, cfg: DataConfig | DictConfig) -> WebDatasetImages:
        return WebDatasetImages(expand_shards(cfg.shards), list(cfg.image_keys), cfg.shard_cache)

    def where(self, cfg: DataConfig | DictConfig) -> str:
        shards = cfg.shards
        return str(shards) if isinstance(shards, str) else ",".join(map(str, shards))

    def identity(self, cfg: DataConfig | DictConfig) -> dict[str, str]:
        return {"source": str(cfg.shards)}  # as earlier checkpoints recorded it
