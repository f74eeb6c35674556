"""JPEG decoding on the training device (``data.decode_on=device``): the loader workers only read files.

    worker:   read_bytes(index) ─> device_jpeg ─> EncodedImage (the file's bytes, its EXIF orientation)
                                      └ not a JPEG the device takes ─> decoded here, sent as pixels
              + every view's uniforms (MultiCropTransform.draw, from the key's own generator)
    trainer:  DeviceDecoder ─> one batched decode_jpeg on the device ─> upright ─> MultiCropTransform.crop
              (same boxes and flips as the worker path, resized by a few large matmuls) ─> photometric stage

A worker then spends under 0.1 ms per image (reading and the markers) instead of ~8 (``msn-bench data``'s
stages), and the GPU decodes with nvJPEG. The views are those of the worker path: the same uniforms give the
same boxes, flips and photometric parameters, so a run resumes exactly and a view is a pure function of
(seed, epoch, index). Only the resize kernel's rounding differs (``resized_crops_padded``: within one level of
255 on a CPU; nvJPEG's decoding adds a few more on a GPU).

What the device's decoder does not take goes the CPU way and is counted (:attr:`ViewBatch.cpu_decoded`):
other formats (PNG, WebP, ...), CMYK JPEGs, JPEGs that do not end with their end-of-image marker
(truncated: the CPU path then skips them exactly as it would), and any JPEG the device's decoder refuses
(decoded with PIL in the training process). An undecodable image is replaced as on the CPU path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from msn.data.crops import to_uint8_image
from msn.data.images import jpeg_layout, stored_bytes
from msn.data.multicrop import ViewBatch
from msn.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

    from msn.data.multicrop import MultiCropTransform

Key = tuple[int, int]  # (epoch, index), as msn.data.loader's


class ReplacingDataset(Protocol):
    """What :class:`DeviceDecoder` needs of :class:`msn.data.loader.MultiCropDataset` (which imports this module)."""

    transform: MultiCropTransform

    def load(self, epoch: int, index: int, kinds: dict[str, str] | None = None) -> tuple[Image.Image, list[str]]: ...


DEVICE_COMPONENTS = (1, 3)  # gray and colour JPEGs, which every decoder turns into RGB (CMYK / YCCK go the CPU way)
DECODE_CHOICES = ("auto", "cpu", "device")
AUTO_PROBES = 32  # images looked at to tell whether a source holds JPEGs (data.decode_on=auto)


@dataclass
class EncodedImage:
    """An image as its JPEG file stores it, for the device's decoder.

    Attributes:
        data: the file's bytes.
        orientation: its EXIF orientation, 1 (as stored) to 8, applied after decoding as PIL's
            ``exif_transpose`` does on the CPU path.
    """

    data: bytes
    orientation: int = 1


@dataclass(frozen=True)
class Part:
    """Where one image of an :class:`EncodedBatch` lies in the batch's buffer: JPEG bytes (``shape`` None) or
    (H, W, 3) pixels the worker decoded."""

    start: int
    stop: int
    orientation: int = 1
    shape: tuple[int, int, int] | None = None


class EncodedBatch:
    """What a worker sends with ``data.decode_on=device``: per image its JPEG bytes or, when the device cannot
    decode it, its pixels; the uniforms of every view; and what the worker met.

    The images travel in one uint8 buffer and the uniforms in one tensor, so the loader's queue carries a few
    shared-memory handles and a short pickle, whatever the batch size.

    Attributes:
        buffer: (L,) uint8, every image's bytes or pixels one after another (:attr:`parts` says where).
        parts: B :class:`Part` s.
        uniforms: (B, num_views, num_uniforms) float64, :meth:`MultiCropTransform.draw` of each key.
        keys: the B (epoch, index) keys, for a replacement drawn in the training process.
        skipped, skip_kinds: the undecodable images the worker replaced (as :class:`ViewBatch`).
        cpu_decoded: how many of the images the worker decoded.
    """

    error = None  # a worker's DataError comes as a ViewBatch; this keeps one check for both

    def __init__(self, images: list[EncodedImage | np.ndarray], uniforms: np.ndarray, keys: list[Key],
                 skipped: list[str], skip_kinds: dict[str, str]) -> None:
        chunks, parts, at = [], [], 0
        for item in images:
            if isinstance(item, EncodedImage):
                chunk, part = np.frombuffer(item.data, dtype=np.uint8), (item.orientation, None)
            else:
                chunk, part = item.reshape(-1), (1, tuple(item.shape))
            chunks.append(chunk)
            parts.append(Part(at, at + len(chunk), *part))
            at += len(chunk)
        self.buffer = torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros(0, np.uint8))
        self.parts, self.uniforms, self.keys = parts, torch.from_numpy(uniforms), keys
        self.skipped, self.skip_kinds = skipped, skip_kinds
        self.cpu_decoded = sum(part.shape is not None for part in parts)

    def pin_memory(self) -> EncodedBatch:
        """The DataLoader's pin-memory thread calls this: the bytes go to the decoder from pageable memory."""
        return self


