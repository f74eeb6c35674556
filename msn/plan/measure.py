"""What the plan is fitted to: the images' sizes, measured on a fixed sample, and the machine the run trains on."""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from msn.data.images import to_8bit
from msn.utils.sampling import sample_indices

SAMPLE = 256  # images whose size is read: the median is then within a few per cent of the whole set's
PIXELS_SIDE = 128  # larger images are read at about this side for their pixels' mean and std (a JPEG's draft mode)
# An RGB image shows colour when more than COLOURED_SHARE of its pixels have channels that differ by more than
# COLOURED_PIXEL (10 levels of 255; a grey image saved as RGB or as a JPEG differs by a level or two): a small
# coloured object on black counts, a grey scan with a coloured scale bar does not.
COLOURED_PIXEL, COLOURED_SHARE = 0.04, 0.01


@dataclass(frozen=True)
class ImageStats:
    """The data set's size and its images' median size (on a sample of ``sampled`` images, drawn with seed 0)."""

    count: int  # images in the data set
    sampled: int  # images whose size was read
    median_width: int
    median_height: int
    short_side: int  # the median of min(width, height): what a square view is cut from
    short_side_p10: int  # 10 % of the images have a shorter side than this
    colour_share: float = 0.0  # the share in colour: stored in colour (RGB, palette, CMYK...) and not grey content
    mean: tuple[float, float, float] | None = None  # the sample's pixels in [0, 1], per RGB channel (grey: 3 equal)
    std: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for key in ("mean", "std"):
            record[key] = None if record[key] is None else list(record[key])
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ImageStats:
        """From a plan's record; one made before colour was measured reads as grey (its recipe had no colour rule),
        one made before the pixels were measured has no mean and std (its recipe kept ImageNet's)."""
        optional = ("colour_share", "mean", "std")
        sizes = {k: int(record[k]) for k in cls.__dataclass_fields__ if k not in optional}
        pixels = {k: tuple(float(x) for x in record[k]) for k in ("mean", "std") if record.get(k) is not None}
        return cls(**sizes, colour_share=float(record.get("colour_share", 0.0)), **pixels)

    def describe(self) -> str:
        return f"{self.count:,} images, median {self.median_width} x {self.median_height} px"


@dataclass(frozen=True)
class Machine:
    """Where the run trains: the device kind, the CPU cores each process may use and the number of processes."""

    device: str  # "cpu" | "cuda"
    cores: int  # CPU cores this process may use (its affinity)
    world: int = 1  # processes of the run (one per GPU)
    gpu: str | None = None  # the GPU's name

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def describe(self) -> str:
        where = f"{self.world} x {self.gpu or 'GPU'}" if self.on_gpu else "a CPU"
        return f"{where}, {self.cores} CPU core{'s' if self.cores != 1 else ''} per process"


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL's modes that hold grey levels only


def sampled_image(dataset: Any, index: int) -> Any:
    """One image of the sample, read once: opened from the file's bytes when the dataset hands them out (PIL reads
    the header now and decodes only when the pixels are asked for), else the dataset's item (its image, for
    (image, label) items): a PIL image or a C x H x W / H x W x C array."""
    read_bytes = getattr(dataset, "read_bytes", None)
    if read_bytes is not None:
        return Image.open(io.BytesIO(read_bytes(index)))
    item = dataset[index]
    return item[0] if isinstance(item, tuple | list) else item


def _channels_first(shape: tuple[int, ...]) -> bool:
    return shape[0] <= 4  # an array's channels come first when its first axis is the smallest


def image_size_and_colour(image: Any) -> tuple[int, int, bool]:
    """(width, height, stored in colour) of one :func:`sampled_image`: a file's from its header (its mode), an
    array's from its shape (3 or 4 channels). Whether it shows colour is :func:`pixel_moments`' to say."""
    if isinstance(image, Image.Image):
        return (*image.size, image.mode not in GREY_MODES)
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) == 3:
        w, h = (shape[2], shape[1]) if _channels_first(shape) else (shape[1], shape[0])
        return w, h, (shape[0] if _channels_first(shape) else shape[2]) >= 3
    if len(shape) == 2:
        return shape[1], shape[0], False
    raise TypeError(f"cannot tell the size of a {type(image).__name__}")


