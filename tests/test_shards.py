"""``msn-shards`` never destroys a good set and never leaves a partial one that trains, and ``data=webdataset``
checks the record a complete set carries (``shards.json``): on real PNG files, real tar shards, a real tmpfs
that fills up and real signals to a real ``msn-shards`` process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msn.cli.shards import main as shards_main
from msn.data.loader import MultiCropDataset
from msn.data.multicrop import MultiCropTransform
from msn.data.shard_writer import write_shards
from msn.data.sources.webdataset import WebDatasetImages, expand_shards
from msn.errors import CheckpointError, DataError
from msn.train import train
from tests.conftest import compose_config


def _pngs(root: Path, count: int, seed: int = 0, size: int = 24) -> Path:
    """``count`` PNGs of noise in two class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msn-shards: error: "), lines
    return lines[0]


@pytest.fixture
def good_set(tmp_path):
    """A complete set of 12 images (shards of 5) in OUT, as msn-shards wrote it, and a copy of its bytes."""
    out = tmp_path / "out"
    assert shards_main([str(_pngs(tmp_path / "old_src", 12)), str(out), "--per-shard", "5"]) == 0
    return out, _snapshot(out)


def test_refusals_leave_the_good_set_as_it_was(tmp_path, good_set, capsys):
    """--overwrite from an empty SRC (the old code deleted every shard first), a bad file in SRC (the old code
    blamed OUT and left a part), a user's own classes.txt and a folder of other files: one line, OUT unchanged."""
    out, before = good_set
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert shards_main([str(tmp_path / "empty"), str(out), "--overwrite"]) == 1
    assert f"SRC {tmp_path / 'empty'} holds no images" in _one_error_line(capsys)
    assert _snapshot(out) == before

    src = _pngs(tmp_path / "src", 6)
    (src / "a" / "zz_link.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link, met last
    assert shards_main([str(src), str(out), "--overwrite", "--per-shard", "2"]) == 1
    line = _one_error_line(capsys)
    assert f"SRC file {src / 'a' / 'zz_link.png'} cannot be read as an image (a broken link)" in line
    assert "--skip-bad" in line and _snapshot(out) == before
    (src / "b" / "bad.png").write_text("not an image")
    assert shards_main([str(src), str(out), "--overwrite", "--skip-bad"]) == 0
    record = json.loads((out / "shards.json").read_text())
    assert record["samples"] == 6 and sorted(e.split(":")[0] for e in record["left_out"]) == ["a/zz_link.png",
                                                                                             "b/bad.png"]
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "shard-000000.tar", "shards.json"]

    own = tmp_path / "own"
    own.mkdir()
    (own / "classes.txt").write_text("0 mine\n")
    assert shards_main([str(src), str(own), "--skip-bad"]) == 1
    assert "OUT " + str(own) + " holds 1 file msn-shards did not write (classes.txt)" in _one_error_line(capsys)
    assert (own / "classes.txt").read_text() == "0 mine\n" and len(list(own.iterdir())) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 320 KiB tmpfs (root only: skipped elsewhere), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_keeps_the_earlier_set(tmp_path, small_disk, capsys):
    """The new set is written beside the old one: a disk too small for both refuses before writing when the
    sizes say so, and stops on ENOSPC when they do not (TIFFs re-encoded as PNG grow); the old set stays whole."""
    out = small_disk / "out"
    assert shards_main([str(_pngs(tmp_path / "old_src", 10)), str(out), "--per-shard", "5"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert shards_main([str(_pngs(tmp_path / "big", 150)), str(out), "--overwrite"]) == 1
    line = _one_error_line(capsys)
    assert "free, and the new set needs about" in line and _snapshot(out) == before

    tiffs = tmp_path / "tiffs"
    tiffs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):  # about 28 KB each as JPEG-compressed TIFF, about 49 KB as PNG
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tiffs / f"{i}.tif",
                                                                                   compression="jpeg")
    assert shards_main([str(tiffs), str(out), "--overwrite"]) == 1
    line = _one_error_line(capsys)
    assert "no space left on its device" in line and f"{out} is unchanged" in line
    assert _snapshot(out) == before


