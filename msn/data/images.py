"""Decoding image files: the one decoder of every image the package reads (folders, shards, Hugging Face rows,
msn-eval, msn-viz), so that an EXIF orientation or a 16-bit PNG is handled the same everywhere. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import IO

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


