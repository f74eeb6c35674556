"""The photometric stage on a CPU in 8 bits, as the original code's PIL pipeline computes it, with OpenCV's
vectorised kernels: about 2.6x faster than the float stage per view (``data.cpu_photometric``).

Each operation works on uint8 images and rounds and clips to 0..255 after itself, as PIL's enhancers and
torchvision's PIL ``ColorJitter`` do, so the views follow the paper's recipe the way its code ran it:

- brightness ``v -> v b``, contrast ``v -> m + c (v - m)`` (m: the view's mean luma, rounded as PIL does), both as
  one 256-entry table per view, truncated as PIL's ``blend``;
- saturation ``v -> gray + s (v - gray)`` (ITU-R 601-2 luma), truncated;
- hue: to HSV with the hue in 8 bits (OpenCV's ``_FULL`` conversions), shifted by ``int(255 h)`` modulo 256 as
  torchvision's PIL ``adjust_hue``, and back;
- grayscale; Gaussian blur with the float stage's kernel size and the view's sigma (reflect-101 borders, as
  the float stage's ``reflect`` padding); normalisation to float32.

The random choices are the float stage's (:class:`PhotometricParams`), so the two differ only by the rounding
of the intermediate 8-bit images and of the 8-bit hue (tests compare each operation with torchvision's PIL
functions and the views' colour statistics with the float stage's). A view depends only on its own
parameters: the same on any machine, resumable bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from msn.errors import ConfigError

CPU_PHOTOMETRIC = ("auto", "uint8", "float")


def opencv_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def uses_uint8(cpu_photometric: str) -> bool:
    """Whether the CPU's photometric stage runs in 8 bits (``data.cpu_photometric``): ``auto`` when OpenCV is
    installed; ``uint8`` without OpenCV is a :class:`ConfigError` naming the package."""
    if cpu_photometric not in CPU_PHOTOMETRIC:
        raise ConfigError(f"data.cpu_photometric={cpu_photometric!r} is not allowed; choose one of "
                          f"{', '.join(CPU_PHOTOMETRIC)}")
    if cpu_photometric == "float":
        return False
    if opencv_available():
        return True
    if cpu_photometric == "uint8":
        raise ConfigError("data.cpu_photometric=uint8 needs OpenCV: pip install opencv-python-headless (or set "
                          "data.cpu_photometric=float)")
    return False


def photometric_uint8(crops: torch.Tensor, params, kernel_size: int, mean: torch.Tensor,
                      std: torch.Tensor) -> torch.Tensor:
    """Colour jitter, grayscale, blur and normalisation of uint8 crops, view by view in 8 bits.

    Args:
        crops: (N, 3, S, S) uint8 on the CPU.
        params: the views' :class:`~msn.data.photometric.PhotometricParams`.
        kernel_size: the blur kernel (odd), as the float stage's.
        mean, std: (3,) normalisation.
    Returns:
        (N, 3, S, S) float32 ``(x / 255 - mean) / std``.
    """
    import cv2

    cv2.setNumThreads(1)  # one loader worker, one core: OpenCV's own pool would compete with the other workers
    pixels = crops.permute(0, 2, 3, 1)  # (N, S, S, 3): OpenCV's layout, already so in memory for channels-last crops
    images = (pixels if pixels.is_contiguous() else pixels.contiguous()).numpy()  # read, never written
    levels = np.arange(256, dtype=np.float64) / 255.0
    normalise = [((levels - float(m)) / float(s)).astype(np.float32) for m, s in zip(mean, std, strict=True)]
    out = torch.empty(crops.shape, dtype=torch.float32)
    planes = out.numpy()  # (N, 3, S, S): each view's channels are written in place by a table lookup
    for n in range(len(images)):
        image = images[n]  # every OpenCV call below returns a new array: the crops stay as they are
        if params.jitter[n]:
            for op in params.order[n]:
                image = _COLOR_OPS[int(op)](cv2, image, float(params.factors[n, int(op)]))
        if params.gray[n]:
            image = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        if params.blur[n]:
            sigma = float(params.sigma[n])
            image = cv2.GaussianBlur(image, (kernel_size, kernel_size), sigmaX=sigma, sigmaY=sigma,
                                     borderType=cv2.BORDER_REFLECT_101)
        # (x / 255 - mean) / std: one 256-entry float table per channel, looked up straight into the output
        for c, channel in enumerate(cv2.split(image)):
            cv2.LUT(channel, normalise[c], dst=planes[n, c])
    return out


def _table(values: np.ndarray) -> np.ndarray:
    """A 256-entry uint8 lookup table from float values, truncated and clipped (PIL's ``blend``)."""
    return np.clip(values, 0, 255).astype(np.uint8)  # the cast truncates: floor, on values clipped at 0


FLOOR = -0.5 + 1e-3  # added before OpenCV's rounding makes it PIL's truncation (for fractions below 0.999)


_LEVELS = np.arange(256, dtype=np.float64)


def _brightness(cv2, image: np.ndarray, factor: float) -> np.ndarray:
    return cv2.LUT(image, _table(_LEVELS * factor))


def _contrast(cv2, image: np.ndarray, factor: float) -> np.ndarray:
    mean = int(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean() + 0.5)  # PIL: the luma's mean, rounded
    return cv2.LUT(image, _table(mean + factor * (_LEVELS - mean)))


def _saturation(cv2, image: np.ndarray, factor: float) -> np.ndarray:
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, factor, gray, 1.0 - factor, FLOOR)  # truncated and saturated to 0..255


def _hue(cv2, image: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)  # hue in 256 steps a turn
    hsv[..., 0] = cv2.LUT(hsv[..., 0], ((np.arange(256) + int(shift * 255)) % 256).astype(np.uint8))  # as PIL
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


_COLOR_OPS = (_brightness, _contrast, _saturation, _hue)  # the order of PhotometricParams.factors' columns
