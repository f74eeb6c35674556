"""``data.decode_on=device``: the workers send the JPEGs' bytes, the training device decodes and cuts them.

Run here on the CPU (the device path runs on any device; torchvision's CPU decoder stands in for nvJPEG), on real
files: baseline, progressive, CMYK, grayscale and EXIF-rotated JPEGs, a PNG among them and a truncated JPEG. The
views must be the worker path's: the same uniforms (so the same boxes, flips and photometric parameters), the same
decoded pixels, and crops within one level of 255 (the two resize kernels round differently), the same skipped
images; what went to the CPU is counted and said. Exact resume after kill -9 with decode_on=device and 2 workers is
in tests/test_sources.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from msn.config import DataConfig
from msn.config.checks import validate
from msn.data.crops import resized_crops_padded
from msn.data.device_decode import DeviceDecoder, EncodedBatch, decode_jpegs, decode_on_device, device_jpeg, orient
from msn.data.images import load_rgb
from msn.data.loader import MultiCropDataset
from msn.data.multicrop import MultiCropTransform, ViewGroup
from msn.data.registry import build_dataset
from msn.errors import ConfigError, DataError
from msn.train import train
from tests.conftest import compose_config

CPU = torch.device("cpu")


def _photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth colour gradients with noise: JPEG-like content whose resampling differences are realistic."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 17.0 + c) * 100 + np.cos(y / 23.0 * (c + 1)) * 60 + 128 for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> Path:
    """12 files in one class folder: 6 baseline JPEGs of different sizes, a progressive, a CMYK, a grayscale and an
    EXIF-rotated (orientation 6) JPEG, a PNG and a JPEG cut in half."""
    root = tmp_path_factory.mktemp("kinds")
    folder = root / "a"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        _photo(rng, 180 + 10 * i, 240 - 7 * i).save(folder / f"plain{i}.jpg", quality=90)
    _photo(rng, 200, 150).save(folder / "progressive.jpg", progressive=True, quality=85)
    _photo(rng, 160, 220).convert("CMYK").save(folder / "cmyk.jpg")
    _photo(rng, 170, 210).convert("L").save(folder / "gray.jpg")
    rotated = _photo(rng, 150, 230)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    _photo(rng, 190, 190).save(folder / "among.png")
    data = (folder / "plain0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[:len(data) // 2])
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return OmegaConf.structured(DataConfig(name="folder", root=str(root), global_size=64, focal_size=32, num_focal=4,
                                           **kw))


def _both_paths(root: Path) -> tuple[MultiCropDataset, MultiCropDataset, list[tuple[int, int]]]:
    cfg = _cfg(root)
    base, transform = build_dataset(cfg), MultiCropTransform(cfg)
    keys = [(0, i) for i in range(len(base))]
    return (MultiCropDataset(base, transform, seed=3, finish=False),
            MultiCropDataset(base, transform, seed=3, finish=False, decode=False), keys)


def test_the_device_path_cuts_the_views_the_workers_cut(kinds):
    workers, device, keys = _both_paths(kinds)
    names = [Path(p).name for p in workers.base.paths]
    cut = workers.__getitems__(keys)
    encoded = device.__getitems__(keys)
    assert isinstance(encoded, EncodedBatch)
    # only the bytes of the JPEGs the device takes travel; the PNG, the CMYK JPEG and the truncated one's
    # replacement were decoded in the worker
    on_cpu = sorted(names[i] for i, part in enumerate(encoded.parts) if part.shape is not None)
    assert on_cpu == ["among.png", "cmyk.jpg", "truncated.jpg"]
    for (epoch, index), u in zip(keys, encoded.uniforms.numpy(), strict=True):  # same draws: same boxes and flips
        assert np.array_equal(u, workers.transform.draw(workers.generator((epoch, index))))

    views = DeviceDecoder(device, CPU)(encoded)
    assert views.skipped == cut.skipped == [str(kinds / "a" / "truncated.jpg")]  # skipped, and replaced alike
    assert views.cpu_decoded == 3
    for mine, theirs in zip(views.groups, cut.groups, strict=True):
        assert mine.shape == theirs.shape and mine.dtype == torch.uint8
        diff = (mine.int() - theirs.int()).abs()
        # measured: at most 1 level, on about 13 % of the values (uint8 interpolate vs float matmul, rounded)
        assert diff.max() <= 1 and diff.float().mean() < 0.3, (diff.max(), diff.float().mean())
    for params_a, params_b in zip(views.params, cut.params, strict=True):
        assert np.array_equal(params_a.factors, params_b.factors) and np.array_equal(params_a.sigma, params_b.sigma)


def test_jpegs_decode_to_the_cpu_paths_pixels_in_every_orientation(kinds, tmp_path):
    """torchvision's decoder gives PIL's pixels, and :func:`orient` turns them upright as ``exif_transpose``."""
    image = _photo(np.random.default_rng(1), 30, 44)
    for orientation in range(1, 9):
        exif = image.getexif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        image.save(path, exif=exif, quality=95)
        encoded = device_jpeg(path.read_bytes())
        assert encoded is not None and encoded.orientation == orientation
        [decoded] = decode_jpegs([torch.frombuffer(bytearray(encoded.data), dtype=torch.uint8)], CPU)
        upright = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        assert torch.equal(orient(decoded, orientation), upright), orientation
    with Image.open(tmp_path / "o6.jpg") as stored:
        assert ImageOps.exif_transpose(stored).size == (30, 44)  # a real turn: width and height swap
    for name in ("cmyk.jpg", "among.png", "truncated.jpg"):
        assert device_jpeg((kinds / "a" / name).read_bytes()) is None
    assert device_jpeg(b"not an image at all") is None


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu_and_counted(kinds, monkeypatch):
    """A decoder that refuses one file (mocked: nvJPEG cannot run here) fails the batched call; every other file
    is still decoded on the device, the refused one with PIL in the training process, and the views are the same."""
    import torchvision.io

    workers, device, keys = _both_paths(kinds)
    refused = (kinds / "a" / "plain3.jpg").read_bytes()
    real = torchvision.io.decode_jpeg
    calls = []

    def picky(data, **kw):
        calls.append(len(data) if isinstance(data, list) else 1)
        files = data if isinstance(data, list) else [data]
        if any(bytes(f.numpy()) == refused for f in files):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    views = DeviceDecoder(device, CPU)(device.__getitems__(keys))
    assert calls[0] == 9 and calls[1:] == [1] * 9  # the batch, then file by file
    assert views.cpu_decoded == 4
    cut = workers.__getitems__(keys)
    for mine, theirs in zip(views.groups, cut.groups, strict=True):
        assert (mine.int() - theirs.int()).abs().max() <= 1


def test_padded_resizing_does_not_depend_on_how_the_batch_is_chunked():
    rng = np.random.default_rng(2)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in
              [(40, 50), (61, 33), (25, 70), (48, 48)]]
    transform = MultiCropTransform(OmegaConf.structured(DataConfig(global_size=16, focal_size=8, num_focal=2)))
    group = transform.groups[1]
    u = rng.random((group.count * len(images), ViewGroup.num_uniforms))
    params = group.sample(u, np.tile([i.shape[1] for i in images], group.count),
                          np.tile([i.shape[2] for i in images], group.count))
    whole = resized_crops_padded(images, params.boxes, params.flip, group.count, group.size)
    one_by_one = resized_crops_padded(images, params.boxes, params.flip, group.count, group.size, chunk_bytes=1)
    assert (whole.int() - one_by_one.int()).abs().max() <= 1


def test_decode_on_chooses_the_device_for_jpegs_on_a_gpu_only(kinds, tmp_path):
    base = build_dataset(_cfg(kinds))
    gpu = torch.device("cuda")  # only compared, never used: the choice is made before any CUDA call
    assert decode_on_device("auto", "auto", gpu, base)  # 9 of 12 files are JPEGs the device takes
    assert not decode_on_device("auto", "auto", CPU, base)
    assert not decode_on_device("auto", "cpu", gpu, base)  # the photometric stage stays in the workers
    assert decode_on_device("device", "auto", CPU, base) and not decode_on_device("cpu", "device", gpu, base)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(4):
        _photo(np.random.default_rng(i), 20, 20).save(pngs / f"{i}.png")
    assert not decode_on_device("auto", "auto", gpu, build_dataset(_cfg(pngs)))
    with pytest.raises(DataError, match="set data.augment_on=device"):
        decode_on_device("device", "cpu", gpu, base)
    with pytest.raises(ConfigError, match="data.decode_on=device cuts the views in the training process"):
        validate(compose_config(["data.decode_on=device", "data.augment_on=cpu"]))
    with pytest.raises(ConfigError, match="data.decode_on='gpu' is not allowed"):
        validate(compose_config(["data.decode_on=gpu"]))


def test_a_run_decoding_on_the_device_says_what_went_to_the_cpu(kinds, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    train(compose_config(["experiment=cpu_smoke", "logger.progress=false", "data=folder", f"data.root={kinds}",
                          "data.global_size=32", "data.focal_size=16", "data.num_focal=2", "data.batch_size=4",
                          "optim.max_steps=4", "data.decode_on=device", f"run_dir={tmp_path / 'run'}"]))
    said = caplog.text
    assert "images were decoded on the CPU (not JPEG, a CMYK or cut-short JPEG" in said
    assert "epoch 0: 3 of 12 images were decoded on the CPU (data.decode_on=device)" in said
    assert "skipped undecodable image" in said and "truncated.jpg" in said


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_device_path_cuts_the_views_the_workers_cut(kinds):
    """nvJPEG's inverse DCT and upsampling round differently from libjpeg's, so on a GPU the pixels agree to a
    few levels of 255 rather than to one; the boxes, the skipped image and what went to the CPU are the same."""
    workers, device, keys = _both_paths(kinds)
    cut = workers.__getitems__(keys)
    views = DeviceDecoder(device, torch.device("cuda"))(device.__getitems__(keys))
    assert views.skipped == cut.skipped and views.cpu_decoded >= 3
    for mine, theirs in zip(views.groups, cut.groups, strict=True):
        assert mine.device.type == "cuda" and mine.dtype == torch.uint8
        diff = (mine.cpu().int() - theirs.int()).abs().float()
        assert diff.mean() < 2 and diff.quantile(0.99) <= 8, (diff.mean(), diff.quantile(0.99), diff.max())


def test_the_pictures_of_a_run_decoding_on_the_device_show_its_views(kinds):
    """msn-viz views rebuilds the trainer's batch on the CPU: for a run with data.decode_on=device (and the photometric
    stage on the device) it decodes, cuts and finishes the batch itself, giving the worker path's views."""
    from msn.train.views import trainer_views

    common = ["experiment=cpu_smoke", "data=folder", f"data.root={kinds}", "data.global_size=32", "data.focal_size=16",
              "data.num_focal=2", "data.batch_size=4"]
    device = trainer_views(compose_config([*common, "data.decode_on=device", "data.augment_on=device"]), 1, 3)
    workers = trainer_views(compose_config([*common, "data.decode_on=cpu"]), 1, 3)
    assert device.keys == workers.keys
    for mine, theirs in zip(device.views, workers.views, strict=True):
        assert mine.dtype == torch.float32 and mine.shape == theirs.shape
        assert (mine - theirs).abs().mean() < 0.02  # the crops' 1-level rounding, through the same 8-bit stage


def test_the_loaders_jpeg_decoder_gives_pils_pixels(kinds):
    """simplejpeg (the loader's decoder of plain JPEGs) gives exactly PIL's upright pixels; the rest is left to PIL."""
    from msn.data.loader import fast_jpeg

    for path in sorted((kinds / "a").iterdir()):
        image = fast_jpeg(path.read_bytes())
        if path.name in ("cmyk.jpg", "among.png", "truncated.jpg"):
            assert image is None, path.name
        else:
            assert image is not None and torch.equal(image.permute(1, 2, 0),
                                                     torch.from_numpy(np.array(load_rgb(path)))), path.name