def device_jpeg(data: bytes) -> EncodedImage | None:
    """``data`` as an :class:`EncodedImage` when it is a complete gray or colour (YCbCr / RGB) JPEG, else None.

    Only the markers are read (:func:`~msn.data.images.jpeg_layout`: a few microseconds).
    """
    layout = jpeg_layout(data)
    if layout is None or layout[0] not in DEVICE_COMPONENTS:
        return None
    return EncodedImage(data, layout[1])


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded (C, H, W) image turned upright by its EXIF ``orientation``, as PIL's ``exif_transpose``."""
    x = image
    if orientation in (5, 6, 7, 8):  # stored on its side: rows and columns swap
        x = x.transpose(-2, -1)
    if orientation in (2, 3, 6, 7):  # 6 (turned 90 degrees clockwise to view) = transpose, then mirror
        x = x.flip(-1)
    if orientation in (3, 4, 7, 8):
        x = x.flip(-2)
    return x  # orientations 1 and 5 give a view, flips a copy; the crops slice it, the padded stack copies it


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG files ((L,) uint8 CPU tensors) -> (3, H, W) uint8 RGB on ``device``, in one batched call (nvJPEG
    on a GPU).

    A file the decoder refuses gives None in its place: when the batched call fails, each file is tried
    alone, so one bad file does not send the whole batch to the CPU.
    """
    if not data:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded: list[torch.Tensor | None] = []
            for tensor in data:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


class DeviceDecoder:
    """Turns a worker's :class:`EncodedBatch` into uint8 crops on ``device`` (photometric stage pending),
    exactly as the workers would have cut them; any other batch passes through as it is.

    Args:
        dataset: the run's dataset: its transform cuts the views; its ``load`` decodes on the CPU (with the
            same replacements) what the device's decoder refuses.
        device: where the images are decoded and cut.
    """

    def __init__(self, dataset: ReplacingDataset, device: torch.device) -> None:
        self.dataset, self.device = dataset, device

    def __call__(self, batch: Any) -> ViewBatch:
        if not isinstance(batch, EncodedBatch):
            return batch
        jpegs = [i for i, part in enumerate(batch.parts) if part.shape is None]
        decoded = decode_jpegs([batch.buffer[batch.parts[i].start:batch.parts[i].stop] for i in jpegs], self.device)
        images: list[torch.Tensor | None] = [None] * len(batch.parts)
        for i, image in zip(jpegs, decoded, strict=True):
            if image is not None:
                images[i] = orient(image, batch.parts[i].orientation)
        skipped, kinds, refused = list(batch.skipped), dict(batch.skip_kinds), 0
        for i, part in enumerate(batch.parts):
            if part.shape is not None:  # decoded by the worker
                pixels = batch.buffer[part.start:part.stop].view(part.shape)  # (H, W, 3)
                images[i] = pixels.permute(2, 0, 1).to(self.device)
            elif images[i] is None:  # refused by the device's decoder: the CPU path's decode and replacements
                epoch, index = batch.keys[i]
                image, bad = self.dataset.load(epoch, index, kinds)
                images[i], refused = to_uint8_image(image).to(self.device), refused + 1
                skipped += bad
        views = self.dataset.transform.crop(images, list(batch.uniforms.numpy()), padded=True)
        views.skipped, views.skip_kinds, views.cpu_decoded = skipped, kinds, batch.cpu_decoded + refused
        return views


def decode_on_device(decode_on: str, augment_on: str, device: torch.device, base: Any = None) -> bool:
    """Whether the images of ``base`` are decoded on the training ``device`` (``data.decode_on``).

    ``auto`` chooses the device on a GPU, when the photometric stage runs there too and most of the first
    :data:`AUTO_PROBES` images of ``base`` are JPEGs the device takes. ``device`` on a CPU is allowed (it
    is how the tests compare both paths). Decoding on the device while the photometric stage stays in the
    workers (``data.augment_on=cpu``) is a :class:`DataError`: the crops are cut in the training process.
    """
    if decode_on not in DECODE_CHOICES:
        raise DataError(f"data.decode_on={decode_on!r} is not allowed; choose one of {', '.join(DECODE_CHOICES)}")
    if decode_on == "device" and augment_on == "cpu":
        raise DataError("data.decode_on=device cuts the views in the training process, so the photometric stage "
                        "runs there too; set data.augment_on=device (or auto), or data.decode_on=cpu")
    if decode_on != "auto":
        return decode_on == "device"
    if device.type != "cuda" or augment_on == "cpu":
        return False
    return jpeg_share(base) > 0.5


def jpeg_share(base: Any, probes: int = AUTO_PROBES) -> float:
    """The share of ``probes`` images spread over ``base`` that the device's decoder takes (0 for a source
    that cannot give its images' bytes, such as a dataset class of the user's own)."""
    read = stored_bytes(base)
    if read is None or len(base) == 0:
        return 0.0
    indices = np.unique(np.linspace(0, len(base) - 1, min(probes, len(base))).astype(int))
    taken = 0
    for index in indices.tolist():
        try:
            taken += device_jpeg(read(index)) is not None
        except (OSError, DataError):
            pass
    return taken / len(indices)
