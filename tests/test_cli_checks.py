"""What every command checks before any work: its numbers, a place it can write its output to, and (msn-export)
a target that is neither the source nor a run. Each refusal is one line, exit code 1, and comes before torch
is imported (a fresh interpreter runs the commands and tells which heavy packages got imported).

This module imports no torch at its top: the fresh interpreter imports its tables.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAINS = {"msn-eval": "msn.cli.evaluate", "msn-viz": "msn.cli.viz", "msn-bench": "msn.cli.bench",
         "msn-shards": "msn.cli.shards", "msn-export": "msn.cli.export"}

# (command, arguments, words the one line must hold). MODEL, RUN and SRC name nothing: the numbers are checked
# before anything else is looked at.
NUMBER_CASES: list[tuple[str, list[str], str]] = [
    ("msn-eval", ["knn", "model", "--temperature", "0"], "--temperature 0 must be > 0"),
    ("msn-eval", ["knn", "model", "--temperature", "nan"], "--temperature nan must be a finite number > 0"),
    ("msn-eval", ["knn", "model", "--temperature=-inf"], "--temperature -inf must be a finite number > 0"),
    ("msn-eval", ["knn", "model", "--k", "0"], "--k 0 must be >= 1"),
    ("msn-eval", ["knn", "model", "--batch-size", "0"], "--batch-size 0 must be >= 1"),
    ("msn-eval", ["knn", "model", "--num-workers", "-1"], "--num-workers -1 must be >= 0"),
    ("msn-eval", ["linear", "model", "--epochs", "0"], "--epochs 0 must be >= 1"),
    ("msn-eval", ["linear", "model", "--lr", "0"], "--lr 0 must be > 0"),
    ("msn-eval", ["linear", "model", "--lr", "inf"], "--lr inf must be a finite number > 0"),
    ("msn-eval", ["finetune", "model", "--lr", "nan"], "--lr nan must be a finite number > 0"),
    ("msn-eval", ["lowshot", "model", "--penalty", "0"], "--penalty 0 must be > 0"),
    ("msn-eval", ["lowshot", "model", "--penalty", "nan"], "--penalty nan must be a finite number > 0"),
    ("msn-eval", ["lowshot", "model", "--shots", "1", "0"], "--shots 0 must be >= 1"),
    ("msn-eval", ["lowshot", "model", "--splits", "0"], "--splits 0 must be >= 1"),
    ("msn-eval", ["lowshot", "model", "--fraction", "1"], "--fraction 1 must lie in [0, 1)"),
    ("msn-eval", ["lowshot", "model", "--fraction", "-0.5"], "--fraction -0.5 must lie in [0, 1)"),
    ("msn-eval", ["lowshot", "model", "--fraction", "nan"], "--fraction nan must be a finite number in [0, 1)"),
    ("msn-eval", ["knn", "model", "--last-blocks", "0"], "--last-blocks 0 must be >= 1"),
    ("msn-eval", ["knn", "model", "--crop-pct", "0"], "--crop-pct=0.0 must lie in (0, 1]"),
    ("msn-eval", ["knn", "model", "--crop-pct", "1.5"], "--crop-pct=1.5 must lie in (0, 1]"),
    ("msn-eval", ["knn", "model", "--crop-pct", "nan"], "--crop-pct=nan must lie in (0, 1]"),
    ("msn-viz", ["views", "run", "--step", "-1", "--out", "v.png"], "--step -1 must be >= 0"),
    ("msn-viz", ["views", "run", "--count", "0", "--out", "v.png"], "--count 0 must be >= 1"),
    ("msn-viz", ["views", "run", "--cell", "4", "--out", "v.png"], "--cell 4 must be >= 8"),
    ("msn-viz", ["attention", "model", "--count", "-2", "--out", "a.png"], "--count -2 must be >= 1"),
    ("msn-viz", ["attention", "model", "--cell", "7", "--out", "a.png"], "--cell 7 must be >= 8"),
    ("msn-viz", ["attention", "model", "--crop-pct", "nan", "--out", "a.png"], "--crop-pct=nan must lie in (0, 1]"),
    ("msn-viz", ["curves", "run", "--size", "99", "600", "--out", "c.png"], "--size 99 must be >= 100"),
    ("msn-viz", ["prototypes", "run", "--limit", "0", "--out", "p.png"], "--limit 0 must be >= 1"),
    ("msn-viz", ["prototypes", "run", "--show", "0", "--out", "p.png"], "--show 0 must be >= 1"),
    ("msn-viz", ["prototypes", "run", "--per-prototype", "0", "--out", "p.png"], "--per-prototype 0 must be >= 1"),
    ("msn-viz", ["prototypes", "run", "--size", "800", "50", "--out", "p.png"], "--size 50 must be >= 100"),
    ("msn-viz", ["prototypes", "run", "--crop-pct", "2", "--out", "p.png"], "--crop-pct=2.0 must lie in (0, 1]"),
    ("msn-bench", ["step", "--steps", "0"], "--steps 0 must be >= 1"),
    ("msn-bench", ["step", "--warmup", "-1"], "--warmup -1 must be >= 0"),
    ("msn-bench", ["e2e", "--steps", "0"], "--steps 0 must be >= 1"),
    ("msn-bench", ["e2e", "--warmup", "0"], "--warmup 0 must lie between 0 and --steps 60"),
    ("msn-bench", ["e2e", "--steps", "10", "--warmup", "10"], "--warmup 10 must lie between 0 and --steps 10"),
    ("msn-bench", ["data", "--seconds", "0"], "--seconds 0 must be > 0"),
    ("msn-bench", ["data", "--seconds", "inf"], "--seconds inf must be a finite number > 0"),
    ("msn-bench", ["data", "--seconds", "nan"], "--seconds nan must be a finite number > 0"),
    ("msn-bench", ["data", "--workers", "-1"], "--workers -1 must be >= 0"),
    ("msn-bench", ["data", "--threads", "0"], "--threads 0 must be >= 1"),
    ("msn-bench", ["jpegs", "0", "out"], "N 0 must be >= 1"),
    ("msn-shards", ["src", "out", "--per-shard", "0"], "--per-shard 0 must be >= 1"),
]


def run_main(command: str, args: list[str]) -> tuple[int, str]:
    """Exit code and stderr of ``command ARGS`` through its console entry point, in this process."""
    main = importlib.import_module(MAINS[command]).main
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def check_one_line(command: str, code: int | str | None, err: str, words: str) -> None:
    lines = err.strip().splitlines()
    assert code not in (0, None), (command, code, err)
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), err
    assert words in lines[0], (words, lines[0])


@pytest.mark.parametrize(("command", "args", "words"), NUMBER_CASES,
                         ids=[f"{c} {' '.join(a)}" for c, a, _ in NUMBER_CASES])
def test_a_number_out_of_range_is_one_line(command, args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(command, args)
    check_one_line(command, code, err, words)
    assert code == 1 and list(tmp_path.iterdir()) == []  # nothing written


# Runs CASES (a JSON list of [command, args, words]) in a fresh interpreter, where torch is not yet imported:
# prints each one's exit code and stderr, then the heavy packages imported.
_FRESH = r"""
import json, sys
from tests.test_cli_checks import run_main
results = [run_main(command, args) for command, args, _ in json.loads(sys.argv[1])]
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "timm", "transformers"})
print(json.dumps({"results": results, "heavy": heavy}))
"""


def run_fresh(cases: list[tuple[str, list[str], str]], cwd: Path) -> list[str]:
    """Run ``cases`` in a fresh interpreter in ``cwd``, check each is one line naming its words, and return the
    heavy packages that got imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(cases)], capture_output=True, text=True,
                            timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for (command, _, words), (code, err) in zip(cases, report["results"], strict=True):
        check_one_line(command, code, err, words)
    return report["heavy"]


