"""Every bad input a user can give the command-line tools: exit code 1 and one line naming the problem.

Table-driven: each case builds its bad input in a temporary folder, runs the real console script and
checks the exit code, that stderr is exactly one ``<tool>: error: ...`` line without a traceback, and
the words that name the problem. Then the failure modes that lose work: a full disk, permissions,
temporary files left by kill -9.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import msn.cli.evaluate
import msn.cli.export
from msn.errors import MSNError
from msn.train import train
from msn.weights.checkpoint import CheckpointError, save_checkpoint
from msn.weights.export import export_hf
from msn.weights.read import read_source
from tests.conftest import compose_config

SMOKE = ["experiment=cpu_smoke", "logger.progress=false"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("smoke")
    train(compose_config([*SMOKE, f"run_dir={run}", "optim.max_steps=2"]))
    return run


@pytest.fixture(scope="module")
def hf_folder(smoke_run, tmp_path_factory) -> Path:
    return export_hf(read_source(smoke_run), tmp_path_factory.mktemp("exports") / "hf")


def _copy_hf(hf: Path, tmp: Path) -> Path:
    out = tmp / "hf"
    shutil.copytree(hf, out)
    return out


def _noise(n: int) -> bytes:
    """``n`` random bytes, the same on every run: os.urandom's started with a pickle's 0x80 one run in 256,
    which is refused by another (equally clear) message than the one these cases expect."""
    return random.Random(n).randbytes(n)


def _images(tmp: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp / "data" / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp / "data" / split / c /
                                                                                        f"{i}.png")
    return tmp / "data"


def _garbled(root: Path) -> Path:
    """``root`` with one test image replaced by noise."""
    (root / "val" / "b" / "1.png").write_bytes(_noise(300))
    return root


def _file(tmp: Path, name: str, content: bytes | Callable[[Path], None]) -> Path:
    path = tmp / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return path


def _jpeg(path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path, format="JPEG")


# (id, tool, arguments given the temporary folder and the fixtures, words the one line must contain)
CASES: list[tuple[str, str, Callable[..., list[str]], str]] = [
    ("batch of one", "msn-pretrain", lambda t, r, h: [*SMOKE, "data.batch_size=1"],
     "the head's BatchNorm needs at least 2 images"),
    ("last batch of one", "msn-pretrain", lambda t, r, h: [*SMOKE, "data.drop_last=false", "data.batch_size=7"],
     "the last batch of every epoch holds 1 image (64 images, data.batch_size=7)"),
    ("one prototype", "msn-pretrain", lambda t, r, h: [*SMOKE, "model.num_prototypes=1"],
     "with a single prototype every prediction is certain"),
    ("resume with another model", "msn-pretrain",
     lambda t, r, h: [*SMOKE, "model.head_output_dim=32", f"resume={r / 'checkpoints' / 'last.pt'}"],
     "does not match the configured architecture: different shapes"),
    ("resume from random bytes", "msn-pretrain",
     lambda t, r, h: [*SMOKE, f"resume={_file(t, 'random.pt', _noise(2048))}"], "is not a checkpoint"),
    ("resume from a JPEG", "msn-pretrain", lambda t, r, h: [*SMOKE, f"resume={_file(t, 'photo.pt', _jpeg)}"],
     "is not a checkpoint"),
    ("resume from a text file", "msn-pretrain",
     lambda t, r, h: [*SMOKE, f"resume={_file(t, 'notes.pt', b'step 100 was fine')}"], "is not a checkpoint"),
    ("resume from a crafted dict", "msn-pretrain",
     lambda t, r, h: [*SMOKE, f"resume={_file(t, 'crafted.pt', lambda p: torch.save({'format': 'msn-train-v1'}, p))}"],
     "incomplete msn training checkpoint (missing model, optimizer, step, config)"),
    ("export a crafted training dict", "msn-export",
     lambda t, r, h: [str(_file(t, "c.pt", lambda p: torch.save({"format": "msn-train-v1", "model": {}}, p))),
                      str(t / "out")], "incomplete msn training checkpoint"),
    ("export an original dict without a ViT", "msn-export",
     lambda t, r, h: [str(_file(t, "o.pth.tar", lambda p: torch.save(
         {"encoder": {"fc.fc1.weight": torch.zeros(2, 2)}, "target_encoder": {"fc.fc1.weight": torch.zeros(2, 2)},
          "prototypes": torch.zeros(4, 2)}, p))), str(t / "out")], "is not an original MSN ViT checkpoint (no target"),
    ("export over a regular file", "msn-export",
     lambda t, r, h: [str(r), str(_file(t, "taken.txt", b"a file"))], "is a file; OUT must be a folder"),
    ("export from random bytes", "msn-export",
     lambda t, r, h: [str(_file(t, "random.pt", _noise(512))), str(t / "out")], "is not a checkpoint"),
    ("eval: malformed config.json", "msn-eval",
     lambda t, r, h: ["knn", str(_break(_copy_hf(h, t), "config.json", b"{not json"))],
     "config.json is not a valid ViTMSN config"),
    ("eval: config.json without sizes", "msn-eval",
     lambda t, r, h: ["knn", str(_break(_copy_hf(h, t), "config.json", b'{"model_type": "vit_msn"}'))],
     "config.json is not a valid ViTMSN config (KeyError"),
    ("eval: malformed preprocessor_config.json", "msn-eval",
     lambda t, r, h: ["knn", str(_break(_copy_hf(h, t), "preprocessor_config.json", b'{"image_mean": [1, 2]}'))],
     "preprocessor_config.json is not a valid preprocessor config"),
    ("eval: missing model.safetensors", "msn-eval",
     lambda t, r, h: ["knn", str(_break(_copy_hf(h, t), "model.safetensors", None))],
     "model.safetensors does not exist"),
    ("eval: corrupt model.safetensors", "msn-eval",
     lambda t, r, h: ["knn", str(_break(_copy_hf(h, t), "model.safetensors", _noise(300)))],
     "model.safetensors is not a readable safetensors file"),
    ("eval: an unreadable image read by a DataLoader worker", "msn-eval",
     lambda t, r, h: ["knn", str(h), "--dataset", str(_garbled(_images(t))), "--num-workers", "1"],
     "cannot read image "),
    ("eval: more shots than images", "msn-eval",
     lambda t, r, h: ["lowshot", str(h), "--dataset", str(_images(t)), "--shots", "100"],
     "--shots 100: class a has only 3 training images; use --shots up to 3"),
]


def _break(folder: Path, name: str, content: bytes | None) -> Path:
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content)
    return folder


def _run(tool: str, args: list[str], cwd: Path, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``tool``. msn-export and msn-eval run in this process through their own
    ``main`` (the console scripts' entry points); msn-pretrain's errors come from ``train``, whose Hydra
    wrapper prints ``msn-pretrain: error: <message>`` for exactly these exception types (the wrapper itself
    is run as a real process in test_pretrain_wrapper_prints_the_one_line)."""
    if tool == "msn-pretrain":
        try:
            train(compose_config([*args, f"run_dir={cwd / 'run'}"]))
        except MSNError as e:
            return 1, f"msn-pretrain: error: {e}\n"
        return 0, ""
    module = {"msn-export": msn.cli.export, "msn-eval": msn.cli.evaluate}[tool]
    capsys.readouterr()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = module.main(args)
    finally:
        os.chdir(old)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, tmp_path, smoke_run, hf_folder, capsys):
    _, tool, make_args, words = case
    args = make_args(tmp_path, smoke_run, hf_folder)
    if tool == "msn-eval":
        args = [*args, "--output", str(tmp_path / "results.json"), "--cache-dir", str(tmp_path / "cache")]
    code, err = _run(tool, args, tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), err
    assert words in lines[0]
    assert "Traceback" not in err and "weights_only" not in err


