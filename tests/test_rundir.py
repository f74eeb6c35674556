"""msn.rundir: which file a MODEL / SOURCE / resume names, and the run's status file (no torch needed)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from msn.errors import CheckpointError
from msn.utils.rundir import check_model, read_status, resolve_resume, source_file, write_status


def _run_with_checkpoint(root):
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"PK")  # the name is what counts here, not the content
    return run


def test_source_file_resolves_a_run_directory_and_names_what_is_missing(tmp_path):
    run = _run_with_checkpoint(tmp_path)
    assert source_file(run) == run / "checkpoints" / "last.pt"
    assert source_file(run / "checkpoints" / "last.pt") == run / "checkpoints" / "last.pt"
    original = tmp_path / "vits16_800ep.pth.tar"
    original.write_bytes(b"\x80")
    assert source_file(original) == original
    with pytest.raises(CheckpointError, match=r"nothing\.pt does not exist; give a training checkpoint"):
        source_file(tmp_path / "nothing.pt")
    started = tmp_path / "started"  # a run that has not written a checkpoint yet
    started.mkdir()
    with pytest.raises(CheckpointError, match=r"started is a folder without checkpoints/last\.pt"):
        source_file(started)


def test_check_model_accepts_an_hf_export_and_says_so_when_refusing_a_folder(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(CheckpointError, match=r"or a Hugging Face ViTMSN export, which has config\.json"):
        check_model(hf)
    (hf / "config.json").write_text("{}")
    check_model(hf)  # msn-eval and msn-viz attention read exports
    with pytest.raises(CheckpointError, match="hf is a folder without checkpoints/last.pt"):
        check_model(hf, hf=False)
    check_model(_run_with_checkpoint(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        check_model(tmp_path / "typo")


def test_resolve_resume(tmp_path):
    run = _run_with_checkpoint(tmp_path)
    last = run / "checkpoints" / "last.pt"
    assert resolve_resume(None, run) is None
    assert resolve_resume("auto", run) == last
    assert resolve_resume("auto", tmp_path / "fresh") is None  # nothing yet: a fresh start
    assert resolve_resume(str(run), tmp_path / "other") == last  # another run's directory
    assert resolve_resume(str(last), tmp_path / "other") == last
    with pytest.raises(CheckpointError, match=r"resume=.*missing\.pt: no checkpoint found"):
        resolve_resume(str(tmp_path / "missing.pt"), run)


def test_status_round_trip_and_unreadable_files(tmp_path):
    write_status(tmp_path, "stopped", 40, 100)
    status = read_status(tmp_path)
    assert status == {"status": "stopped", "step": 40, "total_steps": 100, "checkpoint": "checkpoints/last.pt",
                      "host": socket.gethostname(), "pid": os.getpid()}
    assert json.loads((tmp_path / "status.json").read_text()) == status
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed
    (tmp_path / "status.json").write_text("{half")
    assert read_status(tmp_path) is None
    (tmp_path / "status.json").write_text("[1, 2]")
    assert read_status(tmp_path) is None
    assert read_status(tmp_path / "no_run") is None
