"""Keys in, batches out: the keyed multi-crop dataset, the samplers and the DataLoader.

    RunSampler ──[(epoch, index), ...]──> MultiCropDataset.__getitems__ ──> base[index] (PIL RGB)
                                                 │
                                                 └─> MultiCropTransform.crop (+ .finish on augment_on=cpu)

:class:`EpochSampler` gives one epoch's order, a pure function of (seed, epoch), split among ranks like
``DistributedSampler``. :class:`RunSampler` chains the epochs into one endless stream of batches that
starts at any step, so the DataLoader's iterator (and its workers' prefetching) runs through epoch
boundaries instead of draining and restarting at each, and a resume is an offset, with no replay.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

try:  # decodes JPEGs about twice as fast as PIL, to the same pixels; without it PIL decodes them all
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency, but the package still works without it
    simplejpeg = None

from msn.config import DataConfig
from msn.data.crops import to_uint8_image
from msn.data.device_decode import DEVICE_COMPONENTS, EncodedBatch, EncodedImage, device_jpeg, orient
from msn.data.images import decode_rgb, jpeg_layout, stored_bytes
from msn.data.multicrop import MultiCropTransform, ViewBatch
from msn.data.registry import ImageDataset
from msn.errors import BadSample, DataError, DataGone
from msn.utils.seeding import stream_generator

Key = tuple[int, int]  # (epoch, index)


class MultiCropDataset(Dataset):
    """``dataset[(epoch, index)]`` -> the views of image ``index``, random as a pure function of the key.

    An image that cannot be decoded is replaced by another one drawn from the ``"replace"`` stream of
    (seed, epoch, index): the batch keeps its size, the replacement is the same wherever and whenever
    the key is loaded (workers, resume), and its views still come from the original key's generator.
    :meth:`__getitems__` reports the replaced paths; the training loop counts them and stops past
    ``data.max_bad_files`` (:class:`SkippedImages`).

    Args:
        base: index -> PIL image.
        transform: the multi-crop augmentation.
        seed: run seed; with ``(epoch, index)`` it seeds a private generator, so the global RNG is untouched.
        finish: run the photometric stage here (``data.augment_on=cpu``); False leaves it to the
            training process (:meth:`MultiCropTransform.finish` on the device).
        max_replacements: replacements tried for one undecodable image before giving up with a DataError.
        decode: decode the images here; False (``data.decode_on=device``) sends the JPEGs' bytes and every
            view's uniforms instead (:class:`~msn.data.device_decode.EncodedBatch`), which the training
            process decodes and cuts (:class:`~msn.data.device_decode.DeviceDecoder`).
    """

    def __init__(self, base: ImageDataset, transform: MultiCropTransform, seed: int = 0, finish: bool = True,
                 max_replacements: int = 16, decode: bool = True) -> None:
        self.base, self.transform, self.seed = base, transform, int(seed)
        self.finish, self.max_replacements, self.decode = bool(finish), int(max_replacements), bool(decode)
        if not self.decode and self.finish:
            raise DataError("images decoded on the training device are cut there, so their photometric stage runs "
                            "there too (finish=False)")

    def __len__(self) -> int:
        return len(self.base)

    def generator(self, key: Key) -> torch.Generator:
        epoch, index = _check_key(key)
        return stream_generator(self.seed, "views", epoch, index)

    def __getitem__(self, key: Key) -> list[torch.Tensor]:
        """The views ``[target, anchor, focal_1, ...]`` of one key, each (3, S, S), both stages applied."""
        batch = self.__getitems__([key])
        if batch.error is not None:
            raise DataError(batch.error)
        return self.transform.finish(batch).per_image()[0]

    def __getitems__(self, keys: Sequence[Key]) -> ViewBatch:
        """A whole batch (DataLoader calls this with a batch of keys): each stage runs once per batch.

        A :class:`DataError` is returned inside the batch rather than raised, so that it reaches the
        user as one line from the main process instead of as a DataLoader worker's traceback.
        """
        keys = [_check_key(key) for key in keys]
        if not self.decode:
            return self._encoded(keys)
        images, skipped, kinds = [], [], {}
        try:
            for epoch, index in keys:
                image, bad = self.load(epoch, index, kinds)
                images.append(image)
                skipped += bad
            batch = self.transform.crop(images, [self.transform.draw(self.generator(key)) for key in keys],
                                        finish_here=self.finish)
        except DataError as err:
            return ViewBatch(skipped=skipped, error=str(err), skip_kinds=kinds)
        batch.skipped, batch.skip_kinds = skipped, kinds
        return self.transform.finish(batch) if self.finish else batch

    def _encoded(self, keys: list[Key]) -> EncodedBatch | ViewBatch:
        """The batch for the device's decoder: the JPEGs' bytes, the rest decoded here, every view's uniforms."""
        items: list[EncodedImage | np.ndarray] = []
        skipped: list[str] = []
        kinds: dict[str, str] = {}
        try:
            for epoch, index in keys:
                data = self._stored(index)
                encoded = device_jpeg(data) if data is not None else None
                if encoded is None:  # decoded here, or replaced as on the CPU path
                    image, bad = self.load(epoch, index, kinds)
                    encoded, skipped = to_uint8_image(image).permute(1, 2, 0).numpy(), skipped + bad
                items.append(encoded)
            uniforms = np.stack([self.transform.draw(self.generator(key)) for key in keys])
        except DataError as err:
            return ViewBatch(skipped=skipped, error=str(err), skip_kinds=kinds)
        return EncodedBatch(items, uniforms, keys, skipped, kinds)

    def path(self, index: int) -> str:
        """What messages call image ``index``: its file, ``SHARD#KEY``, a dataset row, or ``image N``."""
        if hasattr(self.base, "name"):
            return self.base.name(index)
        paths = getattr(self.base, "paths", None)
        return str(paths[index]) if paths is not None else f"image {index}"

    def _stored(self, index: int) -> bytes | None:
        """Image ``index``'s stored bytes when the source's ``__getitem__`` is exactly their decoding
        (:func:`~msn.data.images.stored_bytes`); None for another source, or when reading fails (its own
        ``__getitem__`` then says what is wrong). Data gone from under the run still stops it."""
        read = stored_bytes(self.base)
        if read is None:
            return None
        try:
            return read(index)
        except DataGone:
            raise
        except (DataError, OSError):
            return None

    def _image(self, index: int) -> Image.Image | torch.Tensor:
        """Image ``index``, decoded from its stored bytes when the source has them (:func:`decode_stored`: read
        once), else as the source decodes it."""
        data = self._stored(index)
        return self.base[index] if data is None else decode_stored(data, self.path(index))

    def load(self, epoch: int, index: int, kinds: dict[str, str] | None = None) -> tuple[Image.Image, list[str]]:
        """Image ``index``, or a deterministic replacement when it cannot be decoded; the paths that failed (and
        into ``kinds``, what the source said each :class:`BadSample` is). Data that disappeared under the run
        (:class:`DataGone`) is not replaced: it stops the run."""
        bad, candidate = [], index
        for attempt in range(self.max_replacements + 1):
            try:
                return self._image(candidate), bad
            except DataGone:
                raise
            except DataError as err:
                bad.append(self.path(candidate))
                if kinds is not None and isinstance(err, BadSample):
                    kinds[bad[-1]] = err.what
                g = stream_generator(self.seed, "replace", epoch, index, attempt)
                candidate = int(torch.randint(len(self.base), (1,), generator=g))
        raise DataError(f"could not decode {self.path(index)} nor {self.max_replacements} replacement images "
                        f"({', '.join(bad[1:4])}, ...): check data.root and the files' permissions")