def test_numbers_are_refused_before_torch_is_imported(tmp_path):
    assert run_fresh(NUMBER_CASES, tmp_path) == []


def fake_run(path: Path) -> Path:
    """A run directory as the torch-free checks see it: checkpoints/last.pt (empty: never loaded) and status.json."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "last.pt").write_bytes(b"")
    (path / "status.json").write_text('{"status": "finished", "step": 2, "total_steps": 2}\n')
    (path / "metrics.csv").write_text("step,loss\n1,5.0\n2,4.0\n")
    return path


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made unwritable for this process: mode 0555, and for root (whom modes do not stop) the
    immutable attribute; skips the test where neither works."""
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a folder read-only here (root, without chattr +i)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_an_unwritable_output_is_refused_before_the_work(tmp_path):
    """msn-eval used to compute everything, then die writing its JSON; now each command looks at the folder
    its output goes to first (and neither torch nor the work is started)."""
    source = fake_run(tmp_path / "source")
    images = tmp_path / "images" / "c"
    images.mkdir(parents=True)
    (images / "0.png").write_bytes(b"")
    ro = fake_run(tmp_path / "ro")  # a run directory of its own: msn-eval's default output goes into it
    cases = [
        ("msn-eval", ["knn", str(source), "--output", str(ro / "r.json"), "--no-cache"],
         f"cannot write {ro / 'r.json'}: {ro} is not writable; pass --output PATH"),
        ("msn-eval", ["knn", str(ro), "--no-cache"], f"{ro} is not writable; pass --output PATH"),
        ("msn-eval", ["knn", str(source), "--output", str(tmp_path / "r.json"), "--cache-dir", str(ro / "cache")],
         f"{ro} is not writable; pass --cache-dir DIR you can write to, or --no-cache"),
        ("msn-export", [str(source), str(ro / "hf")], f"cannot write {ro / 'hf'}: {ro} is not writable"),
        ("msn-export", [str(source), str(ro / "new" / "m.pth.tar"), "--format", "msn"], f"{ro} is not writable"),
        ("msn-viz", ["curves", str(source), "--out", str(ro / "c.png")], f"{ro} is not writable; pass --out"),
        ("msn-shards", [str(tmp_path / "images"), str(ro / "shards")], f"{ro} is not writable"),
        ("msn-bench", ["jpegs", "4", str(ro / "jpegs")], f"{ro} is not writable"),
    ]
    before = sorted(ro.rglob("*"))
    with read_only(ro):
        assert run_fresh(cases, tmp_path) == []
    assert sorted(ro.rglob("*")) == before


