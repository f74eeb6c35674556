"""Images in, multi-crop views out: datasets, the MSN augmentation, a resumable sampler and the loader.

Flow (DESIGN.md section 3)::

    EpochSampler ──(epoch, index)──> MultiCropDataset ──> base dataset[index] (PIL RGB)
                                          │
                                          └─> MultiCropTransform: [target, anchor, focal_1 .. focal_n]

Randomness: the augmentation of image ``index`` in ``epoch`` draws only from a private
``torch.Generator`` seeded by a hash of ``(seed, epoch, index)``, so a view is a pure function of that
key: identical for any ``num_workers``, any request order, any process, and after a resume. The
sampler's order is a pure function of ``(seed, epoch)`` (as ``DistributedSampler``), so resuming
mid-epoch is an offset into that order (:meth:`EpochSampler.set_start`), with no replay.

Speed: ``torchvision.transforms.v2`` applied view by view costs about 1.6 ms per 32-px view on these
CPUs (1.6 s for a digits batch of 128 images x 8 views, three times the training step). The
augmentation here keeps torchvision's semantics (same parameter distributions, same formulas; the
tests compare each operation with ``torchvision.transforms.v2.functional``) but runs in two stages:

1. per image (:meth:`MultiCropTransform.draw`): every random number its views need, in one draw;
2. per batch (:meth:`MultiCropTransform.apply`): parameters, crop + resize (bilinear with antialias,
   v2's ``RandomResizedCrop`` default; two batched matmuls for small images), then flip, colour
   jitter, grayscale, blur and normalisation once over all views of one size, with per-view
   parameters. The DataLoader hands a batch of keys to :meth:`MultiCropDataset.__getitems__`.

That is about 60 ms for the digits batch on one core (``scripts/bench_data.py``). Every operation is
per view, so a view does not depend on its batch-mates (tested bit for bit).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from msn.config import DataConfig
from msn.seeding import stream_generator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
CROP_TRIES = 10  # RandomResizedCrop's rejection-sampling attempts before the centre-crop fallback


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file or key and the fix."""


# ----------------------------------------------------------------------------------------------------
# Base datasets: index -> PIL RGB image (labels kept for evaluation, unused by pretraining)
# ----------------------------------------------------------------------------------------------------


