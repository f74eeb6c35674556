"""The CPU's 8-bit photometric stage (``data.cpu_photometric``, OpenCV) and the views' distributions.

Each 8-bit operation is compared with torchvision's PIL functions (the original code's ColorJitter), the whole stage
with the float stage on the same crops and parameters (the colour statistics of many views), and the crop boxes'
scale and aspect histograms with torchvision's RandomResizedCrop.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from msn.config import DataConfig
from msn.data.crops import sample_boxes
from msn.data.multicrop import MultiCropTransform, ViewGroup
from msn.data.photometric import photometric
from msn.errors import ConfigError

cv2 = pytest.importorskip("cv2")
from msn.data import photometric_uint8 as u8  # noqa: E402


def _natural(seed: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8: smooth colour fields with noise, whose hues cover the circle."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    phase = rng.random(3) * 6
    base = np.stack([np.sin(x / (7.0 + 3 * c) + phase[c]) * 100 + np.cos(y / (11.0 + 2 * c)) * 60 + 128
                     for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("op", "pil_op", "factors", "max_diff", "mean_diff"), [
    (u8._brightness, F.adjust_brightness, (0.6, 1.4), 1, 0.05),
    (u8._contrast, F.adjust_contrast, (0.6, 1.4), 1, 0.05),
    (u8._saturation, F.adjust_saturation, (0.6, 1.4), 1, 0.05),
    (u8._hue, F.adjust_hue, (-0.1, 0.07), 16, 1.5),  # measured: at most 12 levels, 1.0 on average (HSV rounding)
])
def test_each_8_bit_operation_is_torchvisions_pil_operation(op, pil_op, factors, max_diff, mean_diff):
    image = _natural(0, 64)
    for factor in factors:
        mine = op(cv2, image.copy(), factor).astype(int)
        theirs = np.asarray(pil_op(Image.fromarray(image), factor)).astype(int)
        diff = np.abs(mine - theirs)
        assert diff.max() <= max_diff and diff.mean() <= mean_diff, (op.__name__, factor, diff.max(), diff.mean())


def _views(n: int, size: int, seed: int = 0):
    """``n`` uint8 crops and the paper's photometric parameters for them (focal-view probabilities)."""
    cfg = OmegaConf.structured(DataConfig(global_size=size, focal_size=size, num_focal=1))
    group = MultiCropTransform(cfg).groups[0]
    u = np.random.default_rng(seed).random((n, ViewGroup.num_uniforms))
    params = group.sample(u, np.full(n, size), np.full(n, size)).photometric
    crops = torch.from_numpy(np.stack([_natural(seed * 1000 + i, size) for i in range(n)])).permute(0, 3, 1, 2)
    return crops.contiguous(), params, group.kernel_size, cfg


def test_the_8_bit_stage_keeps_the_float_stages_colour_statistics():
    """Same crops, same parameters: per view within a few levels of 255, and the statistics the model learns from
    (each channel's mean and spread over 300 views, which views are gray) the same, but for PIL's truncation after
    each operation, which makes the 8-bit views about one level darker on average (measured: 0.9-1.2 levels; the
    spread within 0.1 level), as the original code's were."""
    crops, params, k, cfg = _views(300, 48)
    mean, std = torch.tensor(list(cfg.mean)), torch.tensor(list(cfg.std))
    exact = photometric(crops, params, k, mean, std)
    fast = u8.photometric_uint8(crops, params, k, mean, std)
    assert fast.shape == exact.shape and fast.dtype == torch.float32 and fast.is_contiguous()
    level = 1 / 255 / std.min()  # one 8-bit level in normalised units
    per_view = (fast - exact).abs().mean(dim=(1, 2, 3))
    assert per_view.median() < 2 * level and per_view.max() < 4 * level, (per_view.median(), per_view.max())
    shift = (fast.mean(dim=(0, 2, 3)) - exact.mean(dim=(0, 2, 3))) / level  # (3,) in levels
    assert ((shift < 0) & (shift > -1.5)).all(), shift
    assert torch.allclose(fast.std(dim=(0, 2, 3)), exact.std(dim=(0, 2, 3)), atol=0.5 * level)
    def gray(views: torch.Tensor) -> torch.Tensor:  # (N,) whether a view's channels are equal before normalising
        raw = views * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
        return ((raw.amax(dim=1) - raw.amin(dim=1)) < 1e-4).flatten(1).all(dim=1)

    assert torch.equal(gray(fast), gray(exact)) and gray(fast).any()
    # a view depends on its own parameters only: the same with different batch-mates
    again = u8.photometric_uint8(crops[7:9].contiguous(), params.rows(slice(7, 9)), k, mean, std)
    assert torch.equal(again, fast[7:9])


def test_the_crop_boxes_follow_torchvisions_scale_and_aspect_histograms():
    n, height, width, scale = 20000, 375, 500, (0.05, 0.3)
    u = np.random.default_rng(0).random((n, 22))
    top, left, h, w = sample_boxes(u, np.full(n, height), np.full(n, width), scale).T
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])
    for mine, ref, bins in [(h * w / (height * width), theirs[:, 2] * theirs[:, 3] / (height * width),
                             np.linspace(0.04, 0.31, 10)),
                            (np.log(w / h), np.log(theirs[:, 3] / theirs[:, 2]),
                             np.linspace(math.log(3 / 4) - 0.02, math.log(4 / 3) + 0.02, 10))]:
        a, _ = np.histogram(mine, bins)
        b, _ = np.histogram(ref, bins)
        assert np.abs(a / n - b / n).max() < 0.015, (a, b)  # 20,000 draws: a bin's sd is about 0.003


def test_the_choice_of_stage(monkeypatch):
    assert u8.uses_uint8("auto") and u8.uses_uint8("uint8") and not u8.uses_uint8("float")
    monkeypatch.setitem(sys.modules, "cv2", None)  # OpenCV not installed
    assert not u8.uses_uint8("auto")
    with pytest.raises(ConfigError, match="pip install opencv-python-headless"):
        u8.uses_uint8("uint8")
    with pytest.raises(ConfigError, match="data.cpu_photometric='fast' is not allowed"):
        u8.uses_uint8("fast")