def _start_shards(src: Path, out: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as f:  # a file, not a pipe
        return subprocess.Popen(["msn-shards", str(src), str(out), "--overwrite", "--per-shard", "10"],
                                stdout=f, stderr=subprocess.STDOUT)


def _wait_for_partial_shards(out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while len(list(out.glob(".msn-shards-partial-*/*.tar"))) < count:
        assert process.poll() is None, "msn-shards ended before it was interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_half_way_leaves_the_earlier_set(tmp_path, good_set):
    """SIGTERM half-way (the old code: exit 143, no word, two thirds of the shards and no mark): one line, exit
    143, the old set whole and nothing else in OUT."""
    out, before = good_set
    term = _start_shards(_pngs(tmp_path / "src", 300, seed=1), out, tmp_path / "term.log")
    _wait_for_partial_shards(out, 3, term)
    term.send_signal(signal.SIGTERM)
    assert term.wait(timeout=60) == 143
    lines = (tmp_path / "term.log").read_text().strip().splitlines()
    assert lines == [f"msn-shards: error: stopped by SIGTERM before the set was complete; {out} is unchanged (run "
                     "the same command again to write the set)"]
    assert _snapshot(out) == before


@pytest.mark.slow
def test_kill_9_half_way_leaves_the_earlier_set_and_the_next_write_clears_it(tmp_path, good_set):
    """kill -9 half-way: the old set whole, its record too (it still trains); the next msn-shards clears what the
    killed one left."""
    out, before = good_set
    src = _pngs(tmp_path / "src", 600, seed=1)
    killed = _start_shards(src, out, tmp_path / "kill.log")
    _wait_for_partial_shards(out, 3, killed)
    killed.kill()
    killed.wait(timeout=60)
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith(".msn-shards-partial")} == before
    assert len(WebDatasetImages(expand_shards(str(out / "*.tar")))) == 12  # the old set, its record intact
    assert shards_main([str(src), str(out), "--overwrite", "--per-shard", "100"]) == 0
    assert sorted(p.name for p in out.iterdir())[-1] == "shards.json" and not list(out.glob(".msn-shards-*"))
    assert len(WebDatasetImages(expand_shards(str(out / "*.tar")))) == 600


def test_a_set_that_lost_or_changed_a_shard_is_refused_at_the_start(tmp_path, good_set):
    """The record lists every shard: one missing, one changed, one stray, or a write that never finished (a kill
    between its record's removal and the new one's arrival) is one line, before any training."""
    out, _ = good_set
    pattern = str(out / "*.tar")
    images = WebDatasetImages(expand_shards(str(out / "shard-00000{0..1}.tar")))
    assert images.notes == [f"data.shards: 2 of the 3 shards of the set in {out}"]

    last = out / "shard-000002.tar"
    data = last.read_bytes()
    last.unlink()
    with pytest.raises(DataError, match=r"shards.json lists 3 shards, 1 of them missing \(shard-000002.tar\)"):
        WebDatasetImages(expand_shards(pattern))
    last.write_bytes(data[:-1024])  # cut: the end-of-archive blocks are gone
    with pytest.raises(DataError, match="shard-000002.tar is not the shard msn-shards wrote"):
        WebDatasetImages(expand_shards(pattern))
    last.write_bytes(data)
    (out / "shard-000003.tar").write_bytes(data)
    with pytest.raises(DataError, match="shard-000003.tar is not part of the set"):
        WebDatasetImages(expand_shards(pattern))
    (out / "shard-000003.tar").unlink()
    (out / "shards.json").unlink()
    (out / ".msn-shards-partial-1234").mkdir()
    with pytest.raises(DataError, match="holds an unfinished msn-shards write"):
        WebDatasetImages(expand_shards(pattern))


SMALL = ["experiment=cpu_smoke", "logger.progress=false", "data.global_size=32", "data.focal_size=16",
         "data.num_focal=2", "data.batch_size=8", "data.num_workers=0", "optim.max_steps=null", "optim.epochs=1",
         "data=webdataset"]


def test_a_resume_on_shards_written_in_another_order_is_refused(tmp_path):
    """Same pattern, same count, other order (the old code compared only those two and went on)."""
    src, shards = _pngs(tmp_path / "src", 16), tmp_path / "shards"
    write_shards(src, shards, per_shard=8)
    overrides = [*SMALL, f"data.shards={shards}/shard-*.tar", f"run_dir={tmp_path / 'run'}"]
    train(compose_config(overrides))
    write_shards(src, shards, per_shard=8, shuffle_seed=1, overwrite=True)
    with pytest.raises(CheckpointError, match="belongs to a run on other shards"):
        train(compose_config([*overrides, "optim.epochs=2", "resume=auto"]))


def _transform() -> MultiCropTransform:
    return MultiCropTransform(compose_config([*SMALL, "data.shards=unused"]).data)


def test_a_shard_gone_during_the_run_stops_it_rather_than_skipping_its_samples(tmp_path):
    """Removed after the run indexed it: the loader's answer is a stop naming the shard, not a replaced sample
    (the old code counted each of its samples as an undecodable image and the run ended with exit 0)."""
    shards = tmp_path / "shards"
    write_shards(_pngs(tmp_path / "src", 8), shards, per_shard=4)
    images = WebDatasetImages(expand_shards(str(shards / "*.tar")))
    dataset = MultiCropDataset(images, _transform())
    assert dataset.__getitems__([(0, 5)]).error is None
    (shards / "shard-000000.tar").unlink()
    batch = dataset.__getitems__([(0, 1)])
    assert batch.error.startswith(f"shard {shards / 'shard-000000.tar'} is gone") and batch.skipped == []
    second = shards / "shard-000001.tar"
    with second.open("r+b") as f:  # rewritten in place after its first read (the open descriptor sees it)
        f.seek(0, os.SEEK_END)
        f.write(b"\0" * 512)
    batch = dataset.__getitems__([(0, 6)])
    assert batch.error.startswith(f"shard {second} changed while the run read it") and batch.skipped == []


def test_what_the_start_says_about_cached_copies_duplicate_keys_and_samples_without_images(tmp_path):
    import io
    import tarfile

    shard = tmp_path / "own.tar"
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with tarfile.open(shard, "w") as tar:
        # a name twice, a sample without an image, a second image, a key used again further on
        for name in ("k1.png", "k1.png", "k2.txt", "k3.png", "k3.jpg", "k1.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
    url = f"pipe:cat {shard}"
    first = WebDatasetImages([url], cache_dir=tmp_path / "cache")
    assert first.notes == [
        f"data.shards: 1 member repeats a member name of its sample and is not read ({url}#k1.png); give each image "
        "its own key",
        f"data.shards: 1 image member lies beside its sample's first image and is not read ({url}#k3.jpg); a sample "
        "is one image: give each image to train on a sample of its own",
        f"data.shards: 1 sample reuses a key met earlier in its shard ({url}#k1); each is read as a sample of its own"]
    assert len(first) == 4
    again = WebDatasetImages([url], cache_dir=tmp_path / "cache")
    assert "1 of the 1 remote shards are read from the copies fetched earlier" in again.notes[0]
    dataset = MultiCropDataset(again, _transform())
    batch = dataset.__getitems__([(0, 1)])
    assert set(batch.skipped) == {f"{url}#k2"} and batch.skip_kinds == {  # (its replacement may draw it again)
        f"{url}#k2": "sample without an image member (data.image_keys=jpg,jpeg,png,webp)"}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