@pytest.mark.parametrize("override,words", [
    ("model.num_prototypes=1", "with a single prototype"),  # refused by the pre-run check
    ("data.drop_last=false data.batch_size=7", "the last batch of every epoch holds 1 image"),  # by train()
])
def test_pretrain_wrapper_prints_the_one_line(tmp_path, override, words):
    result = subprocess.run(["msn-pretrain", *SMOKE, *override.split(), f"hydra.run.dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("msn-pretrain: error: "), lines
    assert words in lines[0]


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.zeros(1000)})
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 100)  # part of the file, then the device is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(1000)})
    message = str(err.value)
    assert message.startswith(f"could not write checkpoint {path} (the previous file is intact): No space left")
    assert "it needs about 0 MiB and" in message and "MiB are free" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_checkpoints_get_the_usual_file_mode(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's owner-only 0600


def test_temporary_files_of_an_interrupted_save_are_removed_at_start(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = run / "checkpoints" / ".last.pt.k2j3h4.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = run / "checkpoints" / "notes.tmp"  # not ours: left alone
    other.write_bytes(b"")
    train(compose_config([*SMOKE, f"run_dir={run}", "optim.max_steps=1"]))
    assert not stale.exists() and other.exists()
    assert "removed .last.pt.k2j3h4.tmp, left by an interrupted checkpoint write" in caplog.text
    assert json.loads((run / "run.json").read_text())["total_steps"] == 1
