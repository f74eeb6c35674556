"""Training sources past a folder: WebDataset shards (``data=webdataset``, written by ``msn-shards``), Hugging Face
datasets (``data=hf``) and a dataset class of the user's own (``data=custom``), on real tar files, real
``datasets`` folders and real image files written here.

They must keep the folder source's promises: the same images in the same order (so the same run), exact
resume after kill -9 with any number of loader workers, disjoint shares across processes, bad samples
skipped and counted, and bad paths refused in one line before anything is written.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msn.data.images import load_rgb
from msn.data.shard_writer import write_shards
from msn.data.sources.webdataset import WebDatasetImages, expand_shards, index_shard
from msn.errors import DataError
from msn.train import train
from msn.weights.checkpoint import load_checkpoint
from tests.conftest import compose_config, metrics_rows, plugin_env

SMALL = ["experiment=cpu_smoke", "logger.progress=false", "data.global_size=32", "data.focal_size=16",
         "data.num_focal=2", "data.batch_size=8", "data.num_workers=0", "optim.max_steps=null",
         "optim.epochs=2"]  # 32 images: 8 steps


@pytest.fixture(autouse=True)
def _datasets_cache(monkeypatch, tmp_path):
    """The datasets cache (parquet folders are converted into it) stays in the test's folder; conftest.py has
    already made the hub unreachable (HF_HUB_OFFLINE=1)."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _images(root: Path, count: int = 32) -> Path:
    """``count`` JPEGs of varied sizes in two class folders (ImageFolder layout)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (36 + i % 5, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 32 JPEGs as a folder, as shards of 10 (msn-shards) and as a save_to_disk and a parquet dataset."""
    import datasets

    base = tmp_path_factory.mktemp("sources")
    folder = _images(base / "folder")
    result = subprocess.run(["msn-shards", str(folder), str(base / "shards"), "--per-shard", "10"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pattern = result.stdout.split("data.shards=")[1].strip().strip("'\"")
    files = sorted(p for p in folder.rglob("*.jpg"))  # the folder source's order: sorted relative paths
    rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in files], "label": [p.parent.name for p in files]}
    table = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": table, "test": table.select(range(4))}).save_to_disk(str(base / "saved"))
    (base / "parquet").mkdir()
    table.to_parquet(str(base / "parquet" / "train-00000-of-00001.parquet"))
    return {"folder": folder, "pattern": pattern, "shards": base / "shards", "saved": base / "saved",
            "parquet": base / "parquet", "files": files}


def _source(sources, name: str) -> list[str]:
    return {"folder": ["data=folder", f"data.root={sources['folder']}"],
            # a dataset class of the user's own (tests/plugin/msnplugin) reading the same files
            "custom": ["data=custom",
                       f"data.dataset={{_target_:msnplugin.datasets.ImageFiles,root:{sources['folder']}}}"],
            "webdataset": ["data=webdataset", f'data.shards="{sources["pattern"]}"'],  # quoted: Hydra's braces
            "hf": ["data=hf", f"data.path={sources['saved']}"],
            "parquet": ["data=hf", f"data.path={sources['parquet']}"]}[name]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def test_msn_shards_writes_the_folder_as_webdataset_samples(sources):
    shards = sorted(sources["shards"].glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar",
                                        "shard-000003.tar"]
    assert sources["pattern"] == str(sources["shards"] / "shard-{000000..000003}.tar")
    assert expand_shards(sources["pattern"]) == [str(p) for p in shards]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert names[:4] == ["000000000.cls", "000000000.jpg", "000000001.cls", "000000001.jpg"]
        first = sources["files"][0]
        assert tar.extractfile("000000000.jpg").read() == first.read_bytes()  # the file's own bytes
        assert tar.extractfile("000000000.cls").read().decode() == str(["cats", "dogs"].index(first.parent.name))
    assert (sources["shards"] / "classes.txt").read_text() == "0 cats\n1 dogs\n"
    images = WebDatasetImages(expand_shards(sources["pattern"]))
    assert len(images) == 32
    assert images.read_bytes(17) == sources["files"][17].read_bytes()  # the stored bytes, for a decoder elsewhere
    for i in (0, 17, 31):
        assert np.array_equal(np.asarray(images[i]), np.asarray(load_rgb(sources["files"][i])))
    again = subprocess.run(["msn-shards", str(sources["folder"]), str(sources["shards"])], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"msn-shards: error: {sources['shards']} already holds 4 shards; pass --overwrite to replace them, or "
        "another OUT"]


