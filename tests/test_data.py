"""msn.data: datasets, the multi-crop views (against torchvision's formulas), determinism, sampler, loader."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.transforms.v2 import functional as TF

from msn.config import DataConfig
from msn.data.crops import dense_resize_is_cheap, resized_crops, resized_crops_dense, resized_crops_loop, sample_boxes
from msn.data.loader import EpochSampler, MultiCropDataset, RunSampler, build_loader, collate_views, steps_per_epoch
from msn.data.multicrop import MultiCropTransform, ViewGroup, device_views
from msn.data.photometric import (
    PhotometricParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    grayscale,
    photometric,
)
from msn.data.registry import build_dataset
from msn.data.sources.digits import DigitsDataset
from msn.data.sources.folder import ImageFolderDataset
from msn.data.sources.synthetic import SyntheticDataset
from msn.errors import ConfigError, DataError
from msn.utils.seeding import stream_generator

# The float photometric stage (the GPU's, and the CPU's with data.cpu_photometric=float), compared here with
# torchvision's float functions; the 8-bit CPU stage has its own tests (tests/test_photometric_uint8.py).
DIGITS = DataConfig(name="digits", image_size=32, global_size=32, focal_size=16, num_focal=6, batch_size=128,
                    cpu_photometric="float")
LARGE = DataConfig(name="synthetic", image_size=256, synthetic_size=4, global_size=224, focal_size=96, num_focal=10,
                   cpu_photometric="float")
SMALL = DataConfig(name="synthetic", image_size=24, synthetic_size=24, global_size=16, focal_size=8, num_focal=2,
                   batch_size=4, cpu_photometric="float")
NO_AUG = dict(hflip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _rgb(seed: int, size: tuple[int, int] = (20, 16)) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """ImageFolder layout: two classes, mixed formats and modes, plus a file that is not an image."""
    root = tmp_path / "images"
    _save(root / "cat" / "b.jpg", _rgb(0))
    _save(root / "cat" / "a.PNG", _rgb(1))
    _save(root / "cat" / "deep" / "c.bmp", _rgb(2))
    _save(root / "dog" / "gray.png", Image.fromarray(np.full((12, 10), 77, np.uint8)))  # mode L
    _save(root / "dog" / "rgba.png", Image.new("RGBA", (9, 11), (10, 200, 30, 128)))
    _save(root / "dog" / "palette.png", _rgb(3).convert("P"))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def digits() -> DigitsDataset:
    return DigitsDataset(32)


# ---------------------------------------------------------------------------------------------------- datasets


def test_image_folder_layout_modes_and_labels(folder: Path) -> None:
    ds = ImageFolderDataset(folder)
    rel = [p.relative_to(folder).as_posix() for p in ds.paths]
    assert rel == ["cat/a.PNG", "cat/b.jpg", "cat/deep/c.bmp", "dog/gray.png", "dog/palette.png", "dog/rgba.png"]
    assert ds.classes == ["cat", "dog"]
    assert ds.targets == [0, 0, 0, 1, 1, 1] and ds.label(4) == 1
    for i in range(len(ds)):
        assert ds[i].mode == "RGB"
    assert ds[3].size == (10, 12) and ds[3].getpixel((0, 0)) == (77, 77, 77)
    assert ds[5].getpixel((0, 0)) == (10, 200, 30)


def test_flat_folder_is_recursive_and_unlabelled(tmp_path: Path) -> None:
    _save(tmp_path / "x.webp", _rgb(0))
    _save(tmp_path / "y.TIFF", _rgb(1))
    (tmp_path / "readme.md").write_text("hi")
    ds = ImageFolderDataset(tmp_path)
    assert [p.name for p in ds.paths] == ["x.webp", "y.TIFF"]
    assert ds.targets == [-1, -1] and ds.classes == []
    assert np.array_equal(np.asarray(ds[1]), np.asarray(_rgb(1)))  # TIFF is lossless


def test_missing_root_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.root=.*nowhere does not exist; pass data.root="):
        ImageFolderDataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="data.root is not set"):
        ImageFolderDataset(None)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(DataConfig(name="folder", root=str(tmp_path / "nowhere")))


def test_corrupt_and_truncated_images_fail_naming_the_file(folder: Path) -> None:
    (folder / "cat" / "zz_garbage.jpg").write_bytes(b"definitely not a jpeg")
    good = (folder / "cat" / "a.PNG").read_bytes()
    (folder / "dog" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    ds = ImageFolderDataset(folder)  # listing does not decode
    for name in ("zz_garbage.jpg", "zz_truncated.png"):
        index = [p.name for p in ds.paths].index(name)
        with pytest.raises(DataError, match=f"cannot read image .*{name}"):
            ds[index]


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """16-bit grayscale PNGs (PIL mode I;16) and float TIFFs become 8 bits by scaling (PIL would clip at 255)."""
    (tmp_path / "a").mkdir()
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "a" / "deep.png")
    floats = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(floats).save(tmp_path / "a" / "float.tif")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "a" / "plain.png")
    ds = ImageFolderDataset(tmp_path)
    by_name = {p.name: np.asarray(ds[i]) for i, p in enumerate(ds.paths)}
    assert Image.open(tmp_path / "a" / "deep.png").mode.startswith("I")
    deep = by_name["deep.png"]
    assert deep.dtype == np.uint8 and deep.shape == (64, 64, 3)
    np.testing.assert_array_equal(deep[..., 0], np.rint(ramp * (255 / 65535)).astype(np.uint8))
    assert (deep == 255).mean() < 0.01  # clipping saturated 99.6 % of such pixels
    np.testing.assert_array_equal(by_name["float.tif"][..., 1], np.rint(floats * 255).astype(np.uint8))
    np.testing.assert_array_equal(by_name["plain.png"][..., 2], (ramp >> 8).astype(np.uint8))  # 8-bit: as is


def test_list_file_restricts_exactly(folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "subset.txt"
    listing.write_text("# a comment\n\ndog/rgba.png 1\ncat/b.jpg\n  cat/deep/c.bmp  extra tokens\ncat/b.jpg\n")
    ds = ImageFolderDataset(folder, listing)
    assert [p.relative_to(folder).as_posix() for p in ds.paths] == ["cat/b.jpg", "cat/deep/c.bmp", "dog/rgba.png"]
    assert ds.targets == [0, 0, 1]  # class indices of the full folder
    cfg = DataConfig(name="folder", root=str(folder), list_file=str(listing))
    assert len(build_dataset(cfg)) == 3


def test_list_file_errors(folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "subset.txt"
    listing.write_text("cat/b.jpg\ncat/missing.jpg\n")
    with pytest.raises(DataError, match=r"line 2 names cat/missing.jpg"):
        ImageFolderDataset(folder, listing)
    with pytest.raises(DataError, match=r"data.list_file=.*nope.txt does not exist"):
        ImageFolderDataset(folder, tmp_path / "nope.txt")
    listing.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="lists no image paths"):
        ImageFolderDataset(folder, listing)


def test_digits_dataset(digits: DigitsDataset) -> None:
    assert len(digits) == 1797
    assert sorted(set(digits.targets)) == list(range(10)) and len(digits.classes) == 10
    image = digits[0]
    assert image.mode == "RGB" and image.size == (32, 32)
    array = np.asarray(image)
    assert array.max() > 200 and array.min() < 10  # scaled from 0..16 to 0..255
    assert np.array_equal(array[..., 0], array[..., 2])  # gray replicated


def test_synthetic_dataset_is_deterministic() -> None:
    a, b = SyntheticDataset(5, 24, seed=0), SyntheticDataset(5, 24, seed=0)
    assert np.array_equal(np.asarray(a[3]), np.asarray(b[3]))
    assert not np.array_equal(np.asarray(a[3]), np.asarray(a[4]))
    assert not np.array_equal(np.asarray(a[3]), np.asarray(SyntheticDataset(5, 24, seed=1)[3]))
    assert a[0].size == (24, 24) and a[0].mode == "RGB"
    assert a.targets == b.targets and set(a.targets) <= {0, 1, 2, 3}
    with pytest.raises(IndexError):
        a[5]


def test_build_dataset_by_name() -> None:
    assert isinstance(build_dataset(SMALL), SyntheticDataset) and len(build_dataset(SMALL)) == 24
    with pytest.raises(ConfigError, match="data.name='imagenet' is not a registered data source"):
        build_dataset(replace(SMALL, name="imagenet"))


# ---------------------------------------------------------------------------------------------------- operations


def _images(n: int, size: int = 11, seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.5  # a gray view (hue undefined)
    x[1, :, 0, 0] = torch.tensor([1.0, 1.0, 0.2])  # ties for the maximum
    return x


@pytest.mark.parametrize(("ours", "theirs", "low", "high"), [
    (adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
    (adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
    (adjust_saturation, TF.adjust_saturation, 0.2, 1.8),
    (adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_color_ops_match_torchvision(ours, theirs, low, high) -> None:
    x = _images(12)
    factors = torch.linspace(low, high, 12)
    expected = torch.stack([theirs(x[i], float(factors[i])) for i in range(12)])
    torch.testing.assert_close(ours(x, factors), expected, atol=2e-6, rtol=0)


def test_grayscale_matches_torchvision() -> None:
    x = _images(3)
    torch.testing.assert_close(grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_color_jitter_applies_each_views_order() -> None:
    n = 24
    x = _images(n)
    g = torch.Generator().manual_seed(1)
    factors = torch.rand(n, 4, generator=g) * 1.2 + 0.4
    factors[:, 3] = torch.rand(n, generator=g) - 0.5
    order = np.stack([np.random.default_rng(i).permutation(4) for i in range(n)])
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for i in range(n):
        y = x[i]
        for op_id in order[i]:
            y = ops[op_id](y, float(factors[i, op_id]))
        expected.append(y)
    torch.testing.assert_close(color_jitter(x, factors, order), torch.stack(expected), atol=5e-6, rtol=0)


@pytest.mark.parametrize("size", [4, 16, 40])
def test_gaussian_blur_matches_torchvision(size: int) -> None:
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    k = blur_kernel_size(2.0, size)
    expected = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(s)] * 2) for i, s in enumerate(sigma)])
    torch.testing.assert_close(gaussian_blur(x, sigma, k), expected, atol=1e-5, rtol=0)


def test_blur_kernel_size_is_odd_and_fits_small_views() -> None:
    assert blur_kernel_size(2.0, 224) == 13 and blur_kernel_size(2.0, 16) == 13
    assert blur_kernel_size(2.0, 4) == 7 and blur_kernel_size(1.0, 4) == 7 and blur_kernel_size(0.5, 32) == 5
    assert blur_kernel_size(2.0, 1) == 1


@pytest.mark.parametrize("image_size", [(30, 30), (23, 37)])
def test_resize_paths_match_torchvision_resized_crop(image_size: tuple[int, int]) -> None:
    h, w = image_size
    images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    boxes = np.array([[0, 0, h, w], [3, 5, 7, 9], [2, 1, 20, 18], [h - 4, w - 3, 4, 3]])  # 2 views per image
    for size in (5, 16):
        expected = torch.stack([TF.resized_crop(images[i // 2], *boxes[i].tolist(), [size, size], antialias=True)
                                for i in range(4)])
        torch.testing.assert_close(resized_crops_dense(images, boxes, size), expected, atol=2e-6, rtol=0)
        loop = torch.cat([resized_crops_loop(images[i], boxes[2 * i:2 * i + 2], size) for i in range(2)])
        torch.testing.assert_close(loop, expected, atol=2e-6, rtol=0)
        # uint8 images: torch's uint8 resize, torchvision's uint8 path exactly; the dense path to one level
        as_uint8 = (images * 255).round().byte()
        expected8 = torch.stack([TF.resized_crop(as_uint8[i // 2], *boxes[i].tolist(), [size, size], antialias=True)
                                 for i in range(4)])
        assert torch.equal(resized_crops_loop(as_uint8[0], boxes[:2], size), expected8[:2])
        view_major = np.array([0, 2, 1, 3])  # resized_crops takes boxes view-major: row v * B + b
        crops = resized_crops(list(as_uint8), boxes[view_major], np.zeros(4, bool), 2, size)
        assert crops.dtype == torch.uint8
        assert (crops.int() - expected8[view_major].int()).abs().max() <= 1
    assert dense_resize_is_cheap(32, 32, 32) and not dense_resize_is_cheap(256, 256, 224)


def test_sample_boxes_follow_random_resized_crop() -> None:
    n, scale = 4000, (0.05, 0.3)
    u = np.random.default_rng(0).random((n, 22))
    height, width = np.full(n, 40), np.full(n, 60)
    top, left, h, w = sample_boxes(u, height, width, scale).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 60).all()
    area = h * w / 2400
    assert area.min() > 0.03 and area.max() < 0.34  # scale range, up to rounding
    assert np.log(w / h).min() > math.log(3 / 4) - 0.2 and np.log(w / h).max() < math.log(4 / 3) + 0.2
    assert top.max() > 25 and left.max() > 40  # positions spread over the image
    # nothing fits a 2x200 strip: torchvision's fallback, the centre crop at the nearest allowed ratio
    box = sample_boxes(u[:3], np.full(3, 2), np.full(3, 200), (0.9, 1.0))
    assert box.tolist() == [[0, 98, 2, 3]] * 3


def test_view_parameters_follow_the_configured_distributions() -> None:
    cfg = replace(SMALL, hflip_p=0.3, color_jitter_p=0.8, grayscale_p=0.2, blur_p=0.6, color_jitter=0.5)
    group = MultiCropTransform(cfg).groups[1]  # the focal views
    n = 20000
    u = torch.rand(n, ViewGroup.num_uniforms, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = group.sample(u.numpy(), np.full(n, 24), np.full(n, 24))
    q = p.photometric
    for flags, prob in ((p.flip, 0.3), (q.jitter, 0.8), (q.gray, 0.2), (q.blur, 0.6)):
        assert abs(flags.mean() - prob) < 0.02
    low, high = q.factors.min(axis=0), q.factors.max(axis=0)
    np.testing.assert_allclose(low, [0.6, 0.6, 0.6, -0.1], atol=1e-3)
    np.testing.assert_allclose(high, [1.4, 1.4, 1.4, 0.1], atol=1e-3)
    assert q.sigma.min() >= 0.1 and q.sigma.max() <= 2.0 and q.sigma.max() > 1.99
    assert (np.sort(q.order, axis=1) == np.arange(4)).all() and len({tuple(o) for o in q.order}) == 24
    assert (q.order[:, 0] == 3).mean() == pytest.approx(0.25, abs=0.02)  # hue first in a quarter of views
    assert p.boxes[:, 2].max() <= 24 and (p.boxes[:, 2] * p.boxes[:, 3]).max() <= 0.3 * 24 * 24 * 1.2


# ---------------------------------------------------------------------------------------------------- views


def test_views_digits_config(digits: DigitsDataset) -> None:
    views = MultiCropTransform(DIGITS)(digits[7], torch.Generator().manual_seed(0))
    assert len(views) == 8
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)
    assert not torch.equal(views[0], views[1])  # target and anchor are independent crops


def test_views_large_config() -> None:
    image = SyntheticDataset(1, 256)[0]
    views = MultiCropTransform(LARGE)(image, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10
    assert all(torch.isfinite(v).all() for v in views)


@pytest.mark.parametrize("size", [16, 64])  # dense and per-view resize paths
def test_normalisation_without_augmentation_is_exact(size: int) -> None:
    cfg = replace(SMALL, global_size=size, global_scale=[1.0, 1.0], **NO_AUG)
    image = _rgb(5, (size, size))
    target = MultiCropTransform(cfg)(image)[0]
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(target, (pixels - mean) / std, atol=1e-5, rtol=0)


def test_normalisation_uses_per_channel_mean_and_std() -> None:
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.4, 0.8]
    cfg = replace(SMALL, image_size=16, global_scale=[1.0, 1.0], mean=mean, std=std, **NO_AUG)
    base = SyntheticDataset(16, 16)
    transform = MultiCropTransform(cfg)
    views = torch.stack([transform(base[i])[0] for i in range(16)])  # (16, 3, 16, 16) whole-image targets
    raw = torch.stack([torch.from_numpy(np.asarray(base[i]).copy()) for i in range(16)]).float() / 255
    expected = (raw.mean(dim=(0, 1, 2)) - torch.tensor(mean)) / torch.tensor(std)  # per channel
    torch.testing.assert_close(views.mean(dim=(0, 2, 3)), expected, atol=1e-4, rtol=0)
    low, high = (0 - torch.tensor(mean)) / torch.tensor(std), (1 - torch.tensor(mean)) / torch.tensor(std)
    assert (views >= low.view(3, 1, 1) - 1e-5).all() and (views <= high.view(3, 1, 1) + 1e-5).all()


@pytest.mark.parametrize("aug", ["hflip_p", "grayscale_p", "blur_p", "color_jitter_p"])
def test_each_augmentation_obeys_its_probability(aug: str) -> None:
    cfg = replace(SMALL, global_scale=[1.0, 1.0], mean=[0.0] * 3, std=[1.0] * 3, **NO_AUG)
    image = _rgb(6, (16, 16))
    plain = MultiCropTransform(cfg)(image)[0]
    views = MultiCropTransform(replace(cfg, **{aug: 1.0}))(image, torch.Generator().manual_seed(0))
    target = views[0]
    if aug == "hflip_p":
        torch.testing.assert_close(target, plain.flip(-1))
    elif aug == "grayscale_p":
        torch.testing.assert_close(target, TF.rgb_to_grayscale(plain, num_output_channels=3), atol=1e-6, rtol=0)
    else:
        assert (target - plain).abs().max() > 1e-3
        assert target.min() >= 0 and target.max() <= 1


def test_rejects_bad_inputs() -> None:
    with pytest.raises(DataError, match="color_jitter"):
        MultiCropTransform(replace(SMALL, color_jitter=3.0))
    with pytest.raises(DataError, match="uint8"):
        MultiCropTransform(SMALL)(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match=r"\(epoch, index\)"):
        MultiCropDataset(SyntheticDataset(2, 8), MultiCropTransform(SMALL))[0]


# ---------------------------------------------------------------------------------------------------- determinism


def _equal(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    """Same number of batches / samples, every tensor bit for bit equal."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        return False
    return all(torch.equal(u, v) for x, y in zip(a, b, strict=True) for u, v in zip(x, y, strict=True))