def pixel_moments(image: Any) -> tuple[np.ndarray, bool]:
    """The pixels of one :func:`sampled_image` as training sees them (16-bit and float images scaled to 8 bits by
    the training decoder's :func:`~msn.data.images.to_8bit`, not clipped): (2, 3) float64, the mean and mean square
    per RGB channel in [0, 1] (grey levels count for the three channels), and whether the image shows grey only
    (at most :data:`COLOURED_SHARE` of its pixels coloured: a grey scan or garment saved as RGB, a data set class
    that hands out RGB copies). An RGB JPEG larger than :data:`PIXELS_SIDE` is decoded at a fraction of its size,
    another file shrunk to about twice that side: the mean is kept, and the spread nearly so. Call it after
    :func:`image_size_and_colour`: a JPEG's draft mode changes the size PIL reports."""
    if isinstance(image, Image.Image):
        if image.mode == "RGB" and image.format == "JPEG":
            image.draft("RGB", (PIXELS_SIDE, PIXELS_SIDE))
        image = to_8bit(image)
        if min(image.size) > PIXELS_SIDE:
            image = image.copy()
            image.thumbnail((PIXELS_SIDE * 2, PIXELS_SIDE * 2))
        pixels = np.asarray(image.convert("RGB"), np.float64) / 255
    else:  # an array or tensor: uint8 levels or floats in [0, 1]
        pixels = np.asarray(image, np.float64)
        if np.issubdtype(np.asarray(image).dtype, np.integer):
            pixels = pixels / 255
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        elif _channels_first(pixels.shape):
            pixels = np.moveaxis(pixels, 0, -1)
        pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    flat = pixels.reshape(-1, 3)
    grey = float(np.mean(flat.max(1) - flat.min(1) > COLOURED_PIXEL)) <= COLOURED_SHARE
    return np.stack([flat.mean(0), (flat ** 2).mean(0)]), grey


def measure_images(dataset: Any, sample: int = SAMPLE) -> ImageStats:
    """The size distribution of ``dataset``'s images (every sampled image whose size can be read: the same ones
    :func:`median_size` reads), the share of them in colour (stored in colour and showing it) and their pixels' mean
    and std per channel (each image weighing the same; the images that decode), on the fixed sample
    :func:`sample_indices` draws, each read once. Images that cannot be read are left out (the loader replaces them
    in training); a ``ValueError`` when none decodes."""
    sizes, moments, colour = [], [], []
    for image, (width, height, stored_in_colour) in _readable_sample(dataset, sample):
        sizes.append((width, height))
        try:
            moment, grey = pixel_moments(image)
        except Exception:  # noqa: BLE001 (a file cut short: the run's loader counts and replaces it)
            continue
        moments.append(moment)
        colour.append(stored_in_colour and not grey)
    if not moments:
        raise ValueError(f"none of the {min(len(dataset), sample)} images sampled to fit the recipe could be read; "
                         "check the data set, or give the views (data.global_size, data.focal_size) with fit=false")
    widths, heights = zip(*sizes, strict=True)
    short = sorted(map(min, widths, heights))
    mean, square = np.mean(moments, axis=0)
    pixels = {"mean": tuple(round(float(m), 3) for m in mean),
              "std": tuple(round(max(float(s), 0.01), 3) for s in np.sqrt(np.maximum(square - mean ** 2, 0.0)))}
    return ImageStats(count=len(dataset), sampled=len(sizes),
                      median_width=int(statistics.median_low(widths)),
                      median_height=int(statistics.median_low(heights)),
                      short_side=int(statistics.median_low(short)),
                      short_side_p10=int(short[len(short) // 10]),
                      colour_share=round(sum(colour) / len(colour), 3), **pixels)


def median_size(dataset: Any, sample: int = SAMPLE) -> tuple[int, int] | None:
    """The median (width, height) of :func:`measure_images`' sample, read from the files' headers (no pixels
    decoded; a source without its files' bytes, as ``data=custom``, hands out decoded images): what a resume compares
    with its plan's. None when no image can be read."""
    sizes = [(width, height) for _, (width, height, _) in _readable_sample(dataset, sample)]
    if not sizes:
        return None
    widths, heights = zip(*sizes, strict=True)
    return int(statistics.median_low(widths)), int(statistics.median_low(heights))


def _readable_sample(dataset: Any, sample: int) -> Iterator[tuple[Any, tuple[int, int, bool]]]:
    """Each image of the fixed sample whose size can be read, with (width, height, stored in colour); the others
    are left out (the run's loader counts and replaces them)."""
    for i in sample_indices(len(dataset), sample).tolist():
        try:
            image = sampled_image(dataset, i)
            size = image_size_and_colour(image)
        except Exception:  # noqa: BLE001 (not an image, or not one PIL can open)
            continue
        yield image, size


def cores_available() -> int:
    """The CPU cores this process may run on (its affinity: a SLURM or container limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)