def test_shuffled_shards_hold_every_image_once(sources, tmp_path):
    written = write_shards(sources["folder"], tmp_path / "shuffled", per_shard=7, shuffle_seed=3)
    assert written.samples == 32 and len(written.files) == 5
    images = WebDatasetImages(expand_shards(written.pattern))
    got = sorted(np.asarray(images[i]).tobytes() for i in range(len(images)))
    assert got == sorted(np.asarray(load_rgb(p)).tobytes() for p in sources["files"])
    first = np.asarray(images[0]).tobytes()
    assert first != np.asarray(load_rgb(sources["files"][0])).tobytes()  # seed 3 moves the first image


def test_every_source_trains_the_same_run_as_the_folder(sources, tmp_path):
    """The same images in the same order give bit-identical weights: the readers return the same pixels and
    the epoch order, views and masks are the same functions of (seed, epoch, index) for every source."""
    runs = {}
    for name in ("folder", "webdataset", "hf", "parquet", "custom"):
        run_dir = tmp_path / name
        train(compose_config([*SMALL, *_source(sources, name), f"run_dir={run_dir}"]))
        runs[name] = _weights(run_dir)
        assert [int(r["step"]) for r in metrics_rows(run_dir)] == list(range(1, 9))
    for name in ("webdataset", "hf", "parquet", "custom"):
        for key, tensor in runs["folder"].items():
            torch.testing.assert_close(runs[name][key], tensor, atol=0, rtol=0, msg=f"{name}: {key}")


_KILLED_AFTER = r"""
import os, signal, sys
import msn.train.checkpoints as checkpoints

real = checkpoints.save_checkpoint

def save_then_die(path, state):  # kill -9 right after the checkpoint of step 5 is on disk, mid-epoch 2
    real(path, state)
    if state["step"] == 5 and path.name == "last.pt":
        os.kill(os.getpid(), signal.SIGKILL)

checkpoints.save_checkpoint = save_then_die
sys.argv = ["msn-pretrain", *sys.argv[1:]]
from msn.cli.pretrain import main
main()
"""


# Each source with 0 and 2 loader workers; the default suite runs shards without workers and shards decoded on the
# device (data.decode_on=device, on this CPU) with 2 workers (a folder with 2 workers, through the command line, in
# tests/test_cluster.py), -m slow the others.
@pytest.mark.parametrize(("source", "workers", "decode_on"), [
    ("webdataset", 0, "cpu"), ("webdataset", 2, "device"), pytest.param("webdataset", 2, "cpu", marks=pytest.mark.slow),
    pytest.param("folder", 0, "device", marks=pytest.mark.slow),
    pytest.param("hf", 2, "cpu", marks=pytest.mark.slow), pytest.param("hf", 0, "cpu", marks=pytest.mark.slow),
    pytest.param("custom", 2, "cpu", marks=pytest.mark.slow), pytest.param("custom", 0, "cpu", marks=pytest.mark.slow),
])
def test_kill_9_and_resume_is_bit_identical(sources, tmp_path, source, workers, decode_on):
    overrides = [*(o for o in SMALL if not o.startswith("data.num_workers=")), *_source(sources, source),
                 "checkpoint.last_every_steps=1", "checkpoint.every_steps=0",  # (a key given once on a command line)
                 *(["data.decode_on=device", "data.augment_on=device"] if decode_on == "device" else [])]
    full = tmp_path / "full"
    train(compose_config([*overrides, "data.num_workers=0", f"run_dir={full}"]))
    run_dir = tmp_path / f"killed_{workers}"
    command = [*overrides, f"data.num_workers={workers}", f"hydra.run.dir={run_dir}"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER, *command], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=plugin_env())
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 5
    train(compose_config([*overrides, f"data.num_workers={workers}", "resume=auto", f"run_dir={run_dir}"]))
    resumed = _weights(run_dir)
    for key, tensor in _weights(full).items():
        torch.testing.assert_close(resumed[key], tensor, atol=0, rtol=0, msg=f"{workers} workers: {key}")
    assert [r["loss"] for r in metrics_rows(run_dir)] == [r["loss"] for r in metrics_rows(full)]