def test_views_are_a_pure_function_of_seed_epoch_index(digits: DigitsDataset) -> None:
    ds = MultiCropDataset(digits, MultiCropTransform(DIGITS), seed=3)
    state = torch.get_rng_state()
    first = ds[(2, 10)]
    torch.manual_seed(123)  # the global RNG plays no part
    assert _equal([first], [ds[(2, 10)]])
    torch.set_rng_state(state)
    ds[(0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    assert not torch.equal(first[0], ds[(3, 10)][0])  # another epoch
    other_seed = MultiCropDataset(digits, MultiCropTransform(DIGITS), seed=4)
    assert not torch.equal(first[0], other_seed[(2, 10)][0])


@pytest.mark.parametrize("cfg", [DIGITS, replace(LARGE, image_size=72, global_size=64, focal_size=32)],
                         ids=["dense-resize", "per-view-resize"])
def test_batched_equals_single_and_any_order(cfg: DataConfig) -> None:
    base = build_dataset(replace(cfg, synthetic_size=12))
    ds = MultiCropDataset(base, MultiCropTransform(cfg), seed=0)
    keys = [(1, i) for i in range(12)]
    batch = ds.__getitems__(keys).per_image()
    assert _equal(batch, [ds[k] for k in keys])
    assert _equal(batch, ds.__getitems__(keys[::-1]).per_image()[::-1])


def test_pipeline_runs_single_threaded_and_restores_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import msn.data.crops
    import msn.data.multicrop

    seen = []
    for module, name in ((msn.data.crops, "same_size_groups"), (msn.data.multicrop, "photometric")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: seen.append((_n, torch.get_num_threads()))
                            or _f(*a))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        MultiCropTransform(SMALL)(_rgb(0))
        assert seen == [("same_size_groups", 1), ("same_size_groups", 1), ("photometric", 1), ("photometric", 1)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_loader_views_do_not_depend_on_num_workers() -> None:
    base = SyntheticDataset(24, 24)

    def epochs(workers: int) -> list[list[torch.Tensor]]:
        cfg = replace(SMALL, num_workers=workers)
        sampler = EpochSampler(len(base), seed=1)
        loader = build_loader(cfg, MultiCropDataset(base, MultiCropTransform(cfg), seed=1), sampler)
        assert loader.persistent_workers == (workers > 0) and not loader.pin_memory
        out = []
        for epoch in range(2):  # persistent workers still see set_epoch
            sampler.set_epoch(epoch)
            out.extend(batch.views() for batch in loader)
        return out

    serial, parallel = epochs(0), epochs(2)
    assert len(serial) == 2 * 6
    assert [tuple(v.shape) for v in serial[0]] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    assert _equal(serial, parallel)
    assert not torch.equal(serial[0][0], serial[6][0])  # epochs differ


# ---------------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("n", [10, 11])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_matches_distributed_sampler(n: int, drop_last: bool, shuffle: bool) -> None:
    shares = []
    for rank in range(3):
        ours = EpochSampler(n, num_replicas=3, rank=rank, shuffle=shuffle, seed=5, drop_last=drop_last)
        ours.set_epoch(4)
        keys = list(ours)
        assert len(ours) == len(keys) and all(e == 4 for e, _ in keys)
        if not shuffle:  # the same partition, padding and dropping rule as DistributedSampler
            theirs = DistributedSampler(range(n), num_replicas=3, rank=rank, shuffle=False, drop_last=drop_last)
            assert keys == [(4, i) for i in theirs]
        else:  # the order is the "order" stream's permutation (not DistributedSampler's seed + epoch)
            order = torch.randperm(n, generator=stream_generator(5, "order", 4)).tolist()
            assert [i for _, i in keys] == [order[j % n] for j in range(rank, 3 * len(ours), 3)]
        shares.append([i for _, i in keys])
    flat = [i for share in shares for i in share]
    if drop_last:  # disjoint, and only the remainder n % 3 is dropped
        assert len(set(flat)) == len(flat) == n - n % 3
    else:  # every image, padded to a multiple of 3
        assert set(flat) == set(range(n)) and len(flat) == 3 * math.ceil(n / 3)


def test_random_streams_do_not_collide_across_seeds() -> None:
    """seed + epoch made seed 1's order seed 0's order one epoch later; hashed keys do not."""
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochSampler(40, seed=seed)
        sampler.set_epoch(epoch)
        return [i for _, i in sampler]

    assert order(1, 0) != order(0, 1)
    from msn.models.masking import MaskGenerator

    masks = [MaskGenerator(0.5, True, False, 8, seed)(step, 4, anchor_size=32).anchor_keep
             for seed, step in ((1, 0), (0, 1))]
    assert not torch.equal(masks[0], masks[1])


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    a, b = EpochSampler(50, seed=0), EpochSampler(50, seed=0)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert [i for _, i in a] != [i for _, i in b]
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, num_replicas=2, rank=2)


class _CountingDataset(SyntheticDataset):
    def __init__(self) -> None:
        super().__init__(26, 24)
        self.loaded: list[int] = []

    def __getitem__(self, index: int) -> Image.Image:
        self.loaded.append(index)
        return super().__getitem__(index)


def test_set_start_skips_batches_without_loading_them() -> None:
    base = _CountingDataset()
    sampler = EpochSampler(len(base), seed=0)
    loader = build_loader(SMALL, MultiCropDataset(base, MultiCropTransform(SMALL)), sampler)
    sampler.set_epoch(3)
    full = [batch.views() for batch in loader]
    assert len(full) == len(loader) == 6  # 26 images, batch 4, drop_last
    base.loaded.clear()
    sampler.set_epoch(3)
    sampler.set_start(4, SMALL.batch_size)
    assert len(loader) == 2
    tail = [batch.views() for batch in loader]
    assert _equal(tail, full[4:])
    reference = EpochSampler(len(base), seed=0)
    reference.set_epoch(3)
    order = [i for _, i in reference]
    assert base.loaded == order[16:24]  # only the images of batches 4 and 5 were read
    sampler.set_epoch(4)  # a new epoch starts at its beginning
    assert len(loader) == 6


# ---------------------------------------------------------------------------------------------------- steps


@pytest.mark.parametrize(("n", "batch", "world", "drop_last"), [
    (26, 4, 1, True), (26, 4, 1, False), (1797, 128, 1, True), (1797, 128, 3, True), (1797, 128, 3, False),
    (10, 4, 2, True), (5, 4, 2, False),
])
def test_steps_per_epoch_matches_len_loader(n: int, batch: int, world: int, drop_last: bool) -> None:
    cfg = replace(SMALL, batch_size=batch, drop_last=drop_last)
    dataset = MultiCropDataset(SyntheticDataset(n, 8), MultiCropTransform(cfg))
    steps = steps_per_epoch(n, cfg, world)
    for rank in range(world):
        loader = build_loader(cfg, dataset, EpochSampler(n, world, rank, drop_last=drop_last))
        assert len(loader) == steps


def test_steps_per_epoch_rejects_an_empty_epoch() -> None:
    with pytest.raises(DataError, match=r"data.batch_size=128 .*dataset size 100, 1 process\)"):
        steps_per_epoch(100, replace(SMALL, batch_size=128), 1)
    with pytest.raises(DataError, match=r"=64 .*50 images per process \(dataset size 100, 2 processes\)"):
        steps_per_epoch(100, replace(SMALL, batch_size=64), 2)
    assert steps_per_epoch(100, replace(SMALL, batch_size=128, drop_last=False), 1) == 1


def test_default_config_builds_the_pipeline() -> None:
    from tests.conftest import compose_config

    cfg = compose_config()
    ds = MultiCropDataset(build_dataset(cfg.data), MultiCropTransform(cfg.data), seed=cfg.seed)
    views = ds[(0, 0)]
    assert len(views) == 2 + cfg.data.num_focal
    assert views[0].shape[-1] == cfg.data.global_size and views[-1].shape[-1] == cfg.data.focal_size


def test_undecodable_images_get_a_deterministic_replacement(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "9bad.jpg").write_bytes(b"not an image")
    base = ImageFolderDataset(tmp_path)
    bad = base.paths.index(tmp_path / "9bad.jpg")
    ds = MultiCropDataset(base, MultiCropTransform(SMALL), seed=3)
    keys = [(2, i) for i in range(len(base))]
    first, again = ds.__getitems__(keys), ds.__getitems__(keys[::-1])
    assert first.batch_size == len(base) and first.skipped == [str(tmp_path / "9bad.jpg")] and first.error is None
    assert _equal(first.per_image(), again.per_image()[::-1])  # the same replacement however the batch is made
    batch = collate_views(first)
    assert [tuple(v.shape) for v in batch.views()] == [(7, 3, 16, 16)] * 2 + [(7, 3, 8, 8)] * 2
    assert batch.skipped == first.skipped
    # Another epoch may draw another replacement, but always a readable image, and the same one each time.
    assert ds.__getitems__([(5, bad)]).skipped == [str(tmp_path / "9bad.jpg")]
    assert _equal([ds[(5, bad)]], [ds[(5, bad)]])


# ---------------------------------------------------------------------------------------------------- two stages


def test_photometric_stage_matches_torchvision_view_by_view() -> None:
    n = 16
    crops = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    params = PhotometricParams(jitter=rng.random(n) < 0.7, factors=np.c_[rng.uniform(0.6, 1.4, (n, 3)),
                                                                        rng.uniform(-0.1, 0.1, n)].astype(np.float32),
                               order=np.stack([rng.permutation(4) for _ in range(n)]), gray=rng.random(n) < 0.3,
                               blur=rng.random(n) < 0.5, sigma=rng.uniform(0.1, 2.0, n).astype(np.float32))
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    k = blur_kernel_size(2.0, 12)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for i in range(n):
        y = crops[i].float() / 255
        if params.jitter[i]:
            for op_id in params.order[i]:
                y = ops[op_id](y, float(params.factors[i, op_id]))
        if params.gray[i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if params.blur[i]:
            y = TF.gaussian_blur(y, [k, k], [float(params.sigma[i])] * 2)
        expected.append(TF.normalize(y, mean.tolist(), std.tolist()))
    assert params.jitter.any() and params.gray.any() and params.blur.any() and not params.blur.all()
    torch.testing.assert_close(photometric(crops, params, k, mean, std), torch.stack(expected), atol=5e-5, rtol=0)


def test_device_path_gives_the_workers_views(digits: DigitsDataset) -> None:
    """augment_on=device: workers crop, the training process finishes; on a CPU the same bits."""
    transform = MultiCropTransform(DIGITS)
    keys = [(4, i) for i in range(0, 60, 3)]
    in_workers = MultiCropDataset(digits, transform, seed=2).__getitems__(keys)
    crops_only = MultiCropDataset(digits, transform, seed=2, finish=False).__getitems__(keys)
    assert not in_workers.pending and crops_only.pending
    assert [g.dtype for g in crops_only.groups] == [torch.uint8] * 2
    on_device = device_views(crops_only, transform, torch.device("cpu"))
    assert _equal([on_device], [in_workers.views()])
    assert all(v.is_contiguous() for v in on_device) and [tuple(v.shape) for v in on_device] == \
        [(20, 3, 32, 32)] * 2 + [(20, 3, 16, 16)] * 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_path_on_the_gpu_matches_the_cpu(digits: DigitsDataset) -> None:
    cfg = replace(LARGE, synthetic_size=8)  # the float stage, which the GPU runs
    base, transform = build_dataset(cfg), MultiCropTransform(cfg)
    keys = [(0, i) for i in range(8)]
    cpu = MultiCropDataset(base, transform, seed=1).__getitems__(keys).views()
    crops = MultiCropDataset(base, transform, seed=1, finish=False).__getitems__(keys).pin_memory()
    gpu = device_views(crops, transform, torch.device("cuda"))
    assert all(v.device.type == "cuda" for v in gpu)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)


def test_augment_on_resolves_by_device() -> None:
    from msn.data.multicrop import augment_in_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert augment_in_workers("auto", cpu) and not augment_in_workers("auto", gpu)
    assert augment_in_workers("cpu", gpu) and not augment_in_workers("device", cpu)
    with pytest.raises(DataError, match="augment_on"):
        augment_in_workers("gpu", cpu)


# ---------------------------------------------------------------------------------------------------- run sampler


@pytest.mark.parametrize("drop_last", [True, False])
def test_run_sampler_chains_the_epochs_and_resumes_at_any_step(drop_last: bool) -> None:
    n, batch = 10, 3
    order = EpochSampler(n, seed=5, drop_last=drop_last)
    steps = steps_per_epoch(n, replace(SMALL, batch_size=batch, drop_last=drop_last))
    expected = []  # what the epoch-by-epoch loop gives
    for epoch in range(4):
        order.set_epoch(epoch)
        keys = list(order)
        expected += [keys[i:i + batch] for i in range(0, steps * batch, batch)]
    run = RunSampler(EpochSampler(n, seed=5, drop_last=drop_last), batch, drop_last)
    assert run.steps_per_epoch == steps == (3 if drop_last else 4)
    stream = iter(run)
    assert [next(stream) for _ in range(4 * steps)] == expected
    for start in (1, steps, steps + 2):
        resumed = iter(RunSampler(EpochSampler(n, seed=5, drop_last=drop_last), batch, drop_last, start))
        assert [next(resumed) for _ in range(4 * steps - start)] == expected[start:]


def test_one_loader_iterator_runs_across_epochs_with_workers() -> None:
    """The run's loader does not restart at epoch boundaries, and gives the keyed views for any workers."""
    base = _CountingDataset()  # 26 images: 6 batches of 4 an epoch
    cfg = replace(SMALL, num_workers=2)
    sampler = RunSampler(EpochSampler(len(base), seed=0), cfg.batch_size, start_step=4)
    loader = build_loader(cfg, MultiCropDataset(base, MultiCropTransform(cfg), seed=0), sampler)
    batches = []
    for batch in loader:  # steps 4..13: through the end of epoch 0, all of epoch 1, into epoch 2
        batches.append(batch.views())
        if len(batches) == 10:
            break
    reference = EpochSampler(len(base), seed=0)
    ds = MultiCropDataset(base, MultiCropTransform(SMALL), seed=0)
    keyed = []
    for epoch in range(3):
        reference.set_epoch(epoch)
        keys = list(reference)
        keyed += [ds.__getitems__(keys[i:i + 4]).views() for i in range(0, 24, 4)]
    assert _equal(batches, keyed[4:14])


# ---------------------------------------------------------------------------------------------------- fashion-mnist


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def tiny_fashion_mnist(root: Path, compress: bool = True, n_train: int = 20, n_test: int = 10) -> Path:
    """The four idx files of a made-up Fashion-MNIST: image i is uniform gray level 10 * i, label i % 10."""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.stack([np.full((28, 28), 10 * i % 256) for i in range(n)])
        images[:, 0, 0] = 255  # one bright corner pixel: orientation is kept
        _write_idx(root / f"{split}-images-idx3-ubyte", images, compress)
        _write_idx(root / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    return root


@pytest.mark.parametrize("layout", ["debian-gz", "torchvision-raw"])
def test_fashion_mnist_reads_the_idx_files(tmp_path: Path, layout: str) -> None:
    from msn.data.sources.fashion_mnist import FashionMNISTDataset

    if layout == "debian-gz":
        root = tiny_fashion_mnist(tmp_path / "fmnist")
    else:  # torchvision's layout: ROOT/FashionMNIST/raw, uncompressed files
        tiny_fashion_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", compress=False)
        root = tmp_path / "tv"
    train, test = FashionMNISTDataset(root, "train"), FashionMNISTDataset(root, "test")
    assert len(train) == 20 and len(test) == 10 and train.targets[:12] == [*range(10), 0, 1]
    image = train[3]
    assert image.mode == "RGB" and image.size == (28, 28)
    pixels = np.asarray(image)
    assert pixels[0, 0].tolist() == [255] * 3 and pixels[5, 7].tolist() == [30] * 3
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert FashionMNISTDataset(root, "train", image_size=32)[3].size == (32, 32)
    cfg = replace(SMALL, name="fashion_mnist", root=str(root), image_size=28)
    assert len(build_dataset(cfg)) == 20


def test_fashion_mnist_missing_or_broken_is_one_clear_error(tmp_path: Path) -> None:
    from msn.data.sources.fashion_mnist import FashionMNISTDataset

    with pytest.raises(DataError, match=r"Fashion-MNIST is not in data.root=.*apt-get install dataset-fashion-mnist"):
        FashionMNISTDataset(tmp_path)
    root = tiny_fashion_mnist(tmp_path / "broken")
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"cannot read .*train-images-idx3-ubyte.gz"):
        FashionMNISTDataset(root)
    with pytest.raises(DataError, match="split 'val'"):
        FashionMNISTDataset(root, "val")


def test_a_users_source_registered_before_the_first_lookup_overrides_a_builtin():
    """The built-ins register when the first entry does, so a user's module imported first still wins (a fresh
    interpreter: nothing has read the registry yet, as in a user's script)."""
    import subprocess
    import sys

    code = """
from msn.data import Source, get_source, register_source, source_names

@register_source
class Mine(Source):
    name = "synthetic"

    def build(self, cfg):
        return []

assert type(get_source("synthetic")) is Mine, type(get_source("synthetic"))
assert "digits" in source_names()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
