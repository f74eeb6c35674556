"""RandomResizedCrop, batched: crop boxes from uniforms, and crop + resize + flip to uint8 views.

Boxes follow torchvision's ``RandomResizedCrop`` (its area and aspect-ratio distributions, rejection
sampling and centre-crop fallback). Resampling is bilinear with antialias (v2's default). The crops
come out as uint8, as in the original pipeline (PIL crops are 8-bit): a quarter of the bytes to carry
to the training device, and torch's uint8 antialiased resize is about 5x faster than its float one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from msn.data.photometric import to_device
from msn.errors import DataError

RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
CROP_TRIES = 10  # RandomResizedCrop's rejection-sampling attempts before the centre-crop fallback
CROP_UNIFORMS = 2 * CROP_TRIES + 2  # uniforms one box needs: area and log-aspect per try, then top, left
DENSE_RESIZE_MAX_FLOPS = 1e6  # per view; below this one batched matmul beats a ~25 us interpolate call
PADDED_CHUNK_BYTES = 512 << 20  # float32 working memory of one chunk of :func:`resized_crops_padded`


def sample_boxes(u: np.ndarray, height: np.ndarray, width: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """RandomResizedCrop boxes from uniforms, with torchvision's rejection sampling and centre-crop fallback.

    Args:
        u: (N, CROP_UNIFORMS) float64 uniforms in [0, 1): area and log-aspect of each try, then top, left.
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


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round float pixels in 0..255 to uint8."""
    return x.round_().clamp_(0.0, 255.0).to(torch.uint8)


def resized_crops_dense(images: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Crop + resize V views of each of B same-size images with two batched matmuls.

    Args:
        images: (B, C, H, W) float (any range: the output has the input's).
        boxes: (B * V, 4) int (top, left, height, width), image-major.
        size: output side S.
    Returns:
        (B * V, C, S, S) float.
    """
    b, c, h, w = images.shape
    v = len(boxes) // b
    rows = to_device(torch.from_numpy(resize_weights(boxes[:, 0], boxes[:, 2], h, size)), images.device)  # (B*V,S,H)
    cols = to_device(torch.from_numpy(resize_weights(boxes[:, 1], boxes[:, 3], w, size)), images.device)  # (B*V,S,W)
    x = images.permute(0, 2, 1, 3).reshape(b, h, c * w)  # (B, H, C*W)
    x = torch.bmm(rows.view(b, v * size, h), x)  # (B, V*S, C*W): rows resampled
    x = x.view(b * v, size, c, w).transpose(1, 2).reshape(b * v, c * size, w)  # (B*V, C*S, W)
    x = torch.bmm(x, cols.transpose(1, 2))  # (B*V, C*S, S): columns resampled
    return x.view(b * v, c, size, size)