class ImageDataset(Protocol):
    """What the multi-crop pipeline needs from a base dataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Image.Image: ...


class ImageFolderDataset(Dataset):
    """Images under ``root``: ImageFolder layout (``root/class/img.jpg``) or flat (``root/img.jpg``).

    Files are found recursively (extensions in :data:`IMAGE_EXTENSIONS`, any case) and sorted by their
    path relative to ``root``. Classes are the sorted top-level folders of ``root`` (as torchvision's
    ImageFolder, so a ``list_file`` subset and the full folder agree on class indices); an image directly
    under ``root`` has label -1 (unlabelled).

    Args:
        root: the image folder.
        list_file: optional text file with one image path per line, relative to ``root`` (its first
            whitespace-separated token is used, so ``path label`` lines work; blank lines and lines
            starting with ``#`` are skipped). The dataset then holds exactly the listed images.
    """

    def __init__(self, root: str | os.PathLike | None, list_file: str | os.PathLike | None = None) -> None:
        self.root = check_data_root(root)
        self.classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        relative = _read_list_file(self.root, Path(list_file)) if list_file else _scan_images(self.root)
        self.paths = [self.root / rel for rel in relative]
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.targets = [class_index.get(Path(rel).parts[0], -1) if len(Path(rel).parts) > 1 else -1
                        for rel in relative]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

    def label(self, index: int) -> int:
        """Class index of image ``index`` (-1 for an image directly under ``root``)."""
        return self.targets[index]


def load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` as an 8-bit RGB image; a missing, truncated or non-image file is a :class:`DataError`.

    High-bit-depth images (16-bit grayscale PNG / TIFF: PIL modes ``I;16*``, ``I``, ``F``) are scaled to
    8 bits (:func:`to_8bit`); PIL's own ``convert("RGB")`` would clip them at 255.
    """
    try:
        with Image.open(path) as image:
            image.load()  # forces the decode, so a corrupt file fails here
            return to_8bit(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL signals bad data with OSError (incl. UnidentifiedImageError), SyntaxError or ValueError
        raise DataError(f"cannot read image {path}: {err}") from err


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


def check_data_root(root: str | os.PathLike | None) -> Path:
    """``root`` as a Path when it is an existing folder, else a :class:`DataError` that says how to fix it."""
    if root is None or str(root) == "":
        raise DataError("data.root is not set; pass data.root=/path/to/images")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root={root} does not exist; pass data.root=/path/to/images")
    if not path.is_dir():
        raise DataError(f"data.root={root} is not a folder; pass data.root=/path/to/images")
    return path


def _scan_images(root: Path) -> list[str]:
    """Paths (POSIX, relative to ``root``) of every image file below ``root``, sorted."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        rel_folder = Path(folder).relative_to(root)
        found.extend((rel_folder / name).as_posix() for name in files if name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise DataError(f"data.root={root} holds no images (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}); pass data.root=/path/to/images")
    return sorted(found)


def _read_list_file(root: Path, list_file: Path) -> list[str]:
    """The sorted, de-duplicated image paths that ``list_file`` names; every one must exist under ``root``."""
    if not list_file.is_file():
        raise DataError(f"data.list_file={list_file} does not exist; pass a text file of image paths "
                        "relative to data.root, or data.list_file=null")
    listed: dict[str, int] = {}  # path -> line number, for the error message
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        tokens = line.split()
        if tokens and not tokens[0].startswith("#"):
            listed.setdefault(tokens[0], number)
    if not listed:
        raise DataError(f"data.list_file={list_file} lists no image paths")
    missing = [(number, rel) for rel, number in listed.items() if not (root / rel).is_file()]
    if missing:
        number, rel = missing[0]
        raise DataError(f"data.list_file={list_file} line {number} names {rel}, which does not exist under "
                        f"data.root={root} ({len(missing)} of {len(listed)} listed files are missing)")
    return sorted(listed)


class DigitsDataset(Dataset):
    """scikit-learn's bundled digits: 1797 real 8x8 grayscale images (0..16), 10 classes, no download.

    Each image is scaled to 0..255 and upsampled (PIL bicubic) to ``image_size`` px, returned as RGB.
    """

    def __init__(self, image_size: int = 32) -> None:
        from sklearn.datasets import load_digits  # deferred: sklearn's import costs ~1 s

        digits = load_digits()
        # (1797, 8, 8) in 0..16 -> uint8 0..255
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self.targets = [int(t) for t in digits.target]
        self.classes = [str(d) for d in range(10)]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        small = Image.fromarray(self.images[index])  # 2-D uint8: mode L
        return small.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC).convert("RGB")

    def label(self, index: int) -> int:
        return self.targets[index]


class SyntheticDataset(Dataset):
    """Deterministic random images for smoke tests: a colour gradient plus 1-4 soft colour blobs.

    Image ``i`` depends only on ``(seed, i)``. Its label is the number of blobs minus one (4 classes), so
    an evaluation smoke test has something learnable.
    """

    max_blobs = 4

    def __init__(self, num_images: int, image_size: int, seed: int = 0) -> None:
        if num_images <= 0 or image_size <= 0:
            raise DataError(f"synthetic data needs positive sizes; got {num_images} images of {image_size} px "
                            "(data.synthetic_size, data.image_size)")
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        self.classes = [f"{n} blobs" for n in range(1, self.max_blobs + 1)]
        self.targets = [self._draw(i)[0] - 1 for i in range(num_images)]

    def __len__(self) -> int:
        return self.num_images

    def _draw(self, index: int) -> tuple[int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, index])
        return int(rng.integers(1, self.max_blobs + 1)), rng

    def __getitem__(self, index: int) -> Image.Image:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        num_blobs, rng = self._draw(index)
        coords = np.arange(self.image_size, dtype=np.float32) / self.image_size  # (s,) in [0, 1)
        c0, c1 = rng.random((2, 3), dtype=np.float32)  # gradient end colours
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None] + 1.5) / 3.0  # (s, s) in [0, 1]
        image = c0 + ramp[..., None] * (c1 - c0)  # (s, s, 3)
        for _ in range(num_blobs):
            cy, cx = rng.random(2)
            radius = rng.uniform(0.08, 0.25)
            colour = rng.random(3, dtype=np.float32)
            # a Gaussian is separable: outer product of two 1-D profiles instead of a 2-D exp
            gy, gx = (np.exp(-((coords - c) ** 2) / (2 * radius**2)).astype(np.float32) for c in (cy, cx))
            weight = np.outer(gy, gx)[..., None]  # (s, s, 1)
            image = image * (1 - weight) + colour * weight
        return Image.fromarray(np.round(image * 255).astype(np.uint8))  # (s, s, 3) uint8: RGB

    def label(self, index: int) -> int:
        return self.targets[index]


DATASETS = ("digits", "folder", "synthetic")


def build_dataset(cfg: DataConfig) -> Dataset:
    """The base dataset that ``cfg.name`` selects (digits | folder | synthetic)."""
    if cfg.name == "digits":
        return DigitsDataset(cfg.image_size)
    if cfg.name == "folder":
        return ImageFolderDataset(cfg.root, cfg.list_file)
    if cfg.name == "synthetic":
        return SyntheticDataset(cfg.synthetic_size, cfg.image_size)
    raise DataError(f"data.name={cfg.name!r} is unknown; choose one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------------
# Batched image operations with per-view parameters (torchvision formulas, float images in [0, 1])
# ----------------------------------------------------------------------------------------------------


def _per_view(factor: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1), to broadcast a per-view factor over (N, C, H, W)."""
    return factor.view(-1, 1, 1, 1)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * image + (1 - factor) * other`` clamped to [0, 1]; ``factor`` (N,)."""
    f = _per_view(factor)
    return (image * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = image.unbind(dim=1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale intensities by ``factor`` (N,); image (N, 3, H, W)."""
    return (image * _per_view(factor)).clamp_(0.0, 1.0)


def adjust_contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each view with its mean luma; ``factor`` (N,)."""
    mean = grayscale(image).mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return _blend(image, mean, factor)


def adjust_saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each view with its grayscale version; ``factor`` (N,)."""
    return _blend(image, grayscale(image), factor)


def adjust_hue(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each view's HSV hue by ``shift`` (N,) turns, in [-0.5, 0.5]; image (N, 3, H, W).

    Value (max) and chroma (max - min) do not change under a hue rotation, so the output follows from
    the shifted hue directly: channel n in {R: 5, G: 3, B: 1} is ``max - chroma * clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6 * hue) mod 6`` (the closed form of HSV -> RGB), without materialising HSV.
    """
    r, g, b = image.unbind(dim=1)  # (N, H, W) each
    low, high = torch.aminmax(image, dim=1)
    chroma = high - low
    safe = torch.where(chroma == 0, 1.0, chroma)  # gray pixels: any hue works, chroma 0 erases it
    # hue in sixths of a turn, from the channel holding the maximum (red wins ties, then green)
    sector = torch.where(high == r, (g - b) / safe, torch.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    sector = sector.unsqueeze(1) + 6.0 * shift.view(-1, 1, 1, 1)  # (N, 1, H, W)
    k = (sector + torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)).remainder_(6.0)  # (N, 3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return high.unsqueeze(1) - chroma.unsqueeze(1) * ramp


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image: torch.Tensor, factors: torch.Tensor, order: np.ndarray) -> torch.Tensor:
    """torchvision's ColorJitter with per-view factors and a per-view random order of the four operations.

    Args:
        image: (N, 3, H, W) in [0, 1].
        factors: (N, 4) brightness, contrast, saturation factors and hue shift.
        order: (N, 4) int, per view a permutation of (0, 1, 2, 3): the operations in the order applied.
    Returns:
        (N, 3, H, W) a new tensor.
    """
    x, at = image, np.arange(len(image))  # at[i]: the input view now in row i
    for position in range(len(COLOR_OPS)):
        # at each position every view runs exactly one operation: sort the views by it, so each
        # operation runs once on a contiguous slice
        sort = np.argsort(order[at, position], kind="stable")
        at = at[sort]
        x = x.index_select(0, torch.from_numpy(sort))  # index_select: ~8x faster than x[idx] on CPU
        f = factors[torch.from_numpy(at)]
        bounds = np.concatenate([[0], np.cumsum(np.bincount(order[at, position], minlength=len(COLOR_OPS)))])
        for op_id, op in enumerate(COLOR_OPS):
            start, stop = bounds[op_id], bounds[op_id + 1]
            if stop > start:
                x[start:stop] = op(x[start:stop], f[start:stop, op_id])
    out = torch.empty_like(x)
    out[torch.from_numpy(at)] = x
    return out


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N,) standard deviations (px) -> (N, kernel_size) normalised 1-D Gaussian kernels."""
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size)  # (K,)
    pdf = torch.exp(-0.5 * (offsets / sigma.unsqueeze(1)) ** 2)  # (N, K)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding and a per-view ``sigma`` (N,); image (N, C, H, W)."""
    n, c, h, w = image.shape
    pad = kernel_size // 2
    kernels = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # (N*C, K): one per channel
    x = F.pad(image.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")  # channels as conv groups
    x = F.conv2d(x, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)  # along W: (1, N*C, H+2p, W)
    x = F.conv2d(x, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)  # along H: (1, N*C, H, W)
    return x.view(n, c, h, w)


def blur_kernel_size(sigma_max: float, view_size: int) -> int:
    """Odd kernel covering +-3 sigma_max, clamped so reflect padding (kernel // 2) stays below ``view_size``."""
    half = min(math.ceil(3 * sigma_max), view_size - 1)
    return 2 * max(half, 0) + 1


# ----------------------------------------------------------------------------------------------------
# Crop + resize (RandomResizedCrop's resampling: bilinear with antialias)
# ----------------------------------------------------------------------------------------------------

AUGMENT_CHUNK_BYTES = 4 << 20  # views augmented together: a chunk stays in cache through ~40 passes
DENSE_RESIZE_MAX_FLOPS = 1e6  # per view; below this one batched matmul beats a ~25 us interpolate call


def resize_weights(start: np.ndarray, length: np.ndarray, in_size: int, out_size: int) -> np.ndarray:
    """Antialiased bilinear resampling of a crop along one axis, as a matrix (torch's ``antialias=True`` filter).

    Args:
        start, length: (N,) crop offset and extent along the axis, in source pixels.
        in_size: source extent along the axis.
        out_size: output extent.
    Returns:
        (N, out_size, in_size) float32 rows summing to 1: output pixel i = row i . source line.
    """
    scale = length / out_size  # (N,) source px per output px
    half_width = np.maximum(scale, 1.0)  # triangle filter, widened when shrinking: that is the antialiasing
    centre = start[:, None] + (np.arange(out_size) + 0.5) * scale[:, None]  # (N, out) in source coordinates
    pos = np.arange(in_size) + 0.5  # (in,) source pixel centres
    w = np.clip(1.0 - np.abs(pos - centre[..., None]) / half_width[:, None, None], 0.0, None)  # (N, out, in)
    w *= ((pos >= start[:, None]) & (pos < (start + length)[:, None]))[:, None, :]  # only the crop's pixels
    return (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)


def dense_resize_is_cheap(height: int, width: int, size: int) -> bool:
    """Whether resizing a crop of an (height, width) image to ``size`` by two dense matmuls is cheap."""
    return 2 * 3 * size * width * (height + size) <= DENSE_RESIZE_MAX_FLOPS


def resized_crops_dense(images: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Crop + resize V views of each of B same-size images with two batched matmuls.

    Args:
        images: (B, C, H, W) float.
        boxes: (B * V, 4) int (top, left, height, width), image-major.
        size: output side S.
    Returns:
        (B * V, C, S, S).
    """
    b, c, h, w = images.shape
    v = len(boxes) // b
    rows = torch.from_numpy(resize_weights(boxes[:, 0], boxes[:, 2], h, size))  # (B*V, S, H)
    cols = torch.from_numpy(resize_weights(boxes[:, 1], boxes[:, 3], w, size))  # (B*V, S, W)
    x = images.permute(0, 2, 1, 3).reshape(b, h, c * w)  # (B, H, C*W)
    x = torch.bmm(rows.view(b, v * size, h), x)  # (B, V*S, C*W): rows resampled
    x = x.view(b * v, size, c, w).transpose(1, 2).reshape(b * v, c * size, w)  # (B*V, C*S, W)
    x = torch.bmm(x, cols.transpose(1, 2))  # (B*V, C*S, S): columns resampled
    return x.view(b * v, c, size, size)


def resized_crops_loop(image: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Crop + resize views of one (C, H, W) image, one ``interpolate`` call each (large images).

    A uint8 image (0..255) gives the same float output in [0, 1] as its float version.

    Returns:
        (V, C, S, S) for the V rows of ``boxes`` (top, left, height, width).
    """
    out = torch.empty(len(boxes), image.shape[0], size, size)
    for v, (top, left, h, w) in enumerate(boxes.tolist()):
        patch = image[None, :, top:top + h, left:left + w]
        if patch.dtype == torch.uint8:  # convert only the crop: cheaper than the whole image
            patch = patch.float().div_(255.0)
        out[v] = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return out


@dataclass
class SizeBucket:
    """Images of one size in a batch: their positions in the batch and their (M, 3, H, W) uint8 stack."""

    members: np.ndarray
    images: torch.Tensor


def bucket_by_size(images: Sequence[torch.Tensor]) -> list[SizeBucket]:
    """Group (3, H, W) uint8 images by size (same-size images are resized together)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(b)
    return [SizeBucket(np.asarray(members), torch.stack([images[b] for b in members])) for members in groups.values()]


# ----------------------------------------------------------------------------------------------------
# Multi-crop augmentation
# ----------------------------------------------------------------------------------------------------


@dataclass
class ViewParams:
    """Random parameters of N views of one size (numpy arrays with N rows).

    Attributes:
        boxes: (N, 4) int64 crop boxes (top, left, height, width) in source pixels.
        flip: (N,) bool horizontal flip.
        jitter: (N,) bool whether colour jitter applies.
        factors: (N, 4) float32 brightness, contrast, saturation factors and hue shift.
        order: (N, 4) int64 order of the four colour operations.
        gray: (N,) bool grayscale conversion.
        blur: (N,) bool Gaussian blur.
        sigma: (N,) float32 blur standard deviation in px.
    """

    boxes: np.ndarray
    flip: np.ndarray
    jitter: np.ndarray
    factors: np.ndarray
    order: np.ndarray
    gray: np.ndarray
    blur: np.ndarray
    sigma: np.ndarray

    def rows(self, rows: slice) -> ViewParams:
        """The parameters of a slice of the views."""
        return ViewParams(**{name: getattr(self, name)[rows] for name in ViewParams.__dataclass_fields__})


def sample_boxes(u: np.ndarray, height: np.ndarray, width: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """RandomResizedCrop boxes from uniforms, with torchvision's rejection sampling and centre-crop fallback.

    Args:
        u: (N, 2 * CROP_TRIES + 2) float64 uniforms in [0, 1): area and log-aspect of each try, then top, left.
        height, width: (N,) source image size of each view.
        scale: (low, high) fraction of the source area.
    Returns:
        (N, 4) int64 boxes (top, left, height, width).
    """
    height, width = height.astype(np.float64), width.astype(np.float64)
    log_lo, log_hi = math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1])
    target = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[:, :CROP_TRIES])  # (N, T)
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, CROP_TRIES:2 * CROP_TRIES])  # (N, T)
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])  # (N, T)
    rows, first = np.arange(len(u)), ok.argmax(axis=1)  # first accepted try (0 if none)
    w, h = w[rows, first], h[rows, first]  # (N,)
    # no try accepted: the whole image, centre-cropped to the nearest allowed aspect ratio
    in_ratio = width / height
    narrow, wide = in_ratio < RATIO_RANGE[0], in_ratio > RATIO_RANGE[1]
    fallback_w = np.where(wide, np.round(height * RATIO_RANGE[1]), width)
    fallback_h = np.where(narrow, np.round(width / RATIO_RANGE[0]), height)
    none = ~ok.any(axis=1)
    w, h = np.where(none, fallback_w, w), np.where(none, fallback_h, h)
    top = np.where(none, (height - h) // 2, np.floor(u[:, -2] * (height - h + 1)))
    left = np.where(none, (width - w) // 2, np.floor(u[:, -1] * (width - w + 1)))
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


def _where(mask: np.ndarray) -> torch.Tensor:
    """(N,) bool -> int64 indices of the True entries."""
    return torch.from_numpy(np.flatnonzero(mask))


class ViewGroup:
    """The views of one output size (2 global or n focal): parameters, crops and per-view augmentation."""

    crop_cols = 2 * CROP_TRIES + 2
    num_uniforms = crop_cols + 13  # uniforms drawn per view

    def __init__(self, count: int, size: int, scale: Sequence[float], cfg: DataConfig) -> None:
        self.count, self.size, self.scale = count, size, (float(scale[0]), float(scale[1]))
        s = float(cfg.color_jitter)
        if not 0.0 <= s <= 2.5:  # the hue shift 0.2 s must stay within half a turn
            raise DataError(f"data.color_jitter={s} must lie in [0, 2.5]")
        self.jitter_lo = np.array([max(0.0, 1 - 0.8 * s)] * 3 + [-0.2 * s])  # (4,) brightness, contrast, sat., hue
        self.jitter_hi = np.array([1 + 0.8 * s] * 3 + [0.2 * s])
        self.hflip_p, self.jitter_p = float(cfg.hflip_p), float(cfg.color_jitter_p)
        self.gray_p, self.blur_p = float(cfg.grayscale_p), float(cfg.blur_p)
        self.sigma_range = (float(cfg.blur_sigma[0]), float(cfg.blur_sigma[1]))
        self.kernel_size = blur_kernel_size(self.sigma_range[1], size)

    def sample(self, u: np.ndarray, height: np.ndarray, width: np.ndarray) -> ViewParams:
        """Every random choice of N views from ``u``: (N, num_uniforms) uniforms; (N,) source sizes."""
        rest = u[:, self.crop_cols:]
        lo, hi = self.sigma_range
        return ViewParams(
            boxes=sample_boxes(u[:, :self.crop_cols], height, width, self.scale),
            flip=rest[:, 0] < self.hflip_p,
            jitter=rest[:, 1] < self.jitter_p,
            factors=(self.jitter_lo + (self.jitter_hi - self.jitter_lo) * rest[:, 2:6]).astype(np.float32),
            order=rest[:, 6:10].argsort(axis=1),  # argsort of iid uniforms: a uniform random permutation
            gray=rest[:, 10] < self.gray_p,
            blur=rest[:, 11] < self.blur_p,
            sigma=(lo + (hi - lo) * rest[:, 12]).astype(np.float32),
        )

    def crop(self, buckets: Sequence[SizeBucket], boxes: np.ndarray) -> torch.Tensor:
        """(B * V, 3, S, S) resized crops of the batch's images; ``boxes`` (B * V, 4), image-major."""
        out = torch.empty(len(boxes), 3, self.size, self.size)
        for bucket in buckets:
            _, _, h, w = bucket.images.shape
            views = (bucket.members[:, None] * self.count + np.arange(self.count)).ravel()  # (M * V,)
            # which path depends only on the image size, so a view never depends on its batch-mates
            if dense_resize_is_cheap(h, w, self.size):
                images = bucket.images.float().div_(255.0)
                out[views] = resized_crops_dense(images, boxes[views], self.size)
            else:
                for m, image in enumerate(bucket.images):
                    mine = views[m * self.count:(m + 1) * self.count]
                    out[mine] = resized_crops_loop(image, boxes[mine], self.size)
        return out

    def augment(self, views: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Flip, colour jitter, grayscale and blur with per-view parameters, in place; (N, 3, S, S) in [0, 1].

        Works through the views in chunks of about AUGMENT_CHUNK_BYTES: each operation is a pass over
        memory, and a chunk that stays in cache makes the ~40 passes cheap (2-3x faster at 224 px).
        """
        per_chunk = max(1, AUGMENT_CHUNK_BYTES // (views[0].numel() * views.element_size()))
        for start in range(0, len(views), per_chunk):
            rows = slice(start, start + per_chunk)
            self._augment_chunk(views[rows], params.rows(rows))
        return views

    def _augment_chunk(self, x: torch.Tensor, params: ViewParams) -> None:
        flip = _where(params.flip)
        if flip.numel():
            x[flip] = x.index_select(0, flip).flip(-1)  # index_select: ~8x faster than x[idx] on CPU
        jitter = _where(params.jitter)
        if jitter.numel():
            factors = torch.from_numpy(params.factors[params.jitter])
            x[jitter] = color_jitter(x.index_select(0, jitter), factors, params.order[params.jitter])
        gray = _where(params.gray)
        if gray.numel():
            x[gray] = grayscale(x.index_select(0, gray)).expand(-1, 3, -1, -1)
        blur = _where(params.blur)
        if blur.numel():
            sigma = torch.from_numpy(params.sigma[params.blur])
            x[blur] = gaussian_blur(x.index_select(0, blur), sigma, self.kernel_size)


def to_uint8_image(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image (any mode) or (3, H, W) uint8 tensor -> (3, H, W) uint8 RGB tensor."""
    if isinstance(image, Image.Image):
        # np.array (one copy) is about twice as fast as TF.pil_to_tensor on small images
        array = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # (H, W, 3) uint8
        image = torch.from_numpy(array).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"expected an RGB image or a (3, H, W) uint8 tensor; got {image.dtype} {tuple(image.shape)}")
    return image


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block, then restore the caller's setting.

    The pipeline's ~200 operations per batch are small, so a second thread gains nothing; worse, when
    the other core is busy (another process, or a DataLoader worker beside the training loop) every
    parallel region waits for it: a digits batch then took 3.6 s instead of 0.07 s. DataLoader workers
    run one thread already; this covers num_workers=0.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~0.2 us
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class MultiCropTransform:
    """MSN multi-crop: image -> ``[target, anchor, focal_1, ..., focal_n]`` normalised float views.

    target and anchor: (3, global_size, global_size) from RandomResizedCrop(scale=global_scale); focal
    views: (3, focal_size, focal_size) from RandomResizedCrop(scale=focal_scale). Every view then gets,
    independently: horizontal flip (hflip_p); colour jitter with probability color_jitter_p (brightness,
    contrast, saturation 0.8 s, hue 0.2 s, s = color_jitter, in random order, as torchvision's
    ColorJitter); grayscale (grayscale_p); Gaussian blur with probability blur_p, sigma ~ U(blur_sigma);
    normalisation with mean/std. Resizing is bilinear with antialias (v2.RandomResizedCrop's default).

    Two stages, so that a batch is augmented at once: :meth:`draw` (per image: every random number the
    views need) and :meth:`apply` (per batch). Calling the transform on one image does both.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.num_focal = int(cfg.num_focal)
        self.groups = [ViewGroup(2, int(cfg.global_size), cfg.global_scale, cfg)]
        if self.num_focal > 0:
            self.groups.append(ViewGroup(self.num_focal, int(cfg.focal_size), cfg.focal_scale, cfg))
        self.mean = torch.tensor([float(m) for m in cfg.mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in cfg.std]).view(1, 3, 1, 1)

    @property
    def num_views(self) -> int:
        return 2 + self.num_focal

    def draw(self, generator: torch.Generator | None = None) -> np.ndarray:
        """Stage 1: (num_views, ViewGroup.num_uniforms) float64 uniforms, all randomness of one image's views."""
        return torch.rand(self.num_views, ViewGroup.num_uniforms, generator=generator, dtype=torch.float64).numpy()

    def apply(self, images: Sequence[Image.Image | torch.Tensor],
              uniforms: Sequence[np.ndarray]) -> list[list[torch.Tensor]]:
        """Stage 2: the views of a batch of images, each from its own :meth:`draw`.

        Returns:
            per image, its views ``[target, anchor, focal_1, ...]``, each (3, S, S) float32.
        """
        with single_threaded():
            return self._apply([to_uint8_image(image) for image in images], uniforms)

    def _apply(self, images: list[torch.Tensor], uniforms: Sequence[np.ndarray]) -> list[list[torch.Tensor]]:
        heights = np.array([image.shape[1] for image in images])  # (B,)
        widths = np.array([image.shape[2] for image in images])
        buckets = bucket_by_size(images)
        u = np.stack(uniforms)  # (B, num_views, num_uniforms)
        per_group, first = [], 0
        for group in self.groups:
            rows = u[:, first:first + group.count].reshape(-1, ViewGroup.num_uniforms)  # (B*V, D), image-major
            first += group.count
            params = group.sample(rows, np.repeat(heights, group.count), np.repeat(widths, group.count))
            x = group.augment(group.crop(buckets, params.boxes), params)
            x = x.sub_(self.mean).div_(self.std)
            per_group.append(x.view(len(images), group.count, *x.shape[1:]))  # (B, V, 3, S, S)
        return [[view for views in per_group for view in views[b].unbind(0)] for b in range(len(images))]

    def __call__(self, image: Image.Image | torch.Tensor,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return self.apply([image], [self.draw(generator)])[0]


# ----------------------------------------------------------------------------------------------------
# Keyed dataset, resumable sampler, loader
# ----------------------------------------------------------------------------------------------------

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
        max_replacements: replacements tried for one undecodable image before giving up with a DataError.
    """

    def __init__(self, base: ImageDataset, transform: MultiCropTransform, seed: int = 0,
                 max_replacements: int = 16) -> None:
        self.base, self.transform, self.seed = base, transform, int(seed)
        self.max_replacements = int(max_replacements)

    def __len__(self) -> int:
        return len(self.base)

    def generator(self, key: Key) -> torch.Generator:
        epoch, index = _check_key(key)
        return stream_generator(self.seed, "views", epoch, index)

    def __getitem__(self, key: Key) -> list[torch.Tensor]:
        samples = self.__getitems__([key])
        if samples.error is not None:
            raise DataError(samples.error)
        return samples[0]

    def __getitems__(self, keys: Sequence[Key]) -> ImageViews:
        """A whole batch (DataLoader calls this): the per-batch stage of the augmentation runs once.

        A :class:`DataError` is returned inside the result rather than raised, so that it reaches the
        user as one line from the main process instead of as a DataLoader worker's traceback.
        """
        keys = [_check_key(key) for key in keys]
        images, skipped = [], []
        try:
            for epoch, index in keys:
                image, bad = self._load(epoch, index)
                images.append(image)
                skipped += bad
            views = self.transform.apply(images, [self.transform.draw(self.generator(key)) for key in keys])
        except DataError as err:
            return ImageViews(skipped=skipped, error=str(err))
        return ImageViews(views, skipped)

    def path(self, index: int) -> str:
        paths = getattr(self.base, "paths", None)
        return str(paths[index]) if paths is not None else f"image {index}"

    def _load(self, epoch: int, index: int) -> tuple[Image.Image, list[str]]:
        """Image ``index``, or a deterministic replacement when it cannot be decoded; the paths that failed."""
        bad, candidate = [], index
        for attempt in range(self.max_replacements + 1):
            try:
                return self.base[candidate], bad
            except DataError:
                bad.append(self.path(candidate))
                g = stream_generator(self.seed, "replace", epoch, index, attempt)
                candidate = int(torch.randint(len(self.base), (1,), generator=g))
        raise DataError(f"could not decode {self.path(index)} nor {self.max_replacements} replacement images "
                        f"({', '.join(bad[1:4])}, ...): check data.root and the files' permissions")


class ImageViews(list):
    """What :meth:`MultiCropDataset.__getitems__` returns: per image, its views; the paths it had to skip."""

    def __init__(self, views: Sequence[list[torch.Tensor]] = (), skipped: Sequence[str] = (),
                 error: str | None = None) -> None:
        super().__init__(views)
        self.skipped, self.error = list(skipped), error


class ViewBatch(ImageViews):
    """A loader batch: the views ``[target (B,3,G,G), anchor (B,3,G,G), focal_1 (B,3,F,F), ...]`` (a list),
    with ``skipped`` (paths of undecodable images replaced in it) and ``error`` (a data error met in a worker)."""

    def pin_memory(self) -> ViewBatch:
        """What the DataLoader's pin-memory thread calls: pinned views, the same report."""
        return ViewBatch([v.pin_memory() for v in self], self.skipped, self.error)


def collate_views(samples: Sequence[list[torch.Tensor]]) -> ViewBatch:
    """Stack per-image views into a :class:`ViewBatch`, keeping the skip report of :class:`ImageViews`."""
    skipped, error = getattr(samples, "skipped", []), getattr(samples, "error", None)
    if error is not None:
        return ViewBatch(skipped=skipped, error=error)
    return ViewBatch([torch.stack(views) for views in zip(*samples, strict=True)], skipped)


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
    (:func:`msn.seeding.stream_seed`; DistributedSampler's ``seed + epoch`` would give seed 1 the order
    seed 0 has one epoch later), so it is a pure function of (seed, epoch). Rank r takes positions
    r, r + R, r + 2R, ... of that order; with ``drop_last`` the tail that does not divide evenly among
    the R replicas is dropped, otherwise the order is padded by wrapping around.

    Resume: :meth:`set_start` skips the first batches of the epoch without yielding (so without
    loading) them. :meth:`set_epoch` resets the start to 0, so call it first.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.num_samples = samples_per_replica(self.dataset_len, self.num_replicas, drop_last)
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


def build_loader(cfg: DataConfig, dataset: MultiCropDataset, sampler: EpochSampler,
                 pin_memory: bool = False) -> DataLoader:
    """DataLoader of :class:`ViewBatch` es ``[target (B,3,G,G), anchor (B,3,G,G), focal_1 (B,3,F,F), ...]``.

    The sampler's keys go to the dataset a batch at a time (``__getitems__``); workers persist across
    epochs, and ``set_epoch`` / ``set_start`` still take effect because the sampler runs in this process.
    ``pin_memory`` (for a GPU) lets the copies to the device overlap with compute.
    """
    workers = int(cfg.num_workers)
    return DataLoader(dataset, batch_size=int(cfg.batch_size), sampler=sampler, num_workers=workers,
                      drop_last=bool(cfg.drop_last), persistent_workers=workers > 0, pin_memory=pin_memory,
                      collate_fn=collate_views, worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stop signals to the training process, which finishes its step and checkpoints.

    A terminal's Ctrl-C (SIGINT) and SLURM's preemption (SIGTERM, and the time-limit signal) reach every
    process of the job; a worker would otherwise die and take the step down with it. Workers still exit
    when the training process does (PyTorch's watchdog).
    """
    for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