def fast_jpeg(data: bytes) -> torch.Tensor | None:
    """A complete gray or colour JPEG's pixels by simplejpeg, upright: (3, H, W) uint8 (a view of the decoded
    (H, W, 3) array); None for anything else, or without simplejpeg."""
    layout = jpeg_layout(data)
    if simplejpeg is None or layout is None or layout[0] not in DEVICE_COMPONENTS:
        return None
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")  # strict: libjpeg's warnings raise
    except ValueError:
        return None
    return orient(torch.from_numpy(pixels).permute(2, 0, 1), layout[1])


def decode_stored(data: bytes, name: str) -> Image.Image | torch.Tensor:
    """A stored image's pixels: a plain JPEG by simplejpeg (:func:`fast_jpeg`: the same libjpeg-turbo pixels as
    PIL's, in about half the time), anything else (other formats, CMYK, a file cut short) by
    :func:`~msn.data.images.decode_rgb`, as the sources decode it; ``name`` in its :class:`DataError`."""
    image = fast_jpeg(data)
    return image if image is not None else decode_rgb(io.BytesIO(data), name)


def collate_views(batch: ViewBatch) -> ViewBatch:
    """The DataLoader's collate function: :meth:`MultiCropDataset.__getitems__` already made the batch."""
    return batch


