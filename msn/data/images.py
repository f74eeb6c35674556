"""Decoding image files: the one decoder of every image the package reads (folders, shards, Hugging Face rows,
msn-eval, msn-viz), so that an EXIF orientation or a 16-bit PNG is handled the same everywhere. Torch-free."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from msn.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` as an 8-bit RGB image, upright; a missing, truncated or non-image file is a
    :class:`DataError`.

    High-bit-depth images (16-bit grayscale PNG / TIFF: PIL modes ``I;16*``, ``I``, ``F``) are scaled to
    8 bits (:func:`to_8bit`); PIL's own ``convert("RGB")`` would clip them at 255. An EXIF orientation
    (a phone's portrait photo is stored sideways with a tag saying so) is applied, as every image viewer
    does, so training, evaluation and the figures all see the picture its owner sees.
    """
    return decode_rgb(path, str(path))


def decode_rgb(source: Path | IO[bytes], name: str) -> Image.Image:
    """:func:`load_rgb` of a path or an open binary file (a tar member's or a dataset row's bytes); ``name``
    says in the :class:`DataError` which image could not be read.

    This is the one decoder of every image file the package reads (folders, shards, Hugging Face rows,
    msn-eval, msn-viz), so the EXIF orientation is applied here and nowhere else.
    """
    try:
        with Image.open(source) as image:
            image.load()  # forces the decode, so a corrupt file fails here
            _apply_orientation(image)
            return to_8bit(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL signals bad data with OSError (incl. UnidentifiedImageError), SyntaxError or ValueError
        raise DataError(f"cannot read image {name}: {err}") from err


def _apply_orientation(image: Image.Image) -> None:
    """Turn a decoded ``image`` upright, in memory, by its EXIF Orientation tag (none or 1: as it is).

    ``in_place`` spares the copy that ``exif_transpose`` makes of every image without a tag. A malformed
    EXIF block leaves the pixels as stored: they decoded fine, and losing the image to its metadata
    would be worse than a sideways picture.
    """
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # PIL's EXIF parser fails in many ways on bad metadata (struct.error, KeyError, ...)
        pass


def to_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit grayscale copy of a 16-bit, 32-bit integer or float image; other modes as they are.

    16-bit values v in [0, 65535] become round(v * 255 / 65535) (``I`` images, which PIL also uses for
    16-bit files, are taken as 16-bit when they fit in 0..65535, else scaled by their own maximum);
    float images are taken as [0, 1] when they fit, else scaled by their maximum.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.size == 0 or (values.min() >= 0 and values.max() <= 1.0) else max(values.max(), 1e-12)
    else:
        top = 65535.0 if values.size == 0 or (values.min() >= 0 and values.max() <= 65535) else max(values.max(), 1)
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # (H, W) uint8: mode "L"


JPEG_END = b"\xff\xd9"  # end-of-image marker: a file cut short lacks it
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def jpeg_layout(data: bytes) -> tuple[int, int] | None:
    """(colour components, EXIF orientation 1-8) of a complete JPEG file, read from its markers (a few
    microseconds: no pixel is decoded); None when ``data`` is not a JPEG, is cut short (no end-of-image marker
    last) or its markers do not parse. Components: 1 gray, 3 YCbCr or RGB, 4 CMYK / YCCK."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != JPEG_END:
        return None
    orientation, at = 1, 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        segment = data[at + 4:at + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(segment[6:])
        elif marker in _SOF:
            return (segment[5], orientation) if len(segment) > 5 else None
        elif marker == 0xDA:  # scan data before any frame header: not a JPEG we read
            return None
        at += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in an EXIF block's TIFF data; 1 when absent or malformed (as
    :func:`decode_rgb` keeps the pixels as stored when the EXIF block cannot be read)."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for entry in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        at = ifd + 2 + 12 * entry
        if at + 12 > len(tiff):
            return 1
        if int.from_bytes(tiff[at:at + 2], order) == 0x0112:
            value = int.from_bytes(tiff[at + 8:at + 10], order)  # a SHORT, left-aligned in the value field
            return value if 1 <= value <= 8 else 1
    return 1


def stored_bytes(base: Any) -> Callable[[int], bytes] | None:
    """``base.read_bytes`` when ``base[index]`` is exactly :func:`decode_rgb` of those bytes (the folder, shard
    and Hugging Face sources say so with ``decodes_read_bytes = True``), so that a faster decoder (simplejpeg,
    or the GPU's) may take the bytes instead; None for any other source, whose own ``__getitem__`` decides."""
    if getattr(base, "decodes_read_bytes", False):
        return getattr(base, "read_bytes", None)
    return None

