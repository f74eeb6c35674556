import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msn.cli import evaluate
from msn.errors import DataError
from msn.eval import features, splits
from msn.eval.features import extract_features, load_encoder
from msn.eval.protocols.knn import knn_accuracy
from msn.eval.protocols.linear import linear_probe
from msn.eval.protocols.lowshot import logistic_regression, sample_fraction, sample_per_class
from msn.eval.splits import digits_splits, read_subset_file
from msn.train.loop import train
from msn.weights.export import export_hf
from msn.weights.read import read_source
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train(compose_config(["experiment=cpu_smoke", f"run_dir={run}", "logger.progress=false"]))
    return run


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory) -> Path:
    """A small labelled ImageFolder (train/ and val/) of two visually distinct classes, written as PNGs."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 4)):
        for c, colour in enumerate(((220, 30, 30), (30, 30, 220))):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


def _blobs(n_per_class: int, classes: int = 4, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (classes, dim))
    x = np.concatenate([c + rng.normal(0, 0.5, (n_per_class, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(classes), n_per_class)
    return x, y


def test_protocols_on_separable_features():
    x_train, y_train = _blobs(5)
    x_test, y_test = _blobs(50, seed=0)
    x_test += np.random.default_rng(1).normal(0, 0.1, x_test.shape).astype(np.float32)
    assert logistic_regression(x_train, y_train, x_test, y_test, None) > 95
    assert logistic_regression(x_train, y_train, x_test, y_test, 10.0) > 95
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    assert knn_accuracy(t(x_train), t(y_train), t(x_test), t(y_test), k=3) > 95
    assert linear_probe(t(x_train), t(y_train), t(x_test), t(y_test), epochs=200, lr=1e-2) > 95
    # and chance level on features that carry no label information
    noise = np.random.default_rng(2).normal(size=x_test.shape).astype(np.float32)
    assert logistic_regression(noise[:20], y_train, noise, y_test, 1.0) < 50


def test_shot_sampling_is_exact_and_seeded():
    labels = np.repeat(np.arange(5), 30)
    idx = sample_per_class(labels, 2, seed=0)
    assert np.bincount(labels[idx]).tolist() == [2] * 5 and len(set(idx)) == 10
    assert np.array_equal(idx, sample_per_class(labels, 2, seed=0))
    assert not np.array_equal(idx, sample_per_class(labels, 2, seed=1))
    frac = sample_fraction(labels, 0.1, seed=0)
    assert np.bincount(labels[frac]).tolist() == [3] * 5
    assert np.bincount(labels[sample_fraction(labels, 0.001, seed=0)]).tolist() == [1] * 5


def test_digits_split_is_fixed_and_stratified():
    train, test = digits_splits()
    assert len(train.labels) == 1257 and len(test.labels) == 540
    assert not set(train.names) & set(test.names)
    assert np.bincount(test.labels).min() >= 50
    assert digits_splits()[1].names == test.names


def test_subset_files_are_honoured_exactly(tmp_path, folder_dataset):
    train, _ = digits_splits()
    listing = tmp_path / "2imgs_class.txt"
    chosen = [train.names[i] for i in (3, 40, 41, 700)]
    listing.write_text("\n".join(chosen) + "\n")
    idx = read_subset_file(listing, train)
    assert [train.names[i] for i in idx] == chosen
    listing.write_text("99999\n")
    with pytest.raises(DataError, match="not an image of the training split"):
        read_subset_file(listing, train)
    folder_train, _ = splits.folder_splits(folder_dataset)
    listing.write_text("class_0/img1.png\nclass_1/img4.png\n")
    idx = read_subset_file(listing, folder_train)
    assert [folder_train.names[i] for i in idx] == ["class_0/img1.png", "class_1/img4.png"]
    assert folder_train.labels[idx].tolist() == [0, 1]


def test_feature_cache_is_reused_and_corruption_rebuilt(tmp_path, run_dir, monkeypatch):
    encoder = load_encoder(run_dir)
    _, test = digits_splits()
    calls = []
    original = features.cls_features
    monkeypatch.setattr(features, "cls_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = extract_features(encoder, test, tmp_path)
    computed = len(calls)
    assert computed > 0 and first.shape == (540, 128)
    again = extract_features(encoder, test, tmp_path)
    assert len(calls) == computed and torch.equal(again, first)  # served from the cache
    (cache_file,) = tmp_path.glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # truncated: must be rebuilt, not trusted
    rebuilt = extract_features(encoder, test, tmp_path)
    assert len(calls) == 2 * computed and torch.equal(rebuilt, first)
    other = extract_features(encoder, test, tmp_path, feature="cls_prenorm", last_blocks=2)
    assert other.shape == (540, 256) and len(list(tmp_path.glob("*.pt"))) == 2


def test_crop_pct_chooses_how_much_of_the_image_is_seen(tmp_path, run_dir):
    """crop_pct=1 hands the encoder the image itself; the paper's 0.875 a zoomed centre; each has its own cache."""
    encoder = load_encoder(run_dir, crop_pct=1.0)
    size, mean, std = encoder.image_size, torch.tensor(encoder.mean), torch.tensor(encoder.std)
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - mean[:, None, None]) / std[:, None, None]
    whole = features.eval_transform(encoder)(Image.fromarray(pixels))
    torch.testing.assert_close(whole, expected)
    border = np.zeros((size, size // 2, 3), np.uint8)
    wide = np.concatenate([border, pixels, border], axis=1)
    torch.testing.assert_close(features.eval_transform(encoder)(Image.fromarray(wide)), expected)  # the centre square
    paper = load_encoder(run_dir)
    assert paper.crop_pct == 0.875
    zoomed = features.eval_transform(paper)(Image.fromarray(pixels))
    assert zoomed.shape == whole.shape and (zoomed - whole).abs().mean() > 0.1
    _, test = digits_splits()
    a, b = extract_features(encoder, test, tmp_path), extract_features(paper, test, tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not torch.equal(a, b)
    with pytest.raises(ValueError, match="crop_pct=0 must lie in"):
        load_encoder(run_dir, crop_pct=0)


def test_cli_crop_pct(tmp_path, run_dir, capsys):
    whole = _eval("knn", str(run_dir), "--crop-pct", "1", cwd=tmp_path)
    paper = _eval("knn", str(run_dir), cwd=tmp_path)
    assert whole["settings"]["crop_pct"] == 1.0 and paper["settings"]["crop_pct"] == 0.875
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4  # train and test features for each crop
    capsys.readouterr()
    assert evaluate.main(["knn", str(run_dir), "--crop-pct", "1.5"]) == 1
    assert capsys.readouterr().err.startswith("msn-eval: error: --crop-pct=1.5 must lie in (0, 1]")


def test_hf_export_gives_the_same_features(tmp_path, run_dir):
    hf = export_hf(read_source(run_dir), tmp_path / "hf")
    _, test = digits_splits()
    ours = extract_features(load_encoder(run_dir), test, None)
    theirs = extract_features(load_encoder(hf), test, None)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def _eval(*args: str, cwd: Path) -> dict:
    """``msn-eval ARGS`` through its entry point, in this process (a subprocess costs seconds of imports)."""
    out = cwd / "results.json"
    with _chdir(cwd):
        code = evaluate.main([*args, "--output", str(out), "--overwrite", "--cache-dir", str(cwd / "cache")])
    assert code == 0
    return json.loads(out.read_text())


@contextlib.contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def test_cli_all_protocols_on_digits(tmp_path, run_dir):
    report = _eval("lowshot", str(run_dir), "--shots", "1", "2", "--splits", "2", cwd=tmp_path)
    assert {"protocol", "model", "dataset", "results", "settings"} <= set(report)
    assert set(report["results"]) == {"1", "2", "1%"}
    for r in report["results"].values():
        assert len(r["splits"]) == 2 and 0 <= r["mean"] <= 100
        assert r["mean"] == pytest.approx(np.mean(r["splits"])) and r["std"] == pytest.approx(np.std(r["splits"]))
    knn = _eval("knn", str(run_dir), cwd=tmp_path)
    assert knn["results"]["100%"]["mean"] > 10
    linear = _eval("linear", str(run_dir), "--epochs", "20", "--splits", "1", cwd=tmp_path)
    assert linear["results"]["100%"]["mean"] > 10
    ft = _eval("finetune", str(run_dir), "--epochs", "1", "--splits", "1", "--lr", "1e-3", cwd=tmp_path)
    assert ft["protocol"] == "finetune" and ft["results"]["100%"]["mean"] > 10  # chance is 10 %


def test_cli_all_protocols_on_an_image_folder(tmp_path, run_dir, folder_dataset):
    hf = export_hf(read_source(run_dir), tmp_path / "hf")
    common = ["--dataset", str(folder_dataset)]
    low = _eval("lowshot", str(hf), *common, "--shots", "1", "2", "--splits", "2", "--update-card", cwd=tmp_path)
    assert low["train_images"] == 12 and low["test_images"] == 8
    assert low["results"]["2"]["mean"] > 50
    assert "## Evaluation: lowshot on" in (hf / "README.md").read_text()
    listing = tmp_path / "1imgs_class.txt"
    listing.write_text("class_0/img0.png\nclass_1/img0.png\n")
    subset = _eval("lowshot", str(hf), *common, "--subset-file", str(listing), cwd=tmp_path)
    assert list(subset["results"]) == ["1imgs_class"]
    for protocol, extra in (("knn", ["--k", "3"]), ("linear", ["--epochs", "10", "--splits", "1"]),
                            ("finetune", ["--epochs", "1", "--splits", "1"])):
        assert _eval(protocol, str(hf), *common, *extra, cwd=tmp_path)["protocol"] == protocol


def test_cli_errors(tmp_path, run_dir, capsys):
    result = subprocess.run(["msn-eval", "lowshot", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert result.returncode == 1 and "does not exist" in result.stderr  # the console script itself
    assert "a Hugging Face ViTMSN folder (msn-export's" in result.stderr  # every kind of MODEL it takes is named
    with _chdir(tmp_path):
        assert evaluate.main(["lowshot", str(run_dir), "--dataset", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "expected" in err and "train" in err
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["lowshot", str(run_dir), "--update-card"])
    assert exit_.value.code == 2 and "--update-card needs" in capsys.readouterr().err


def test_cli_logs_to_an_offline_wandb_run(tmp_path, run_dir):
    pytest.importorskip("wandb")  # a dependency of the package; absent only from hand-made environments
    _eval("knn", str(run_dir), "--wandb", cwd=tmp_path)  # wandb offline: files under cwd/wandb
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))


def test_wandb_missing_is_one_line_before_any_work(tmp_path, run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb gives
    monkeypatch.setattr(evaluate, "evaluate", lambda args: pytest.fail("evaluated before checking for wandb"))
    assert evaluate.main(["knn", str(run_dir), "--wandb", "--output", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["msn-eval: error: --wandb needs the wandb package, which is not installed: pip install wandb"]




@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_device_cuda_without_a_gpu_is_one_line(tmp_path, run_dir):
    result = subprocess.run(["msn-eval", "knn", str(run_dir), "--device", "cuda"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "msn-eval: error: --device=cuda but no CUDA device is available; use --device=cpu or --device=auto"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_features_on_the_gpu_in_bf16_match_the_cpu(run_dir):
    _, test = digits_splits()
    on_cpu = extract_features(load_encoder(run_dir), test, None)
    on_gpu = extract_features(load_encoder(run_dir, "cuda"), test, None, amp_dtype=torch.bfloat16)
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(on_cpu, on_gpu, dim=1).min() > 0.99


def _colour_folder(root: Path, layout: dict[str, list[str]], count: int = 3) -> Path:
    colours = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220), "d": (200, 200, 30)}
    rng = np.random.default_rng(1)
    for split, classes in layout.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colours[c]) + rng.normal(0, 10, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_val_labels_follow_the_training_class_index(tmp_path, run_dir):
    """val/ without class a: its b and c images keep train's labels for b and c (they used to become 0 and 1)."""
    root = _colour_folder(tmp_path / "data", {"train": ["a", "b", "c"], "val": ["b", "c", "d"]})
    train, test = splits.folder_splits(root)
    assert train.classes == test.classes == ["a", "b", "c", "d"]
    name_of = {n: test.classes[label] for n, label in zip(test.names, test.labels, strict=True)}
    assert all(name_of[n] == n.split("/")[0] for n in test.names)
    assert splits.class_coverage(train, test) == (["a"], ["d"])

    report = _eval("knn", str(run_dir), "--dataset", str(root), "--k", "1", cwd=tmp_path)
    assert report["classes_without_test_images"] == ["a"] and report["classes_without_training_images"] == ["d"]
    # b and c (6 of 9 test images) are found by their colour; d can never be: at most 66.7 %.
    assert report["results"]["100%"]["mean"] == pytest.approx(100 * 6 / 9, abs=0.1)
    result = subprocess.run(["msn-eval", "knn", str(run_dir), "--dataset", str(root), "--output",
                             str(tmp_path / "r.json"), "--no-cache"], capture_output=True, text=True, cwd=tmp_path)
    assert "warning: 1 class(es) have test images but no training images and cannot be predicted: d" in result.stderr


def test_results_go_next_to_the_model_and_are_never_overwritten_silently(tmp_path, run_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    args = ["knn", str(run), "--cache-dir", str(tmp_path / "cache")]
    with _chdir(tmp_path):
        assert evaluate.main(args) == 0
        out = run / "eval_knn_digits.json"
        captured = capsys.readouterr()
        assert f"wrote {out}" in captured.out
        assert "features" not in captured.err  # no progress bar drawn into a log (stderr is not a terminal)
        assert json.loads(out.read_text())["protocol"] == "knn"
        assert not (tmp_path / "results.json").exists()  # not the current directory
        before = out.read_text()
        assert evaluate.main(args) == 1
        assert capsys.readouterr().err.strip() == (
            f"msn-eval: error: {out} exists; pass --overwrite to replace it, or --output PATH")
        assert out.read_text() == before
        assert evaluate.main([*args, "--overwrite"]) == 0


def test_cli_on_fashion_mnist_idx_files(tmp_path, run_dir):
    """--dataset fashion_mnist reads the official split; a folder of idx files works the same way."""
    from tests.test_data import tiny_fashion_mnist

    root = tiny_fashion_mnist(tmp_path / "fmnist", n_train=30, n_test=20)
    report = _eval("lowshot", str(run_dir), "--dataset", str(root), "--shots", "1", "3", "--splits", "2",
                   "--fraction", "0", cwd=tmp_path)
    assert (report["train_images"], report["test_images"]) == (30, 20)
    assert set(report["results"]) == {"1", "3"} and report["classes_without_test_images"] == []
    train, test = splits.load_splits(str(root))
    assert train.classes[0] == "T-shirt/top" and test.labels.tolist() == [i % 10 for i in range(20)]
    assert evaluate.default_output(run_dir, "knn", "fashion_mnist").name == "eval_knn_fashion_mnist.json"


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Debian's dataset-fashion-mnist package (.ci/run installs it)")
def test_the_installed_fashion_mnist_is_the_official_split():
    train, test = splits.load_splits("fashion_mnist")
    assert (len(train.labels), len(test.labels)) == (60000, 10000)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert train.images[0].size == (28, 28)


def test_an_unreadable_image_in_a_worker_is_one_line(tmp_path, run_dir, folder_dataset):
    """The DataLoader worker's whole traceback used to be the message (torch re-raises a worker's error with
    its traceback as the text); now it is the original's one line, from the console script itself."""
    data = tmp_path / "data"
    shutil.copytree(folder_dataset, data)
    broken = data / "val" / "class_1" / "img2.png"
    broken.write_bytes(random.Random(7).randbytes(500))
    result = subprocess.run(["msn-eval", "knn", str(run_dir), "--dataset", str(data), "--num-workers", "1",
                             "--no-cache", "--output", str(tmp_path / "r.json")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"msn-eval: error: cannot read image {broken}: ")
    assert not (tmp_path / "r.json").exists()


def test_worker_error_keeps_the_type_and_the_first_line():
    from msn.errors import CheckpointError
    from msn.eval.evaluate import worker_error

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\nmsn.errors.DataError: cannot read image a.png: bad\n"
                        "second line of the message\n")
    error = worker_error(wrapped)
    assert type(error) is DataError and str(error) == "cannot read image a.png: bad"
    plain = CheckpointError("x.pt does not exist")
    assert worker_error(plain) is plain


def test_more_last_blocks_than_the_encoder_has_is_refused(tmp_path, run_dir, capsys):
    """The encoder's 4 blocks used to be concatenated for --last-blocks 9, recorded as 9."""
    capsys.readouterr()
    args = ["knn", str(run_dir), "--last-blocks", "9", "--no-cache", "--output", str(tmp_path / "r.json")]
    assert evaluate.main(args) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "msn-eval: error: --last-blocks 9: the encoder has 4 blocks; use --last-blocks up to 4"]
    assert not (tmp_path / "r.json").exists()


def test_the_monitors_lowshot_takes_fewer_images_where_a_class_has_fewer():
    """msn-eval refuses shots that a class cannot give (its table would claim them); the training monitor
    (allow_fewer, its registered default) uses what a class has, as it always did, rather than stop a run."""
    import torch

    from msn.eval.registry import EvalTask, get_protocol
    from msn.eval.splits import Split

    labels = np.array([0] * 8 + [1] * 3)
    features = torch.from_numpy(np.concatenate([np.eye(2)[labels] + 0.01 * np.arange(11)[:, None]])).float()
    split = Split(list(range(11)), labels, "toy", [str(i) for i in range(11)], ["a", "b"])
    task = EvalTask(None, split, split, splits=1, extract=lambda s: features)
    lowshot = get_protocol("lowshot")
    with pytest.raises(DataError, match="--shots 5: class b has only 3 training images"):
        lowshot.run(task, {"shots": [5], "fraction": 0})
    assert lowshot.monitor["allow_fewer"] is True
    results = lowshot.run(task, lowshot.monitor)
    assert list(results) == ["5"] and results["5"]["mean"] == 100.0


def test_subsample_split_is_stratified_exact_and_seeded():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    split = splits.Split(list(range(100)), labels, "toy", [str(i) for i in range(100)], ["a", "b", "c"])
    for count, per_class in ((3, [1, 1, 1]), (10, [5, 3, 2]), (99, [49, 30, 20]), (100, [50, 30, 20])):
        chosen = splits.subsample_split(split, count)
        assert np.bincount(chosen.labels).tolist() == per_class
        assert chosen.names == sorted(chosen.names, key=int) and len(set(chosen.names)) == count
        assert all(chosen.images[i] == int(name) for i, name in enumerate(chosen.names))
    assert splits.subsample_split(split, 10).names == splits.subsample_split(split, 10).names
    assert splits.subsample_split(split, 10).names != splits.subsample_split(split, 10, seed=1).names
    assert splits.subsample_split(split, 10).ident != split.ident  # its own feature-cache entry


def test_progress_is_a_line_per_stage_on_stdout_and_train_subset_uses_that_many(tmp_path, run_dir, folder_dataset,
                                                                                 capsys, monkeypatch):
    """msn-eval > log wrote nothing for minutes while the features of 60,000 images were computed; now each stage is
    a line on stdout (captured here, as in a file: no terminal), with counts, times and rates."""
    monkeypatch.setattr(features, "PROGRESS_EVERY_S", 0.0)  # a line after every batch: the in-between lines
    capsys.readouterr()
    data = str(folder_dataset)
    report = _eval("lowshot", str(run_dir), "--dataset", data, "--train-subset", "6", "--shots", "2", "--fraction",
                   "0", "--penalty", "1", "--batch-size", "2", cwd=tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert report["train_images"] == 6 and report["settings"]["train_subset"] == 6
    assert out[0] == f"encoder: {run_dir} (vit_pico, 4 blocks, 32 px) on cpu in fp32"
    assert out[1] == f"{data}: 6 of the 12 training images, 8 test images, 2 classes"
    assert out[2] == "features of the train split: 6 images through the encoder on cpu ..."
    assert [line.split(": ")[2].split(", ")[0] for line in out[3:5]] == ["2 done", "4 done"]
    assert all(line.endswith(" images/s") for line in out[3:5])
    assert out[5].startswith("features of the train split: 6 images done in ") and out[5].endswith(" images/s)")
    assert any(line.startswith("features of the test split: 8 images done in ") for line in out)
    assert "setting 2: 3 logistic regressions on 2 images per class ..." in out
    fitted = next(line for line in out if line.startswith("setting 2: ") and line.endswith(" s"))
    assert fitted.startswith(f"setting 2: {report['results']['2']['mean']:.2f} +- ")
    assert out[-1] == f"wrote {tmp_path / 'results.json'}"
    again = _eval("knn", str(run_dir), "--dataset", data, "--train-subset", "6", "--k", "3", cwd=tmp_path)
    out = capsys.readouterr().out  # the same subset: its features from the cache
    assert "features of the train split: 6 images, from the cache" in out and again["train_images"] == 6
    assert "setting 100%: 3-NN of 8 test images among 6 ..." in out


def test_a_subset_evaluation_never_replaces_the_full_splits_results(tmp_path):
    from msn.eval.evaluate import default_output, update_model_card

    run = tmp_path / "run"
    assert default_output(run / "checkpoints" / "last.pt", "lowshot", "digits").name == "eval_lowshot_digits.json"
    assert default_output(run / "checkpoints" / "last.pt", "lowshot", "digits", 500).name == \
        "eval_lowshot_digits-subset500.json"
    export = tmp_path / "export"
    export.mkdir()
    full = {"protocol": "lowshot", "dataset": "digits", "settings": {}, "results": {"1": {"mean": 50.0, "std": 1.0,
                                                                                        "splits": [0, 1, 2]}}}
    update_model_card(export, full)
    update_model_card(export, {**full, "settings": {"train_subset": 500},
                               "results": {"1": {"mean": 40.0, "std": 2.0, "splits": [0]}}})
    update_model_card(export, full)  # again, after the subset's: it replaces its own section only
    card = (export / "README.md").read_text()
    assert card.count("## Evaluation: ") == 2
    assert "## Evaluation: lowshot on digits\n\n| setting | top-1 (%) | splits |\n|---|---|---|\n| 1 | 50.00" in card
    assert "## Evaluation: lowshot on digits (a stratified subset of 500 training images)\n" in card


@pytest.mark.parametrize(("value", "message"), [
    ("0", "--train-subset 0 must be >= 1"),
    ("13", "--train-subset 13: the training split has 12 images; use --train-subset up to 12, or leave it out to "
           "use them all"),
    ("1", "--train-subset 1: the training split has 2 classes; use --train-subset 2 or more, so that every class "
          "keeps an image"),
    ("5 --subset-file s.txt", "--train-subset and --subset-file both choose the training images; give one of them"),
])
def test_a_bad_train_subset_is_one_line(tmp_path, run_dir, folder_dataset, capsys, value, message):
    (tmp_path / "s.txt").write_text("class_0/img0.png\n")
    with _chdir(tmp_path):
        assert evaluate.main(["lowshot", str(run_dir), "--dataset", str(folder_dataset), "--train-subset",
                              *value.split(), "--no-cache", "--output", str(tmp_path / "r.json")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"msn-eval: error: {message}"]
    assert not (tmp_path / "r.json").exists()