class SkippedImages:
    """The undecodable images a run has met: counted per epoch, and a stop once too many distinct ones.

    Args:
        limit: distinct bad files allowed; one more stops the run (``data.max_bad_files``, or
            ``data.max_bad_fraction`` of the dataset when that is larger).
    """

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.paths: dict[str, None] = {}  # insertion-ordered set
        self.epoch: int | None = None
        self.in_epoch = 0

    def add(self, epoch: int, paths: Sequence[str]) -> list[str]:
        """Count this batch's skips; return the paths not seen before."""
        if epoch != self.epoch:
            self.epoch, self.in_epoch = epoch, 0
        self.in_epoch += len(paths)
        new = [p for p in dict.fromkeys(paths) if p not in self.paths]
        self.paths.update(dict.fromkeys(new))
        return new

    def count(self, epoch: int) -> int:
        """Skips counted so far in ``epoch`` (0 for an epoch without any yet)."""
        return self.in_epoch if epoch == self.epoch else 0

    @property
    def over_limit(self) -> bool:
        return len(self.paths) > self.limit

    def error(self) -> DataError:
        listed = list(self.paths)
        shown = ", ".join(listed[:20]) + (f" and {len(listed) - 20} more" if len(listed) > 20 else "")
        where = shown if listed else "on another process"
        return DataError(f"{len(listed) or 'too many'} undecodable images, more than the {self.limit} allowed "
                         f"(data.max_bad_files / data.max_bad_fraction): {where}; remove or fix them, or raise "
                         "the limit")

    def state_dict(self) -> dict[str, Any]:
        return {"paths": list(self.paths), "epoch": self.epoch, "in_epoch": self.in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.paths = dict.fromkeys(state.get("paths", []))
        self.epoch, self.in_epoch = state.get("epoch"), int(state.get("in_epoch", 0))


def _check_key(key: Any) -> Key:
    if not (isinstance(key, (tuple, list)) and len(key) == 2):
        raise TypeError(f"MultiCropDataset keys are (epoch, index) pairs, as EpochSampler yields; got {key!r}")
    return int(key[0]), int(key[1])


class EpochSampler(Sampler[Key]):
    """Yields ``(epoch, index)`` keys: this rank's share of an epoch, like ``DistributedSampler``.

    The order is ``torch.randperm(n)`` from the run's ``"order"`` stream at ``epoch``
    (:func:`msn.utils.seeding.stream_seed`; DistributedSampler's ``seed + epoch`` would give seed 1 the order
    seed 0 has one epoch later), so it is a pure function of (seed, epoch). Rank r takes positions
    r, r + R, r + 2R, ... of that order; with ``drop_last`` the tail that does not divide evenly among
    the R replicas is dropped, otherwise the order is padded by wrapping around. ``epoch_len`` (at most
    ``dataset_len``; default all of it) makes an epoch the first ``epoch_len`` images of that order.

    Resume: :meth:`set_start` skips the first batches of the epoch without yielding (so without
    loading) them. :meth:`set_epoch` resets the start to 0, so call it first.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, epoch_len: int | None = None) -> None:
        """Order ``dataset_len`` images for ``rank`` of ``num_replicas`` (as ``DistributedSampler``'s arguments)."""
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.epoch_len = self.dataset_len if epoch_len is None else min(int(epoch_len), self.dataset_len)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.num_samples = samples_per_replica(self.epoch_len, self.num_replicas, drop_last)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its order and its augmentation keys); the start goes back to batch 0."""
        self.epoch, self.start = int(epoch), 0

    def set_start(self, start_batch: int, batch_size: int) -> None:
        """Begin this epoch at batch ``start_batch`` (of ``batch_size`` keys per rank)."""
        if start_batch < 0 or batch_size < 1:
            raise ValueError(f"invalid start: batch {start_batch} of size {batch_size}")
        self.start = start_batch * batch_size

    def indices(self) -> list[int]:
        """This rank's image indices for the whole current epoch (ignoring the start)."""
        if self.shuffle:
            g = stream_generator(self.seed, "order", self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        order = order[:self.epoch_len]
        total = self.num_samples * self.num_replicas
        if total > len(order) and order:  # pad by wrapping around (drop_last=False)
            order = (order * math.ceil(total / len(order)))[:total]
        return order[:total][self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[Key]:
        return ((self.epoch, index) for index in self.indices()[self.start:])

    def __len__(self) -> int:
        """Keys still to come this epoch (after the start), so ``len(loader)`` counts the remaining batches."""
        return max(self.num_samples - self.start, 0)


def samples_per_replica(num_images: int, num_replicas: int, drop_last: bool) -> int:
    """Images each of ``num_replicas`` ranks sees per epoch (DistributedSampler's rule)."""
    if drop_last:
        return num_images // num_replicas
    return math.ceil(num_images / num_replicas)


def epoch_length(num_images: int, cfg: DataConfig) -> int:
    """Images in an epoch: ``data.samples_per_epoch`` of the ``num_images`` (all of them when null)."""
    wanted = getattr(cfg, "samples_per_epoch", None)
    if wanted is None:
        return num_images
    if wanted > num_images:
        raise DataError(f"data.samples_per_epoch={wanted} exceeds the {num_images} images of the dataset; lower it "
                        "or set data.samples_per_epoch=null (an epoch of the whole dataset)")
    return int(wanted)


def steps_per_epoch(num_images: int, cfg: DataConfig, world_size: int = 1) -> int:
    """Batches per epoch on each rank: ``len(loader)`` for a full epoch. Zero steps is a :class:`DataError`."""
    per_rank = samples_per_replica(num_images, world_size, cfg.drop_last)
    steps = per_rank // cfg.batch_size if cfg.drop_last else math.ceil(per_rank / cfg.batch_size)
    if steps == 0:
        processes = f"{world_size} process" + ("es" if world_size > 1 else "")
        raise DataError(f"data.batch_size={cfg.batch_size} exceeds the {per_rank} images per process (dataset size "
                        f"{num_images}, {processes}), so an epoch has no complete batch; lower data.batch_size, "
                        "use more images or set data.drop_last=false")
    return steps


class RunSampler(Sampler[list[Key]]):
    """Batches of ``(epoch, index)`` keys for a whole run: the epochs of an :class:`EpochSampler`, chained.

    Batch ``s`` of the stream is step ``start_step + s`` of the run: epoch ``step // steps_per_epoch``,
    batch ``step % steps_per_epoch`` of that epoch's order (so the keys are those an epoch-by-epoch loop
    would give, and a resume at any step continues the same stream without loading what it skips).
    The stream does not end: the trainer stops taking batches at its last step.

    Args:
        order: the per-epoch order of this rank (its ``set_epoch`` is driven from here).
        batch_size: keys per batch; with ``drop_last`` an epoch's incomplete last batch is left out.
        start_step: the run's step the first batch belongs to.
    """

    def __init__(self, order: EpochSampler, batch_size: int, drop_last: bool = True, start_step: int = 0) -> None:
        if batch_size < 1 or start_step < 0:
            raise ValueError(f"invalid batch size {batch_size} or start step {start_step}")
        self.order, self.batch_size, self.drop_last = order, int(batch_size), bool(drop_last)
        steps = order.num_samples // self.batch_size if drop_last else math.ceil(order.num_samples / self.batch_size)
        if steps == 0:
            raise DataError(f"batch size {batch_size} exceeds the {order.num_samples} images per process")
        self.steps_per_epoch, self.start_step = steps, int(start_step)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        while True:
            self.order.set_epoch(epoch)
            keys = list(self.order)
            for first in range(offset * self.batch_size, self.steps_per_epoch * self.batch_size, self.batch_size):
                yield keys[first:first + self.batch_size]
            epoch, offset = epoch + 1, 0


def build_loader(cfg: DataConfig, dataset: MultiCropDataset, sampler: RunSampler | EpochSampler,
                 pin_memory: bool = False) -> DataLoader:
    """DataLoader of :class:`ViewBatch` es (``batch.views()``: ``[target, anchor, focal_1, ...]``).

    With a :class:`RunSampler` (training) one iterator runs the whole run across epochs; with an
    :class:`EpochSampler` each iteration is one epoch (``set_epoch`` / ``set_start`` still take effect
    with persistent workers, because the sampler runs in this process). The keys go to the dataset a
    batch at a time (``__getitems__``). ``pin_memory`` (for a GPU) lets the copies to the device overlap
    with compute.
    """
    workers = loader_workers(cfg.num_workers)
    common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
                  collate_fn=collate_views, worker_init_fn=_ignore_stop_signals)
    if isinstance(sampler, RunSampler):
        return DataLoader(dataset, batch_sampler=sampler, **common)
    return DataLoader(dataset, batch_size=int(cfg.batch_size), sampler=sampler, drop_last=bool(cfg.drop_last),
                      **common)


def loader_workers(num_workers: int | None) -> int:
    """``data.num_workers``, with null meaning min(8, the CPU cores this process may use): more workers than
    cores only compete for them (PyTorch warns), and a laptop or a 2-core VM is not an 8-worker machine."""
    if num_workers is not None:
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stop signals to the training process, which finishes its step and checkpoints.

    A terminal's Ctrl-C (SIGINT) and SLURM's preemption (SIGTERM, and the time-limit signal) reach every
    process of the job; a worker would otherwise die and take the step down with it. Workers still exit
    when the training process does: on Linux the kernel kills them with it (:func:`_die_with_trainer`),
    elsewhere PyTorch's watchdog sees it within seconds.
    """
    for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    _die_with_trainer()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_trainer() -> None:
    """Ask Linux to SIGKILL this worker the moment the training process dies, kill -9 included.

    PyTorch's watchdog only looks for a dead parent while the worker waits for work; a worker whose batch
    is stuck in the queue's pipe (a pickle larger than the pipe's 64 KiB, which nobody reads any more)
    would otherwise wait for ever, holding the output of ``msn-pretrain ... | tee`` or a test's pipes open.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # no prctl in this libc: the watchdog remains
        pass