def test_a_file_where_a_folder_is_needed_is_refused(tmp_path):
    source = fake_run(tmp_path / "source")
    (tmp_path / "notes.txt").write_text("a file")
    cases = [
        ("msn-eval", ["knn", str(source), "--output", str(tmp_path / "notes.txt" / "r.json")],
         f"{tmp_path / 'notes.txt'} is a file, not a folder; pass --output PATH"),
        ("msn-eval", ["knn", str(source), "--output", str(tmp_path), "--overwrite"], "is a folder; give the file"),
        ("msn-viz", ["curves", str(source), "--out", str(tmp_path / "notes.txt" / "c.png")], "is a file, not a folder"),
        ("msn-export", [str(source), str(tmp_path / "notes.txt"), "--format", "msn"],
         "is a file; OUT must be a folder or a file ending in .pth.tar"),
    ]
    assert run_fresh(cases, tmp_path) == []


def test_export_refuses_its_source_and_runs_before_importing_torch(tmp_path):
    """msn-export RUN RUN --overwrite wrote an hf export into the run, which then read as an export; an existing
    OUT took the seconds of importing torch and loading the weights to be refused."""
    run = fake_run(tmp_path / "runs" / "a")
    other = fake_run(tmp_path / "runs" / "b")
    original = tmp_path / "vit.pth.tar"
    original.write_bytes(b"")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("a user's file")
    (full / "msn.pth.tar").write_bytes(b"an earlier export")
    cases = [
        ("msn-export", [str(run), str(run), "--overwrite"], f"OUT {run} is SOURCE itself"),
        ("msn-export", [str(run), str(run), "--format", "msn", "--overwrite"], f"OUT {run} is SOURCE itself"),
        ("msn-export", [str(run / "checkpoints" / "last.pt"), str(run), "--overwrite"],
         f"OUT {run} is the run directory or checkpoint of SOURCE"),
        ("msn-export", [str(other), str(run / "checkpoints" / "last.pt"), "--format", "msn", "--overwrite"],
         "is the checkpoints folder of the run"),
        ("msn-export", [str(original), str(original), "--format", "msn", "--overwrite"], "is SOURCE itself"),
        ("msn-export", [str(other), str(run), "--overwrite"], f"{run} is a run directory (it has checkpoints/"),
        ("msn-export", [str(other), str(run), "--format", "timm", "--overwrite"], f"{run} is a run directory"),
        ("msn-export", [str(other), str(tmp_path / "runs"), "--overwrite"],
         f"{tmp_path / 'runs'} holds the run directory {run}; export into a folder of its own"),
        ("msn-export", [str(other), str(tmp_path), "--overwrite"], "holds the run directory"),
        ("msn-export", [str(run), str(full)], f"{full} exists and is not empty; choose another OUT or pass "
                                              "--overwrite"),
        ("msn-export", [str(run), str(full / "msn.pth.tar"), "--format", "msn"],
         f"{full / 'msn.pth.tar'} exists; choose another OUT or pass --overwrite"),
    ]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert run_fresh(cases, tmp_path) == []
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_the_number_rules():
    from msn.errors import ConfigError
    from msn.utils.arguments import check_number

    for value, rule in ((1, ">= 1"), (0, ">= 0"), (1e-9, "> 0"), (0.0, "[0, 1)"), (1.0, "(0, 1]"), (None, "> 0")):
        check_number("--x", value, rule)
    for value, rule in ((0, ">= 1"), (0.0, "> 0"), (1.0, "[0, 1)"), (0.0, "(0, 1]"), (float("nan"), ">= 0"),
                        (float("inf"), "> 0"), (-float("inf"), "[0, 1)")):
        with pytest.raises(ConfigError, match=r"^--x "):
            check_number("--x", value, rule)
    with pytest.raises(ValueError, match="unknown rule"):
        check_number("--x", 1, "positive")
