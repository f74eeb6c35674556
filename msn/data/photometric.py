"""Photometric augmentation, batched with per-view parameters: colour jitter, grayscale, blur, normalisation.

Formulas are torchvision's (``transforms.v2.functional``; the tests compare every operation with it) on
float images in [0, 1], shape (N, C, H, W). Every operation is per view, so a view never depends on its
batch-mates. The random choices arrive as numpy arrays (:class:`PhotometricParams`) drawn on the host;
which views an operation touches and in which order is worked out on the host too, so the same code
runs on CPU tensors (in a DataLoader worker) and on a GPU (in the training process) without ever
waiting for the device (no data-dependent shapes are read back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
CPU_CHUNK_BYTES = 4 << 20  # views augmented together on a CPU: a chunk stays in cache through ~40 passes


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
    k = (sector + torch.tensor([5.0, 3.0, 1.0], device=image.device).view(1, 3, 1, 1)).remainder_(6.0)  # (N, 3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return high.unsqueeze(1) - chroma.unsqueeze(1) * ramp


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image: torch.Tensor, factors: torch.Tensor, order: np.ndarray) -> torch.Tensor:
    """torchvision's ColorJitter with per-view factors and a per-view random order of the four operations.

    Args:
        image: (N, 3, H, W) in [0, 1], on any device.
        factors: (N, 4) brightness, contrast, saturation factors and hue shift (host tensor).
        order: (N, 4) int, per view a permutation of (0, 1, 2, 3): the operations in the order applied.
    Returns:
        (N, 3, H, W) a new tensor.
    """
    x, at = image, np.arange(len(image))  # at[i]: the input view now in row i
    for position in range(len(COLOR_OPS)):
        # at each position every view runs exactly one operation: sort the views by it, so each
        # operation runs once on a contiguous slice (whose bounds are known here, on the host)
        sort = np.argsort(order[at, position], kind="stable")
        at = at[sort]
        x = x.index_select(0, _on(x, sort))  # index_select: ~8x faster than x[idx] on CPU
        f = to_device(factors[torch.from_numpy(at)], x.device)
        bounds = np.concatenate([[0], np.cumsum(np.bincount(order[at, position], minlength=len(COLOR_OPS)))])
        for op_id, op in enumerate(COLOR_OPS):
            start, stop = int(bounds[op_id]), int(bounds[op_id + 1])
            if stop > start:
                x[start:stop] = op(x[start:stop], f[start:stop, op_id])
    out = torch.empty_like(x)
    out[_on(x, at)] = x
    return out


def _on(x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
    """Host indices as an int64 tensor on ``x``'s device."""
    return to_device(torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)), x.device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, so the copy is queued and nothing waits."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N,) standard deviations (px) -> (N, kernel_size) normalised 1-D Gaussian kernels."""
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size, device=sigma.device)  # (K,)
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



@dataclass
class PhotometricParams:
    """Random photometric choices of N views (numpy arrays with N rows), drawn with the crops.

    Attributes:
        jitter: (N,) bool whether colour jitter applies.
        factors: (N, 4) float32 brightness, contrast, saturation factors and hue shift.
        order: (N, 4) int64 order of the four colour operations.
        gray: (N,) bool grayscale conversion.
        blur: (N,) bool Gaussian blur.
        sigma: (N,) float32 blur standard deviation in px.
    """

    jitter: np.ndarray
    factors: np.ndarray
    order: np.ndarray
    gray: np.ndarray
    blur: np.ndarray
    sigma: np.ndarray

    def rows(self, rows: slice) -> PhotometricParams:
        """The parameters of a slice of the views."""
        return PhotometricParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def photometric(crops: torch.Tensor, params: PhotometricParams, kernel_size: int, mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
    """The second stage of the augmentation: uint8 crops -> normalised float views, on the crops' device.

    Colour jitter (probability, factors and order per view), grayscale, Gaussian blur, then
    ``(x / 255 - mean) / std``. On a CPU the views go through in chunks of about CPU_CHUNK_BYTES: each
    operation is a pass over memory, and a chunk that stays in cache makes the ~40 passes cheap (2-3x
    faster at 224 px); a GPU takes the whole batch at once.

    Args:
        crops: (N, 3, S, S) uint8, already cropped, resized and flipped.
        params: the N views' :class:`PhotometricParams`.
        kernel_size: the blur kernel (:func:`blur_kernel_size`).
        mean, std: (3,) normalisation.
    Returns:
        (N, 3, S, S) float32 on ``crops.device``.
    """
    x = crops.float().div_(255.0)
    n = len(x)
    per_chunk = n if x.device.type != "cpu" else max(1, CPU_CHUNK_BYTES // max(x[0].numel() * x.element_size(), 1))
    for start in range(0, n, per_chunk):
        rows = slice(start, start + per_chunk)
        _photometric_chunk(x[rows], params.rows(rows), kernel_size)
    mean, std = to_device(mean, x.device).view(1, 3, 1, 1), to_device(std, x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _photometric_chunk(x: torch.Tensor, params: PhotometricParams, kernel_size: int) -> None:
    """Colour jitter, grayscale and blur of the views of ``x`` (N, 3, S, S), in place."""
    jitter = np.flatnonzero(params.jitter)
    if len(jitter):
        rows = _on(x, jitter)
        factors = torch.from_numpy(params.factors[jitter])
        x[rows] = color_jitter(x.index_select(0, rows), factors, params.order[jitter])
    gray = np.flatnonzero(params.gray)
    if len(gray):
        rows = _on(x, gray)
        x[rows] = grayscale(x.index_select(0, rows)).expand(-1, 3, -1, -1)
    blur = np.flatnonzero(params.blur)
    if len(blur):
        rows = _on(x, blur)
        sigma = to_device(torch.from_numpy(params.sigma[blur]), x.device)
        x[rows] = gaussian_blur(x.index_select(0, rows), sigma, kernel_size)
