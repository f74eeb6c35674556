"""MSN multi-crop: one image -> [target, anchor, focal_1 .. focal_n] normalised views, in two stages.

1. **Crop** (:meth:`MultiCropTransform.crop`, in DataLoader workers): every random number of an image's
   views is drawn at once from the image's own generator (:meth:`MultiCropTransform.draw`), then the
   random-resized crops are cut at output size as uint8 and flipped.
2. **Photometric** (:meth:`MultiCropTransform.finish`, wherever the crops are): colour jitter in each
   view's random order, grayscale, blur and normalisation, batched over all views of one size with
   per-view parameters (:mod:`msn.data.photometric`).

``data.augment_on=cpu`` runs both stages in the workers; ``device`` runs the second on the training
device (a GPU), so the workers only decode and crop and the batch travels as uint8. The same code runs
on CPU and GPU tensors, and the parameters are drawn before either stage, so a view is a pure function
of (seed, epoch, index) wherever its second stage runs.

Layout: a :class:`ViewBatch` holds one tensor per view size, view-major, so view k of the batch is a
contiguous slice (no copy to split or to stack the focal views).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from msn.config import DataConfig
from msn.data.crops import CROP_UNIFORMS, resized_crops, resized_crops_padded, sample_boxes, to_uint8_image
from msn.data.photometric import PhotometricParams, blur_kernel_size, photometric
from msn.data.photometric_uint8 import photometric_uint8, uses_uint8
from msn.errors import DataError


@dataclass
class ViewParams:
    """Random parameters of N views of one size (numpy arrays with N rows).

    Attributes:
        boxes: (N, 4) int64 crop boxes (top, left, height, width) in source pixels.
        flip: (N,) bool horizontal flip.
        photometric: the rest (colour jitter, grayscale, blur), applied in the second stage.
    """

    boxes: np.ndarray
    flip: np.ndarray
    photometric: PhotometricParams


class ViewGroup:
    """The views of one output size (2 global or n focal): their random parameters and their crops."""

    num_uniforms = CROP_UNIFORMS + 13  # uniforms drawn per view

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
        rest = u[:, CROP_UNIFORMS:]
        lo, hi = self.sigma_range
        return ViewParams(
            boxes=sample_boxes(u[:, :CROP_UNIFORMS], height, width, self.scale),
            flip=rest[:, 0] < self.hflip_p,
            photometric=PhotometricParams(
                jitter=rest[:, 1] < self.jitter_p,
                factors=(self.jitter_lo + (self.jitter_hi - self.jitter_lo) * rest[:, 2:6]).astype(np.float32),
                order=rest[:, 6:10].argsort(axis=1),  # argsort of iid uniforms: a uniform random permutation
                gray=rest[:, 10] < self.gray_p,
                blur=rest[:, 11] < self.blur_p,
                sigma=(lo + (hi - lo) * rest[:, 12]).astype(np.float32),
            ),
        )


class ViewBatch:
    """A batch of multi-crop views: one tensor per view size, view-major, plus what the loader met.

    Attributes:
        groups: per view size, (count * B, 3, S, S): uint8 crops while ``params`` is set (the
            photometric stage is still to run), then normalised float views.
        counts: views per group (2 global, then the focal views).
        params: per group, the photometric parameters still to apply, or None once applied.
        skipped: paths of undecodable images that were replaced in this batch.
        skip_kinds: for those of them that are not plainly undecodable images, what they are (path ->
            ``sample without an image member ...``; :class:`msn.errors.BadSample`).
        error: a data error met in a loader worker (the batch is then empty), reported by the trainer.
        cpu_decoded: with ``data.decode_on=device``, how many of the batch's images were decoded on the CPU
            all the same (not JPEG, or refused by the device's decoder); None when the workers decode all.
    """

    def __init__(self, groups: Sequence[torch.Tensor] = (), counts: Sequence[int] = (),
                 params: Sequence[PhotometricParams] | None = None, skipped: Sequence[str] = (),
                 error: str | None = None, skip_kinds: dict[str, str] | None = None,
                 cpu_decoded: int | None = None) -> None:
        self.groups, self.counts = list(groups), list(counts)
        self.params = None if params is None else list(params)
        self.skipped, self.error, self.skip_kinds = list(skipped), error, dict(skip_kinds or {})
        self.cpu_decoded = cpu_decoded

    @property
    def batch_size(self) -> int:
        return len(self.groups[0]) // self.counts[0] if self.groups else 0

    @property
    def pending(self) -> bool:
        """Whether the photometric stage is still to run."""
        return self.params is not None

    def views(self) -> list[torch.Tensor]:
        """``[target (B,3,G,G), anchor (B,3,G,G), focal_1 (B,3,F,F), ...]``, contiguous slices of the groups."""
        return [view for group, count in zip(self.groups, self.counts, strict=True) for view in group.chunk(count)]

    def per_image(self) -> list[list[torch.Tensor]]:
        """Per image, its views ``[target, anchor, focal_1, ...]``, each (3, S, S)."""
        views = self.views()
        return [[view[b] for view in views] for b in range(self.batch_size)]

    def replace(self, groups: Sequence[torch.Tensor], params: Sequence[PhotometricParams] | None) -> ViewBatch:
        return ViewBatch(groups, self.counts, params, self.skipped, self.error, self.skip_kinds, self.cpu_decoded)

    def to(self, device: torch.device, non_blocking: bool = False) -> ViewBatch:
        return self.replace([g.to(device, non_blocking=non_blocking) for g in self.groups], self.params)

    def pin_memory(self) -> ViewBatch:
        """What the DataLoader's pin-memory thread calls: the groups in pinned memory, the rest as it is."""
        return self.replace([g.pin_memory() for g in self.groups], self.params)


class MultiCropTransform:
    """MSN multi-crop: image -> ``[target, anchor, focal_1, ..., focal_n]`` normalised float views.

    target and anchor: (3, global_size, global_size) from RandomResizedCrop(scale=global_scale); focal
    views: (3, focal_size, focal_size) from RandomResizedCrop(scale=focal_scale). Every view then gets,
    independently: horizontal flip (hflip_p); colour jitter with probability color_jitter_p (brightness,
    contrast, saturation 0.8 s, hue 0.2 s, s = color_jitter, in random order, as torchvision's
    ColorJitter); grayscale (grayscale_p); Gaussian blur with probability blur_p, sigma ~ U(blur_sigma);
    normalisation with mean/std. Resizing is bilinear with antialias (v2.RandomResizedCrop's default),
    rounded to uint8 as a PIL crop is.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.num_focal = int(cfg.num_focal)
        self.groups = [ViewGroup(2, int(cfg.global_size), cfg.global_scale, cfg)]
        if self.num_focal > 0:
            self.groups.append(ViewGroup(self.num_focal, int(cfg.focal_size), cfg.focal_scale, cfg))
        self.mean = torch.tensor([float(m) for m in cfg.mean])
        self.std = torch.tensor([float(s) for s in cfg.std])
        # on a CPU the photometric stage runs in 8 bits with OpenCV (data.cpu_photometric), on a GPU in float
        self.cpu_uint8 = uses_uint8(getattr(cfg, "cpu_photometric", "auto"))

    @property
    def num_views(self) -> int:
        return 2 + self.num_focal

    def draw(self, generator: torch.Generator | None = None) -> np.ndarray:
        """(num_views, ViewGroup.num_uniforms) float64 uniforms: all randomness of one image's views."""
        return torch.rand(self.num_views, ViewGroup.num_uniforms, generator=generator, dtype=torch.float64).numpy()

    def crop(self, images: Sequence[Image.Image | torch.Tensor], uniforms: Sequence[np.ndarray],
             padded: bool = False, finish_here: bool = False) -> ViewBatch:
        """Stage 1: the uint8 crops of a batch of images (each with its own :meth:`draw`), photometric pending.

        ``padded`` resizes with :func:`~msn.data.crops.resized_crops_padded` (images decoded on a GPU: a few
        large matmuls), else with :func:`~msn.data.crops.resized_crops` (a loader worker's CPU). The boxes and
        flips are the same either way. ``finish_here``: :meth:`finish` follows in this process, so on a CPU
        with the 8-bit stage the crops are laid out channels-last, as that stage reads them.
        """
        on_cpu = not images or not isinstance(images[0], torch.Tensor) or images[0].device.type == "cpu"
        if padded:
            resize = resized_crops_padded
        else:
            resize = functools.partial(resized_crops, channels_last=finish_here and on_cpu and self.cpu_uint8)
        with single_threaded() if on_cpu else contextlib.nullcontext():
            tensors = [to_uint8_image(image) for image in images]
            heights = np.array([t.shape[1] for t in tensors])  # (B,)
            widths = np.array([t.shape[2] for t in tensors])
            u = np.stack(uniforms)  # (B, num_views, num_uniforms)
            crops, params, first = [], [], 0
            for group in self.groups:
                # view-major rows (view v of image b at v * B + b); each view keeps its own uniforms
                rows = u[:, first:first + group.count].transpose(1, 0, 2).reshape(-1, ViewGroup.num_uniforms)
                first += group.count
                p = group.sample(rows, np.tile(heights, group.count), np.tile(widths, group.count))
                crops.append(resize(tensors, p.boxes, p.flip, group.count, group.size))
                params.append(p.photometric)
        return ViewBatch(crops, [g.count for g in self.groups], params)

    def finish(self, batch: ViewBatch) -> ViewBatch:
        """Stage 2: colour jitter, grayscale, blur and normalisation on the device the crops are on (on a CPU in 8
        bits with OpenCV unless ``data.cpu_photometric=float``: :mod:`msn.data.photometric_uint8`)."""
        if not batch.pending:
            return batch
        on_cpu = bool(batch.groups) and batch.groups[0].device.type == "cpu"
        stage = photometric_uint8 if on_cpu and self.cpu_uint8 else photometric
        with single_threaded() if on_cpu else contextlib.nullcontext():
            views = [stage(crops, params, group.kernel_size, self.mean, self.std)
                     for crops, params, group in zip(batch.groups, batch.params, self.groups, strict=True)]
        return batch.replace(views, None)

    def apply(self, images: Sequence[Image.Image | torch.Tensor],
              uniforms: Sequence[np.ndarray]) -> list[list[torch.Tensor]]:
        """Both stages on the CPU: per image, its views ``[target, anchor, focal_1, ...]``, each (3, S, S)."""
        return self.finish(self.crop(images, uniforms, finish_here=True)).per_image()

    def __call__(self, image: Image.Image | torch.Tensor,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return self.apply([image], [self.draw(generator)])[0]


def device_views(batch: ViewBatch, transform: MultiCropTransform, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """A loader batch as the training step takes it: ``[target, anchor, focal_1, ...]`` on ``device``.

    The groups are copied (asynchronously from pinned memory), then the photometric stage runs there
    if the workers left it pending (``data.augment_on=device``).
    """
    batch = transform.finish(batch.to(device, non_blocking=True))
    return [view.to(dtype) for view in batch.views()]


def augment_in_workers(augment_on: str, device: torch.device) -> bool:
    """Whether the loader workers run the photometric stage: ``data.augment_on`` for a training ``device``."""
    if augment_on not in ("auto", "cpu", "device"):
        raise DataError(f"data.augment_on={augment_on!r} is not allowed; choose one of auto, cpu, device")
    return augment_on == "cpu" or (augment_on == "auto" and device.type == "cpu")


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