def _corrupt_member(shard: Path, member: str) -> None:
    """Overwrite the middle of ``member``'s data in place with bytes no decoder accepts."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(member)
    with shard.open("r+b") as f:
        f.seek(info.offset_data + 20)
        f.write(b"\x00garbage" * ((info.size - 40) // 8))


def test_bad_samples_are_skipped_and_counted(sources, tmp_path, caplog):
    """An undecodable member, a sample without an image member, a member cut short and the samples lost with
    the end of a shard are each replaced and counted, exactly as an undecodable file of a folder is."""
    shards = tmp_path / "shards"
    write_shards(sources["folder"], shards, per_shard=10)  # shards of 10, 10, 10 and 2 samples
    (shards / "shards.json").unlink()  # damaged below on purpose: read as shards of another tool (no record)
    _corrupt_member(shards / "shard-000000.tar", "000000003.jpg")
    with tarfile.open(shards / "shard-000002.tar", "a") as tar:  # a sample with a caption and no image
        data = b"only words"
        info = tarfile.TarInfo("000000099.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    last = shards / "shard-000003.tar"
    offsets = index_shard(last, ["jpg"]).offsets
    last.write_bytes(last.read_bytes()[:offsets[0] + 200])  # cut inside sample 30's image: 31 is lost
    images = WebDatasetImages(expand_shards(str(shards / "shard-*.tar")))
    bad = {f"{shards}/shard-000000.tar#000000003", f"{shards}/shard-000002.tar#000000099",
           f"{shards}/shard-000003.tar#000000030", f"{shards}/shard-000003.tar#(the unreadable rest of the shard)"}
    assert len(images) == 32 + 1 and bad <= {images.name(i) for i in range(len(images))}
    run_dir = tmp_path / "run"
    # drop_last=false: every sample is drawn in each of the 2 epochs (33 samples: batches of 8, 8, 8, 8, 1 ... no:
    # 33 % 8 = 1 would leave the head's BatchNorm a batch of one, so the batch is 11)
    train(compose_config([*SMALL, "data=webdataset", f"data.shards={shards}/shard-*.tar", f"run_dir={run_dir}",
                          "data.drop_last=false", "data.batch_size=11"]))
    skipped = load_checkpoint(run_dir / "checkpoints" / "last.pt")["skipped_images"]["paths"]
    assert set(skipped) == bad
    err = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    kinds = {f"{shards}/shard-000000.tar#000000003": "undecodable image",
             f"{shards}/shard-000002.tar#000000099":
                 "sample without an image member (data.image_keys=jpg,jpeg,png,webp)",
             f"{shards}/shard-000003.tar#000000030": "undecodable image",
             f"{shards}/shard-000003.tar#(the unreadable rest of the shard)": "rest of a truncated or damaged shard"}
    for name in bad:
        assert f"skipped {kinds[name]} {name} (replaced by another image" in err
    per_epoch = {int(r["epoch"]): int(r["skipped_images"]) for r in metrics_rows(run_dir)}
    assert min(per_epoch.values()) >= len(bad)


def test_a_damaged_tail_is_indexed_as_one_bad_sample(tmp_path, sources):
    shard = sorted(sources["shards"].glob("*.tar"))[0]
    data = shard.read_bytes()
    scan = index_shard(shard, ["jpg"])
    offsets, sizes, keys = scan.offsets, scan.sizes, scan.keys
    assert len(keys) == 10 and min(offsets) > 0  # intact: ten samples, each with its image
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:offsets[2] + 100])  # samples 0 and 1 whole, sample 2's image cut after 100 bytes
    got = index_shard(cut, ["jpg"])
    assert got[2] == [*keys[:3], "(the unreadable rest of the shard)"]
    assert got[0][:3] == offsets[:3] and got[1][:3] == [*sizes[:2], 100]
    with tarfile.open(shard) as tar:
        first_of_sample_1 = next(m for m in tar.getmembers() if m.name.startswith(keys[1]))
    cut.write_bytes(data[:first_of_sample_1.offset + 100])  # inside sample 1's first header
    assert index_shard(cut, ["jpg"])[2] == [keys[0], "(the unreadable rest of the shard)"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["data=webdataset", "data.shards=/no/such/shard-{000000..000003}.tar"],
     "data.shards: /no/such/shard-000000.tar does not exist (4 of the 4 shards named are missing)"),
    (["data=webdataset", "data.shards=/no/such/*.tar"], "the pattern /no/such/*.tar matches no file"),
    (["data=webdataset"], "data.shards is required for data=webdataset"),
    (["data=hf", "data.path=/no/such/folder"], "data.path=/no/such/folder does not exist"),
    (["data=hf"], "data.path is required for data=hf"),
], ids=["missing-shards", "empty-glob", "no-shards", "missing-hf-folder", "no-hf-path"])
def test_bad_sources_are_one_line_before_any_file_is_written(tmp_path, overrides, message):
    command = ["msn-pretrain", "experiment=cpu_smoke", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    # Hydra's grammar takes braces as a dict: a pattern is quoted for Hydra, as the README says
    command = [f'data.shards="{a.split("=", 1)[1]}"' if a.startswith("data.shards=") else a for a in command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msn-pretrain: error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_hf_datasets_refuse_a_wrong_split_column_or_hub_id_in_one_line(sources, tmp_path):
    from msn.data.sources.hf import HFImages

    assert HFImages(str(sources["saved"])).read_bytes(3) == sources["files"][3].read_bytes()  # stored, undecoded

    with pytest.raises(DataError, match=r"data.split=validation: .* holds the splits train, test"):
        HFImages(str(sources["saved"]), "validation")
    with pytest.raises(DataError, match=r"data.image_key=img: .* has the columns image, label"):
        HFImages(str(sources["saved"]), "train", "img")
    with pytest.raises(DataError, match=r"the Hugging Face hub is offline here"):
        HFImages("someone/some-dataset")
    assert len(HFImages(str(sources["saved"]), "test")) == 4
    run = subprocess.run(["msn-pretrain", "experiment=cpu_smoke", "data=hf", "data.path=someone/some-dataset",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "msn-pretrain: error: data.path=someone/some-dataset is no local folder" in run.stderr


def test_samples_per_epoch_takes_a_prefix_of_each_epochs_order(sources, tmp_path):
    run_dir = tmp_path / "run"
    train(compose_config([*SMALL, *_source(sources, "webdataset"), "data.samples_per_epoch=16",
                          f"run_dir={run_dir}"]))
    layout = json.loads((run_dir / "run.json").read_text())
    assert (layout["steps_per_epoch"], layout["total_steps"]) == (2, 4)
    with pytest.raises(DataError, match="data.samples_per_epoch=40 exceeds the 32 images"):
        train(compose_config([*SMALL, *_source(sources, "webdataset"), "data.samples_per_epoch=40",
                              f"run_dir={tmp_path / 'big'}"]))


def test_pipe_shards_are_fetched_once_into_the_cache(sources, tmp_path):
    shards = sorted(sources["shards"].glob("*.tar"))
    urls = [f"pipe:cat {p}" for p in shards]
    images = WebDatasetImages(urls, cache_dir=tmp_path / "cache")
    assert len(images) == 32 and len(list((tmp_path / "cache").glob("*.tar"))) == 4
    assert np.array_equal(np.asarray(images[5]), np.asarray(load_rgb(sources["files"][5])))
    with pytest.raises(DataError, match="could not fetch pipe:cat /no/such.tar"):
        WebDatasetImages(["pipe:cat /no/such.tar"], cache_dir=tmp_path / "cache")


def test_shard_indexes_are_cached_and_renewed_when_a_shard_changes(sources, tmp_path, monkeypatch):
    import msn.data.sources.webdataset as shards_module

    shards = tmp_path / "shards"
    write_shards(sources["folder"], shards, per_shard=10)
    (shards / "shards.json").unlink()  # a shard is cut below: read as shards of another tool (no record)
    urls = expand_shards(str(shards / "shard-*.tar"))
    first = WebDatasetImages(urls, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "index").glob("*.json"))) == 4

    def no_scan(*args):
        raise AssertionError("indexed again")

    monkeypatch.setattr(shards_module, "index_shard", no_scan)
    again = WebDatasetImages(urls, cache_dir=tmp_path / "cache")  # every index from the cache
    assert again.index.keys == first.index.keys and np.array_equal(again.index.offset, first.index.offset)
    monkeypatch.undo()
    short = shards / "shard-000003.tar"
    short.write_bytes(short.read_bytes()[:3000])  # a changed shard is indexed anew
    assert len(WebDatasetImages(urls, cache_dir=tmp_path / "cache")) == 32
    assert WebDatasetImages(urls, cache_dir=tmp_path / "cache").index.keys[-1] == "(the unreadable rest of the shard)"


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_header_scan_agrees_with_tarfile(tmp_path, tar_format):
    """Our raw header scan finds the members, offsets and sizes Python's tarfile does: long names (PAX
    records, GNU long-name members, the ustar prefix), non-ASCII names, folders and empty members."""
    from msn.data.sources.webdataset import tar_members

    path = tmp_path / "t.tar"
    deep = "/".join(["folder"] * (8 if tar_format == tarfile.USTAR_FORMAT else 20))  # ustar: a 155-byte prefix
    with tarfile.open(path, "w", format=tar_format) as tar:
        for i, (name, data) in enumerate([("a.jpg", b"x" * 700), (f"{deep}/b.jpg", b"y" * 1), ("c.cls", b""),
                                          ("été/ü.png" if tar_format != tarfile.USTAR_FORMAT else "e/u.png", b"z")]):
            if i == 1:
                folder = tarfile.TarInfo(deep)
                folder.type = tarfile.DIRTYPE
                tar.addfile(folder)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size, m.isfile()) for m in tar]
    members = tar_members(path)
    assert list(members) == expected and members.complete
