"""msn-pretrain's answers before training starts are one line (issue 37): any exception of the pre-run check, a
folder Hydra cannot write, a YAML file that does not parse, an experiment file without its package header, a key
given twice, a brace pattern, a damaged or path-only Hugging Face dataset, a Ctrl-C during start-up; and run folder
names a person types without quotes.

In-process calls of ``main()`` (the refusals come before torch is needed), real files, a real read-only mount where
the machine allows one, and one real process for the Ctrl-C.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msn.cli.checks import check_overrides_once, sweep_jobs
from msn.cli.pretrain import main, quote_brace_ranges
from msn.errors import ConfigError, DataError
from msn.utils.runname import NAME_LIMIT, run_directory
from tests.conftest import compose_config

SMOKE = ["experiment=cpu_smoke", "logger.progress=false"]


def pretrain(args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """``msn-pretrain ARGS`` in this process, in ``cwd``: (exit code, stdout, stderr); a warning (Hydra's for a
    callback that raised) is printed on stderr, as a real process would."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["msn-pretrain", *args])
    capsys.readouterr()
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:  # Hydra's job logging binds handlers to this test's captured streams: later tests must not see them
            for lg, handlers, level, propagate, disabled in saved:
                lg.handlers[:], lg.propagate, lg.disabled = handlers, propagate, disabled
                lg.setLevel(level)
    out, err = capsys.readouterr()
    return code, out, err + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)