def resized_crops_loop(image: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Crop + resize views of one (C, H, W) image, one ``interpolate`` call each (large images).

    A uint8 image gives uint8 views: on a CPU torch resizes uint8 directly (its fast path, the one
    torchvision uses for uint8 tensors); elsewhere the crop is resized in float and rounded. A float
    image gives float views.

    Returns:
        (V, C, S, S) for the V rows of ``boxes`` (top, left, height, width).
    """
    out = torch.empty(len(boxes), image.shape[0], size, size, dtype=image.dtype, device=image.device)
    _loop_into(out, range(len(boxes)), image, boxes, np.zeros(len(boxes), dtype=bool), size)
    return out


def _loop_into(out: torch.Tensor, rows: Sequence[int], image: torch.Tensor, boxes: np.ndarray, flip: np.ndarray,
               size: int) -> None:
    """:func:`resized_crops_loop` written straight into ``out[rows]``, each view mirrored where ``flip`` says:
    one copy per view (an index_put of the stacked views and a flipping pass would add two)."""
    direct = image.dtype != torch.uint8 or image.device.type == "cpu"
    for row, (top, left, h, w), mirrored in zip(rows, boxes.tolist(), flip.tolist(), strict=True):
        patch = image[None, :, top:top + h, left:left + w]
        if direct and image.dtype == torch.uint8:
            # torch's uint8 resize is ~1.7x faster on a channels-last block than on a strided window of the image
            # (the same values: tested); the crop's own copy costs a fraction of that
            patch = patch.contiguous(memory_format=torch.channels_last)
        if direct:
            view = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        else:
            view = to_uint8(F.interpolate(patch.float(), size=(size, size), mode="bilinear", antialias=True)[0])
        out[row] = view.flip(-1) if mirrored else view


def same_size_groups(images: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Positions of the images of each distinct size, in order of first appearance (resized together)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(b)
    return [np.asarray(members) for members in groups.values()]


def resized_crops(images: Sequence[torch.Tensor], boxes: np.ndarray, flip: np.ndarray, count: int,
                  size: int, channels_last: bool = False) -> torch.Tensor:
    """``count`` crops of each image, resized to ``size`` and flipped where ``flip`` says, as uint8.

    Args:
        images: B (3, H, W) uint8 images (sizes may differ).
        boxes: (count * B, 4) crop boxes, view-major (row v * B + b: view v of image b).
        flip: (count * B,) bool horizontal flips, same rows.
        channels_last: lay the crops out in memory as (count * B, S, S, 3), the layout of a decoded image and of
            OpenCV, for the 8-bit photometric stage (which then reads them without a transposing copy).
    Returns:
        (count * B, 3, S, S) uint8, view-major, on the images' device.
    """
    b_total = len(images)
    device = images[0].device if b_total else torch.device("cpu")
    if channels_last:
        out = torch.empty(len(boxes), size, size, 3, dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    else:
        out = torch.empty(len(boxes), 3, size, size, dtype=torch.uint8, device=device)
    flip_after = np.zeros_like(flip)  # the dense path's flips, made once its views are in place
    for members in same_size_groups(images):
        _, h, w = images[members[0]].shape
        rows = _view_rows(members, count, b_total)
        # which path depends only on the image size, so a view never depends on its batch-mates
        if dense_resize_is_cheap(h, w, size):
            stack = torch.stack([images[b] for b in members]).float()  # (M, 3, H, W) in 0..255
            out[rows] = to_uint8(resized_crops_dense(stack, boxes[rows], size))
            flip_after[rows] = flip[rows]
        else:  # each image as it is: a decoded (H, W, 3) array seen as (3, H, W) is torch's fastest layout
            for m, b in enumerate(members):
                mine = rows[m * count:(m + 1) * count]
                _loop_into(out, mine.tolist(), images[b], boxes[mine], flip[mine], size)
    return _flip_rows(out, flip_after)


def resized_crops_padded(images: Sequence[torch.Tensor], boxes: np.ndarray, flip: np.ndarray, count: int,
                         size: int, chunk_bytes: int = PADDED_CHUNK_BYTES) -> torch.Tensor:
    """:func:`resized_crops` in the shape a GPU wants: a few large matmuls instead of one call per view.

    Images of any sizes are stacked into chunks, each padded with zeros to its largest height and width
    (the resampling weights of :func:`resize_weights` are zero outside a view's crop, so the padding is
    never read into a pixel), and each chunk is resized by the two batched matmuls of
    :func:`resized_crops_dense`. ``chunk_bytes`` bounds a chunk's float32 working memory (stack,
    resampling weights and the half-resized views): 512 MiB is about 80 ImageNet-sized images with
    12 views. The filter is torch's antialiased bilinear one; the uint8 ``interpolate`` of the worker
    path rounds differently, by at most a few levels (the tests measure it).

    Args and return: as :func:`resized_crops` (B images (3, H, W) uint8 on one device, view-major boxes).
    """
    b_total = len(images)
    device = images[0].device if b_total else torch.device("cpu")
    out = torch.empty(len(boxes), 3, size, size, dtype=torch.uint8, device=device)
    for members in _padded_chunks(images, count, size, chunk_bytes):
        h = max(images[b].shape[1] for b in members)
        w = max(images[b].shape[2] for b in members)
        stack = torch.zeros(len(members), 3, h, w, device=device)  # (M, 3, H, W) float, 0..255
        for m, b in enumerate(members):
            stack[m, :, :images[b].shape[1], :images[b].shape[2]] = images[b]
        rows = _view_rows(members, count, b_total)
        out[to_device(torch.from_numpy(rows), device)] = to_uint8(resized_crops_dense(stack, boxes[rows], size))
    return _flip_rows(out, flip)


def _view_rows(members: np.ndarray, count: int, total: int) -> np.ndarray:
    """(M * count,) the view-major rows of the views of images ``members`` among ``total``, image by image."""
    return (np.arange(count)[None, :] * total + members[:, None]).ravel()


def _padded_chunks(images: Sequence[torch.Tensor], count: int, size: int, chunk_bytes: int) -> list[np.ndarray]:
    """Consecutive runs of image positions whose padded working memory stays within ``chunk_bytes``.

    An image padded to (H, W) costs 4 bytes per float of its stack (3 H W), of its row and column weights
    (V S (H + W)) and of its half-resized views (V S 3 W).
    """
    chunks: list[np.ndarray] = []
    members: list[int] = []
    h = w = 0
    for b, image in enumerate(images):
        nh, nw = max(h, image.shape[1]), max(w, image.shape[2])
        cost = 4 * (len(members) + 1) * (3 * nh * nw + count * size * (nh + nw) + count * size * 3 * nw)
        if members and cost > chunk_bytes:
            chunks.append(np.asarray(members))
            members, nh, nw = [], image.shape[1], image.shape[2]
        members.append(b)
        h, w = nh, nw
    if members:
        chunks.append(np.asarray(members))
    return chunks


def _flip_rows(views: torch.Tensor, flip: np.ndarray) -> torch.Tensor:
    """``views`` (N, C, S, S) with the rows where ``flip`` (N,) is set mirrored left-right, in place."""
    flipped = np.flatnonzero(flip)
    if len(flipped):
        index = to_device(torch.from_numpy(flipped), views.device)
        views[index] = views.index_select(0, index).flip(-1)  # index_select: ~8x faster than x[idx] on CPU
    return views


def to_uint8_image(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image (any mode) or (3, H, W) uint8 tensor -> (3, H, W) uint8 RGB tensor."""
    if isinstance(image, Image.Image):
        # np.array (one copy) is about twice as fast as TF.pil_to_tensor on small images
        array = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # (H, W, 3) uint8
        image = torch.from_numpy(array).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"expected an RGB image or a (3, H, W) uint8 tensor; got {image.dtype} {tuple(image.shape)}")
    return image
