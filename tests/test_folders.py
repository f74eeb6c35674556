"""Image folders as users really have them: symlinked folders and loops, files that are not images, and phone
photos stored sideways with an EXIF orientation. Every file here is real (links, JPEGs with EXIF, GIFs, text),
made in ``tmp_path``; nothing in a user's folder may change."""

from __future__ import annotations

import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from msn.config import DataConfig
from msn.data.crops import to_uint8_image
from msn.data.images import decode_rgb, load_rgb
from msn.data.loader import MultiCropDataset
from msn.data.multicrop import MultiCropTransform
from msn.data.registry import build_dataset
from msn.data.sources import folder as datasets_module
from msn.data.sources.folder import ImageFolderDataset
from msn.errors import DataError
from msn.eval import splits
from msn.eval.features import Encoder, TransformedImages
from msn.plots.attention import load_images

SMALL = DataConfig(name="folder", image_size=24, global_size=16, focal_size=8, num_focal=2, batch_size=2)
IMAGE_LIST = ".jpg .jpeg .png .bmp .webp .tif .tiff"


def _image(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _link(path: Path, target: str) -> None:
    """A real symlink at ``path`` whose target is written as given (relative, as users write them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def _snapshot(top: Path) -> list[tuple[str, str, int]]:
    """Every entry below ``top`` without following links: (path, link target or "", size), to check nothing
    was changed."""
    out = []
    for folder, dirs, files in os.walk(top):
        for name in sorted(dirs + files):
            p = Path(folder) / name
            out.append((str(p.relative_to(top)), os.readlink(p) if p.is_symlink() else "", p.lstat().st_size))
    return sorted(out)


def _rel(ds: ImageFolderDataset) -> list[str]:
    return [p.relative_to(ds.root).as_posix() for p in ds.paths]


# ---------------------------------------------------------------------------------------------------- links


def test_a_symlink_loop_and_duplicate_links_count_each_file_once(tmp_path: Path) -> None:
    """The issue's folder: a loop ``a/loop -> ..`` once made os.walk(followlinks=True) list every image ~10x."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for i, rel in enumerate(["a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.png"]):
        _image(root / rel, i)
    _image(outside / "5.jpg", 5)
    _image(outside / "6.jpg", 6)
    _link(root / "a" / "loop", "..")  # the loop
    _link(root / "c", "../outside")  # a linked sibling folder: legitimate, its images count (once)
    _link(root / "b" / "dup.jpg", "../a/1.jpg")  # a second path to an image already listed
    before = _snapshot(tmp_path)

    ds = ImageFolderDataset(root)
    assert _rel(ds) == ["a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.png", "c/5.jpg", "c/6.jpg"]
    assert ds.classes == ["a", "b", "c"] and ds.targets == [0, 0, 1, 1, 2, 2]
    assert ds.notes == [f"data.root={root}: skipped 1 symlink loop (a/loop -> ..) and 1 duplicate path to a file "
                        "already listed (b/dup.jpg -> ../a/1.jpg: already listed as a/1.jpg); each file counts once"]
    assert np.array_equal(np.asarray(ds[4]), np.asarray(load_rgb(outside / "5.jpg")))  # read through the link
    # what training builds from data.root, and what it iterates over
    cfg = replace(SMALL, root=str(root))
    base = build_dataset(cfg)
    assert len(base) == 6 and base.notes == ds.notes
    assert len(MultiCropDataset(base, MultiCropTransform(cfg))) == 6
    assert _snapshot(tmp_path) == before  # the user's folder is as it was


def test_a_folder_reached_twice_is_listed_once_and_loops_through_linked_folders_are_found(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _image(root / "a" / "1.jpg", 1)
    _image(root / "a" / "deep" / "2.jpg", 2)
    _image(outside / "3.jpg", 3)
    _link(root / "z_alias", "a")  # a second path to folder a
    _link(root / "c", "../outside")
    _link(outside / "up", "../root")  # back to data.root from outside it: a loop too

    ds = ImageFolderDataset(root)
    assert _rel(ds) == ["a/1.jpg", "a/deep/2.jpg", "c/3.jpg"]
    assert ds.notes == [f"data.root={root}: skipped 1 symlink loop (c/up -> ../root) and 1 duplicate folder "
                        "(z_alias -> a: already listed as a); each file counts once"]


def test_the_first_path_in_sorted_order_is_kept_for_a_file_reached_twice(tmp_path: Path) -> None:
    """Deterministic whichever path the file system lists first: the smallest relative path wins, even when it
    is the link (here ``0first.jpg`` sorts before the real ``a/2.jpg``)."""
    root = tmp_path / "root"
    _image(root / "a" / "1.jpg", 1)
    _image(root / "a" / "2.jpg", 2)
    _link(root / "0first.jpg", "a/2.jpg")
    _link(root / "a" / "3.jpg", "1.jpg")
    _link(root / "a" / "4.jpg", "1.jpg")
    _link(root / "b", "a")

    ds = ImageFolderDataset(root)
    assert _rel(ds) == ["0first.jpg", "a/1.jpg"]
    assert ds.notes == [f"data.root={root}: skipped 1 duplicate folder (b -> a: already listed as a) and 3 duplicate "
                        "paths to files already listed (a/2.jpg: already listed as 0first.jpg, a/3.jpg -> 1.jpg: "
                        "already listed as a/1.jpg, ...); each file counts once"]


def test_an_unreadable_folder_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, chmod cannot make a folder unreadable, so the refusal is the one os.scandir would raise."""
    root = tmp_path / "root"
    _image(root / "ok" / "1.png", 1)
    _image(root / "secret" / "2.png", 2)
    scandir = os.scandir

    def refusing(path):
        if Path(path).name == "secret":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(datasets_module.os, "scandir", refusing)
    ds = ImageFolderDataset(root)
    assert _rel(ds) == ["ok/1.png"]
    assert ds.notes == [f"data.root={root}: skipped 1 folder that cannot be read (secret: Permission denied); "
                        "check their permissions"]


# ---------------------------------------------------------------------------------------------------- extensions


def test_files_that_are_not_images_are_counted_by_extension(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for i, rel in enumerate(["cat/1.jpg", "cat/2.png", "dog/3.JPEG"]):
        _image(root / rel, i)
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(root / "cat" / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(root / "dog" / "STILL.GIF")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README").write_text("about these images")

    ds = ImageFolderDataset(root)
    assert len(ds) == 3
    assert ds.notes == [f"data.root={root}: 3 images; skipped 4 files that are not images by their extension "
                        f"(2 .gif, 1 .txt, 1 without extension; images are {IMAGE_LIST})"]

    single = tmp_path / "single"
    _image(single / "1.jpg", 1)
    (single / "a.txt").write_text("x")
    assert ImageFolderDataset(single).notes == [
        f"data.root={single}: 1 image; skipped 1 file that is not an image by its extension (1 .txt; images are "
        f"{IMAGE_LIST})"]
    (single / "a.txt").unlink()
    assert ImageFolderDataset(single).notes == []  # nothing skipped: nothing to say

    only_gifs = tmp_path / "gifs"
    only_gifs.mkdir()
    frames[0].save(only_gifs / "a.gif")
    frames[1].save(only_gifs / "b.gif")
    with pytest.raises(DataError, match=r"holds no images \(searched .*; it holds 2 other files\); pass data.root="):
        ImageFolderDataset(only_gifs)


def test_evaluation_folders_say_what_they_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "eval"
    for i, rel in enumerate(["train/x/1.png", "train/y/1.png", "val/x/1.png", "val/y/1.png"]):
        _image(root / rel, i)
    Image.new("RGB", (8, 8)).save(root / "train" / "x" / "odd.gif")
    _link(root / "val" / "y" / "loop", "..")

    train, val = splits.folder_splits(root)
    assert len(train.labels) == 2 and len(val.labels) == 2
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "msn.eval.splits"]
    assert lines == [f"{root / 'train'}: 2 images; skipped 1 file that is not an image by its extension (1 .gif; "
                     f"images are {IMAGE_LIST})",
                     f"{root / 'val'}: skipped 1 symlink loop (y/loop -> ..); each file counts once"]


# ---------------------------------------------------------------------------------------------------- EXIF


def _sideways_jpeg(path: Path, orientation: int) -> np.ndarray:
    """A real 40x24 JPEG tagged with EXIF ``orientation``; returns its pixels as stored (decoded, not turned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(orientation).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # H=24, W=40
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    with Image.open(path) as raw:  # PIL alone ignores the tag: the pixels as the file stores them
        assert raw.getexif()[0x0112] == orientation
        return np.asarray(raw.convert("RGB"))


# EXIF orientation -> how the stored pixels turn upright: 6 is a phone held upright (turn 90 degrees clockwise)
UPRIGHT = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied_in_training_and_evaluation(tmp_path: Path, orientation: int) -> None:
    root = tmp_path / "photos"
    path = root / "train" / "cls" / "photo.jpg"
    stored = _sideways_jpeg(path, orientation)
    _image(root / "val" / "cls" / "other.png", 1)
    upright = UPRIGHT[orientation](stored)
    assert upright.shape == ((40, 24, 3) if orientation in (6, 8) else (24, 40, 3))

    def same(image: Image.Image) -> bool:
        return image.size == (upright.shape[1], upright.shape[0]) and np.array_equal(np.asarray(image), upright)

    # training: the folder source, and the image MultiCropDataset crops its views from
    base = build_dataset(replace(SMALL, root=str(root / "train")))
    assert same(base[0]) and same(load_rgb(path))
    image, bad = MultiCropDataset(base, MultiCropTransform(SMALL)).load(0, 0)  # simplejpeg's (3, H, W) tensor
    assert same(Image.fromarray(to_uint8_image(image).permute(1, 2, 0).numpy())) and bad == []
    # shards and Hugging Face rows decode bytes with the same function
    assert same(decode_rgb(io.BytesIO(path.read_bytes()), "photo.jpg"))
    # msn-eval: the split's images, as TransformedImages hands them to the encoder
    train, _ = splits.folder_splits(root)
    tensor = TransformedImages(train.images, v2.Compose([v2.ToImage()]))[0]  # (3, H, W) uint8
    assert np.array_equal(tensor.permute(1, 2, 0).numpy(), upright)
    # msn-viz: image files through the evaluation preprocessing (crop_pct 1: short side kept, centre crop)
    side = min(upright.shape[:2])
    encoder = Encoder(None, side, [0.0] * 3, [1.0] * 3, "", path, crop_pct=1.0)  # type: ignore[arg-type]
    top, left = (upright.shape[0] - side) // 2, (upright.shape[1] - side) // 2
    expected = torch.from_numpy(upright[top:top + side, left:left + side].copy()).permute(2, 0, 1) / 255.0
    assert torch.allclose(load_images(encoder, [path])[0], expected, atol=1.5 / 255)
    assert path.read_bytes()[:2] == b"\xff\xd8" and Image.open(path).getexif()[0x0112] == orientation  # unchanged