def one_line(code: int, err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("msn-pretrain: error: "), err
    assert "Traceback" not in err and "Warning" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_an_os_error_in_the_check_or_in_hydras_run_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """Hydra turns a callback's exception into a warning and runs on: a name too long for the file system
    (raised in the check) and a ``.hydra`` that is a file (raised by Hydra after it) each end in one line."""
    long_dir = tmp_path / ("x" * 300)
    code, _, err = pretrain([*SMOKE, f"hydra.run.dir={long_dir}"], tmp_path, monkeypatch, capsys)
    one_line(code, err, "File name too long", "shorten the path")
    run = tmp_path / "outputs" / "cpu_smoke"
    run.mkdir(parents=True)
    (run / ".hydra").write_text("not a folder")
    code, _, err = pretrain(SMOKE, tmp_path, monkeypatch, capsys)
    one_line(code, err, f"{run / '.hydra'}: File exists", "move it away")
    shutil.rmtree(run)
    (run / ".msn.lock").mkdir(parents=True)  # a lock note root cannot write either (chmod 000 does not stop root)
    code, _, err = pretrain(SMOKE, tmp_path, monkeypatch, capsys)
    one_line(code, err, ".msn.lock", "Is a directory")
    (tmp_path / "elsewhere").write_text("a file where the run's parent folder should be")
    code, _, err = pretrain([*SMOKE, f"hydra.run.dir={tmp_path / 'elsewhere' / 'run'}"], tmp_path, monkeypatch, capsys)
    one_line(code, err, "elsewhere")


@contextlib.contextmanager
def read_only_mount(folder: Path) -> Iterator[Path]:
    """A tmpfs mounted at ``folder`` for the block (the test remounts it read-only once it wrote what it needs);
    skipped where mounting is not allowed (a user without the right, a container without CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): no read-only file system to test")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch, capsys):
    """Continuing a run, and starting one, on a read-only file system: one line naming the folder."""
    with read_only_mount(tmp_path / "ro") as ro:
        run = ro / "outputs" / "cpu_smoke"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.pt").write_bytes(b"a checkpoint of an unfinished run")
        (run / "status.json").write_text('{"status": "stopped", "step": 3, "total_steps": 6}')
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        code, _, err = pretrain(SMOKE, ro, monkeypatch, capsys)
        one_line(code, err, "outputs/cpu_smoke", "Read-only file system")
        code, _, err = pretrain([*SMOKE, "optim.lr=0.01"], ro, monkeypatch, capsys)  # a new run in outputs/
        one_line(code, err, "Read-only file system")
        assert sorted(p.name for p in (ro / "outputs").iterdir()) == ["cpu_smoke"]


def test_a_yaml_syntax_error_and_a_missing_package_header_name_the_file(tmp_path, monkeypatch, capsys):
    experiments = tmp_path / "my_configs" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "broken.yaml").write_text("# @package _global_\noptim: {lr: 5e-4\n")
    (experiments / "headless.yaml").write_text("defaults:\n  - override /data: synthetic\noptim: {lr: 5e-4}\n")
    (experiments / "fine.yaml").write_text("\n# @package _global_\n# my run\ndefaults:\n  - /experiment/cpu_smoke\n")
    (experiments / "late.yaml").write_text("# my run\n# @package _global_\ndefaults:\n  - /experiment/cpu_smoke\n")
    code, _, err = pretrain(["--config-dir", "my_configs", "experiment=broken"], tmp_path, monkeypatch, capsys)
    one_line(code, err, "broken.yaml, line 3", "not valid YAML", "fix the file")
    code, _, err = pretrain(["--config-dir", "my_configs", "experiment=headless"], tmp_path, monkeypatch, capsys)
    one_line(code, err, "headless.yaml does not start with the line '# @package _global_'")
    code, _, err = pretrain([f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]", "experiment=headless"],
                            tmp_path, monkeypatch, capsys)
    one_line(code, err, "headless.yaml", "# @package _global_")
    code, out, _ = pretrain(["--config-dir=my_configs", "experiment=fine", "--cfg", "job"], tmp_path, monkeypatch,
                            capsys)
    assert code == 0 and "synthetic_size" in out  # blank lines may come first
    code, _, err = pretrain(["--config-dir", "my_configs", "experiment=late"], tmp_path, monkeypatch, capsys)
    one_line(code, err, "late.yaml does not start with")  # Hydra reads no header after another comment


def test_a_key_given_twice_is_refused(tmp_path, monkeypatch, capsys):
    code, _, err = pretrain([*SMOKE, "data.batch_size=4", "data.batch_size=8"], tmp_path, monkeypatch, capsys)
    one_line(code, err, "data.batch_size is given twice (data.batch_size=4 and data.batch_size=8)")
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(ConfigError, match=r"the shell expanded a brace pattern; quote it: "
                                          r"'data.shards=/x/shard-\{000008..000011\}.tar'"):
        check_overrides_once([f"data.shards=/x/shard-{i:06d}.tar" for i in range(8, 12)])
    check_overrides_once(["+monitor.options.k=10", "monitor.every_steps=5"])
    with pytest.raises(ConfigError, match=r"^optim.epochs is given 3 times \(optim.epochs=1 and optim.epochs=3\); "):
        check_overrides_once(["optim.epochs=1", "optim.epochs=2", "optim.epochs=3"])  # numbers: not the shell's
    with pytest.raises(ConfigError, match=r"quote it: 'data.shards=/x/\{0..1\}.tar'"):
        check_overrides_once(["data.shards=/x/0.tar", "data.shards=/x/1.tar"])  # a range of two


def test_brace_ranges_are_taken_as_typed(tmp_path, monkeypatch, capsys):
    """A webdataset pattern in single quotes for the shell reaches data.shards as typed, in a run and in a sweep."""
    pattern = "/x/shard-{000000..000099}.tar"
    code, out, _ = pretrain([*SMOKE, "data=webdataset", f"data.shards={pattern}", "--cfg", "job"], tmp_path,
                            monkeypatch, capsys)
    assert code == 0 and f"shards: {pattern}" in out
    quoted = quote_brace_ranges(["-m", f"data.shards={pattern},/y/{{0..9}}.tar", "data.batch_size=8,16"])
    jobs = sweep_jobs(quoted[1:])  # the jobs msn-pretrain -m runs (and checks first)
    shards = [compose_config(["data=webdataset", *job]).data.shards for job in jobs[::2]]
    assert shards == [pattern, "/y/{0..9}.tar"] and len(jobs) == 4
    assert quote_brace_ranges(["data.shards='/q/{0..1}.tar'", "--config-dir", "a=b"]) == \
        ["data.shards='/q/{0..1}.tar'", "--config-dir", "a=b"]


def test_run_folder_names_need_no_quotes_and_never_cut_a_value(tmp_path):
    name = Path(run_directory("o", None, "experiment=cpu_smoke,optim.lr=1e-3,optim.betas=[0.9,0.95]", None)).name
    assert name == "cpu_smoke_optim.lr-1e-3_optim.betas-0.9-0.95"
    many = ",".join(f"model.some_long_option_number_{i}=30" for i in range(8))
    long = Path(run_directory("o", None, f"{many},optim.max_steps=30", None)).name
    assert len(long) <= NAME_LIMIT and re.fullmatch(r"[A-Za-z0-9._+@-]+", long)
    kept, tail = long.rsplit("_", 1)
    assert re.fullmatch(r"\d+-more-[0-9a-f]{8}", tail) and kept.endswith("-30")  # whole items only
    other = Path(run_directory("o", None, f"{many},optim.max_steps=31", None)).name
    assert other != long
    for value in ("/data/x y/train", "a$b*c", "{k:10}", "'quoted'", "猫"):
        assert re.fullmatch(r"[A-Za-z0-9._+@-]+", Path(run_directory("o", None, f"k={value}", None)).name)
    assert Path(run_directory("o", "my run=1,2", None, None)).name.startswith("my_run_1_2-")
    # a run started with the earlier comma name is continued by the same command
    (tmp_path / "cpu_smoke,optim.lr=1e-3").mkdir()
    assert run_directory(str(tmp_path), None, "experiment=cpu_smoke,optim.lr=1e-3", None) == \
        str(tmp_path / "cpu_smoke,optim.lr=1e-3")
    (tmp_path / "lr=1e-3,b").mkdir()  # and so is one named by run_name=lr=1e-3,b then
    assert run_directory(str(tmp_path), "lr=1e-3,b", None, None) == str(tmp_path / "lr=1e-3,b")


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_damaged_parquet_file_and_a_column_of_paths_are_named_at_the_check(tmp_path):
    datasets = pytest.importorskip("datasets")
    from msn.data.sources.hf import check_hf_source

    images = datasets.Dataset.from_dict({"image": [{"bytes": _png(i), "path": None} for i in range(4)]},
                                        features=datasets.Features({"image": datasets.Image()}))
    (tmp_path / "good").mkdir()
    images.to_parquet(str(tmp_path / "good" / "train-0.parquet"))
    check_hf_source(str(tmp_path / "good"))
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "good", damaged)
    with open(damaged / "train-0.parquet", "r+b") as f:
        f.truncate(os.path.getsize(damaged / "train-0.parquet") // 2)
    with pytest.raises(DataError, match=r"train-0.parquet is not a readable parquet file .*download or write it"):
        check_hf_source(str(damaged))
    paths = datasets.Dataset.from_dict({"image": ["/x/a.png", "/x/b.png"]})
    (tmp_path / "paths").mkdir()
    paths.to_parquet(str(tmp_path / "paths" / "train.parquet"))
    paths.save_to_disk(str(tmp_path / "saved"))
    for folder in ("paths", "saved"):
        with pytest.raises(DataError, match=r"column image holds strings \(file paths\?\), not images; .*cast_column"):
            check_hf_source(str(tmp_path / folder))


def test_one_ctrl_c_during_start_up_says_nothing_was_trained(tmp_path):
    """A real process interrupted while it imports torch (after Hydra made the run folder): it says what it did,
    exits 130, and leaves no folder behind."""
    out = tmp_path / "out.txt"
    run = tmp_path / "outputs" / "cpu_smoke"
    with open(out, "w") as sink:
        # SIGINT as a terminal gives it: default in the child, whatever an earlier test left in this process
        proc = subprocess.Popen(["msn-pretrain", *SMOKE], cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while not (run / ".hydra" / "config.yaml").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        when = "while it ran" if proc.poll() is None else "after it had ended"  # (a failure then is the test's)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    said = out.read_text()
    assert code == 130, f"Ctrl-C sent {when}:\n{said}"
    assert "stopped by Ctrl-C before training started: nothing was trained" in said and "second" not in said
    assert "Traceback" not in said and not run.exists()


def test_a_ctrl_c_that_a_library_swallows_during_start_up_still_stops_the_run(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt raised inside a ``__del__`` or a bare ``except:`` while torch imports is lost to Python;
    the run must still stop before its first step, as for any Ctrl-C during start-up."""
    import types

    import msn.train.signals as real

    class Swallows(types.ModuleType):
        """msn.train.signals, whose import is where a Ctrl-C lands and is swallowed."""

        def __getattr__(self, name: str):
            return getattr(real, name)

        @property
        def StopRequest(self):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)  # the handler runs here
            except BaseException:  # what the interpreter does with an exception raised in __del__
                pass
            return real.StopRequest

    monkeypatch.setitem(sys.modules, "msn.train.signals", Swallows("msn.train.signals"))
    code, out, err = pretrain(SMOKE, tmp_path, monkeypatch, capsys)
    assert code == 130, out + err
    assert "stopped by Ctrl-C before training started: nothing was trained" in err, err
    assert not (tmp_path / "outputs" / "cpu_smoke").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # as this process had it
