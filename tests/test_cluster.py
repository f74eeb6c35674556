"""What clusters do to runs, done to real processes (gloo on the CPU, real torchrun agents, real signals).

kill -9 and an immediate rerun (the dead trainer's loader workers die with it); the lock file deleted under a
running trainer and a second launch; ``torchrun --max-restarts=1`` with a worker killed mid-epoch; two torchrun
agents with ``--nnodes=2`` and a c10d rendezvous; a rank frozen with SIGSTOP; a run continued on another number of
processes. Faults are injected by ``tests/faults.py`` into the process itself (the signal a cluster would send).
Outputs go to files, never to pipes: a pipe would make the test wait for orphaned loader workers, which the
user's shell does not.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from msn.errors import CheckpointError, ConfigError
from msn.train import train
from msn.utils.runlock import LOCK_FILE, acquire_run_lock, release_run_lock
from msn.weights.checkpoint import load_checkpoint
from tests.conftest import compose_config, metrics_rows
from tests.dist_utils import clean_env, free_port, run_distributed

FAULTS = Path(__file__).with_name("faults.py")
SMOKE = ["experiment=cpu_smoke", "logger.progress=false"]
# 8 steps with last.pt after every one: a fault at any step leaves the step before it on disk.
EVERY_STEP = [*SMOKE, "optim.max_steps=8", "optim.epochs=10", "checkpoint.last_every_steps=1",
              "checkpoint.every_steps=0"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        torch.testing.assert_close(b[key], tensor, atol=0, rtol=0, msg=f"{what}: {key}")


def _launch(cmd: list[str], cwd: Path, log: str, fault: str | None = None, **env: str) -> subprocess.Popen:
    """Start ``cmd`` with its output in ``cwd/log.out`` and ``cwd/log.err`` (files, not pipes); tests/faults.py
    notes its fault and first steps in ``cwd/events``."""
    environ = {**clean_env(), "MSN_TEST_FAULT_LOG": str(cwd / "events"), **env}
    if fault:
        environ["MSN_TEST_FAULT"] = fault
    with open(cwd / f"{log}.out", "w") as out, open(cwd / f"{log}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=environ)


def _errors(cwd: Path, log: str) -> list[str]:
    return [line for line in (cwd / f"{log}.err").read_text().splitlines() if line.startswith("msn-pretrain: ")]


def _since_fault(cwd: Path, event: str | None = "first-step 0") -> float:
    """Seconds from the fault tests/faults.py noted to the first ``event`` after it (None: to now)."""
    events = [line.rsplit(" ", 1) for line in (cwd / "events").read_text().splitlines()]
    fault = next(float(t) for what, t in events if what == "fault")
    if event is None:
        return time.time() - fault
    return min(float(t) for what, t in events if what == event and float(t) > fault) - fault


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (a run folder's unique path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _torchrun(*args: str, restarts: int = 0) -> list[str]:
    """One torchrun agent of 2 processes running tests/faults.py (msn-pretrain with a fault)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            f"--max-restarts={restarts}", str(FAULTS), *args]


# ------------------------------------------------------------------------------------------------------ the lock
def test_kill_9_then_the_same_command_resumes_at_once_and_no_loader_worker_lingers(tmp_path):
    """kill -9 of a trainer with 2 loader workers, then the same command at once: the workers die with their trainer
    (Linux kills them: PR_SET_PDEATHSIG; PyTorch's own watchdog left them for seconds, or for ever when a batch was
    stuck in the queue's pipe) and hold no lock (forked children close theirs), so the rerun resumes from the last
    checkpoint, bit-identical to a run that was never killed."""
    full = tmp_path / "full"
    train(compose_config([*EVERY_STEP, "data.num_workers=0", f"run_dir={full}"]))

    run_dir = tmp_path / "killed"
    args = [*EVERY_STEP, "data.num_workers=2", f"hydra.run.dir={run_dir}"]
    killed = _launch([sys.executable, str(FAULTS), *args], tmp_path, "killed", fault="0:6:KILL")
    assert killed.wait(timeout=300) == -9, (tmp_path / "killed.err").read_text()[-2000:]
    deadline = time.monotonic() + 1.0  # the kernel's SIGKILL, then init reaps them
    while _processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_mentioning(str(run_dir)), "the killed trainer's loader workers outlived it"
    again = _launch([sys.executable, str(FAULTS), *args], tmp_path, "again")  # msn-pretrain, no fault this time
    assert again.wait(timeout=300) == 0, (tmp_path / "again.err").read_text()[-2000:]
    print(f"\nkill -9 -> the same command training again: {_since_fault(tmp_path):.1f} s")
    assert "resumed from" in (tmp_path / "again.out").read_text()
    _assert_identical(_weights(full), _weights(run_dir), "killed and resumed")
    assert [r["loss"] for r in metrics_rows(run_dir)] == [r["loss"] for r in metrics_rows(full)]


@contextlib.contextmanager
def _trainer_stopped_with_its_lock_file_deleted(tmp_path: Path, args: list[str]) -> Iterator[subprocess.Popen]:
    """A trainer of ``args`` that stops itself (SIGSTOP) in step 4, after the checkpoint of step 3; its ``.msn.lock``
    is deleted and a second launch of the same command must be refused in one line, writing nothing (the lock is the
    folder's). Yields the stopped trainer; continues it (SIGCONT) on the way out."""
    run_dir = Path(args[-1].split("=", 1)[1])
    trainer = _launch([sys.executable, str(FAULTS), *args], tmp_path, "trainer", fault="0:4:STOP")
    try:
        deadline = time.monotonic() + 240
        while _state(trainer.pid) != "T":
            assert trainer.poll() is None and time.monotonic() < deadline, (tmp_path / "trainer.err").read_text()
            time.sleep(0.2)
        (run_dir / LOCK_FILE).unlink()
        started = time.monotonic()
        second = _launch(["msn-pretrain", *args], tmp_path, "second")
        assert second.wait(timeout=120) == 1
        print(f"\nlock file deleted: the second launch refused in {time.monotonic() - started:.1f} s")
        errors = _errors(tmp_path, "second")
        assert errors == [f"msn-pretrain: error: {run_dir} is being trained right now by another process; wait for "
                          "it to stop, or pass run_name=NEW_NAME for a separate run"], errors
        assert not (run_dir / LOCK_FILE).exists()  # the refused launch wrote nothing
        yield trainer
    finally:
        os.kill(trainer.pid, signal.SIGCONT)


@pytest.mark.slow  # the default suite deletes the lock file in the test below, with the same trainer
def test_a_deleted_lock_file_still_excludes_a_second_launch(tmp_path):
    """The lock is on the run folder: deleting ``.msn.lock`` (a clean-up of dot-files, rsync --delete) under a
    trainer leaves it locked; a second launch of the same command is refused in one line; the trainer writes its
    note again at its next checkpoint and finishes with every step logged once."""
    run_dir = tmp_path / "run"
    with _trainer_stopped_with_its_lock_file_deleted(tmp_path, [*EVERY_STEP, f"hydra.run.dir={run_dir}"]) as trainer:
        pass
    assert trainer.wait(timeout=240) == 0, (tmp_path / "trainer.err").read_text()[-2000:]
    assert [int(r["step"]) for r in metrics_rows(run_dir)] == list(range(1, 9))
    assert (run_dir / LOCK_FILE).read_text().startswith(f"process {trainer.pid} on {socket.gethostname()}")


def test_a_deleted_lock_file_excludes_a_second_launch_and_a_moved_folder_is_left_alone(tmp_path):
    """A trainer stopped in step 4: its ``.msn.lock`` deleted, a second launch of the same command is refused in one
    line and writes nothing (the lock is the folder's). Then the folder is moved away and a new folder of the user's
    put in its place: the trainer, continued, stops before its next checkpoint in one line, writing nothing into the
    new folder and removing nothing from it; the moved folder keeps what was trained, each step logged once."""
    run_dir, moved = tmp_path / "run", tmp_path / "moved"
    with _trainer_stopped_with_its_lock_file_deleted(tmp_path, [*EVERY_STEP, f"hydra.run.dir={run_dir}"]) as trainer:
        run_dir.rename(moved)
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("mine")
    assert trainer.wait(timeout=120) == 1
    errors = _errors(tmp_path, "trainer")
    assert errors == [f"msn-pretrain: error: {run_dir} was removed or replaced while this run trained it; stopped "
                      "without writing into it (its last checkpoint is wherever the folder went)"], errors
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    assert load_checkpoint(moved / "checkpoints" / "last.pt")["step"] == 3
    assert [int(r["step"]) for r in metrics_rows(moved)] == [1, 2, 3, 4]  # step 4 ran (logged; its save refused)


def _state(pid: int) -> str:
    """A process's state letter (R, S, T for stopped, ...), from /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def test_a_run_folder_removed_or_taken_over_stops_the_trainer_before_it_writes(tmp_path):
    """Before each checkpoint the trainer checks that its lock still guards the folder: a folder moved away (and a
    new one in its place) stops the run instead of writing into the new one; on a file system that locks only
    files, a removed lock file is locked again, and one that another process locked since stops the run."""
    run_dir = tmp_path / "run"
    lock = acquire_run_lock(run_dir)
    try:
        (run_dir / LOCK_FILE).unlink()
        lock.verify()  # the note is written again; the lock is the folder's
        assert (run_dir / LOCK_FILE).read_text().startswith(f"process {os.getpid()} on")
        run_dir.rename(tmp_path / "moved")
        run_dir.mkdir()
        with pytest.raises(ConfigError, match="was removed or replaced while this run trained it"):
            lock.verify()
    finally:
        lock.release()

    files = tmp_path / "files"
    lock = acquire_run_lock(files, on_file=True)
    try:
        (files / LOCK_FILE).unlink()
        lock.verify()  # nobody took it: locked again
        assert (files / LOCK_FILE).exists()
        holder = subprocess.run([sys.executable, "-c", (
            "import sys\nfrom msn.utils.runlock import acquire_run_lock\nacquire_run_lock(sys.argv[1], on_file=True)")
            , str(files)], capture_output=True, text=True, timeout=60)
        assert "is being trained right now" in holder.stderr  # the relocked file excludes a second process
        (files / LOCK_FILE).unlink()
        other = subprocess.Popen([sys.executable, "-c", (
            "import sys, time\nfrom msn.utils.runlock import acquire_run_lock\n"
            "acquire_run_lock(sys.argv[1], on_file=True)\nprint('locked', flush=True)\ntime.sleep(60)"), str(files)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline().strip() == "locked"
            with pytest.raises(ConfigError, match=rf"was removed while this run trained and process {other.pid}"):
                lock.verify()
        finally:
            other.kill()
            other.wait()
    finally:
        release_run_lock(files)


@pytest.mark.parametrize("where", ["sys", "lock_is_a_folder"])
def test_a_lock_that_cannot_be_taken_is_one_line(tmp_path, where):
    if where == "sys":
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no /sys on this machine")
        run_dir, reason = Path("/sys/kernel/msn-test-run"), "cannot lock the run folder"
    else:
        run_dir, reason = tmp_path / "run", "cannot write"
        (run_dir / LOCK_FILE).mkdir(parents=True)
    result = subprocess.run(["msn-pretrain", *SMOKE, f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=clean_env())
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msn-pretrain: error: ") and reason in lines[0], lines
    assert "hydra.run.dir=DIR" in lines[0]


# ------------------------------------------------------------------------------ torchrun: restarts and nodes
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: EVERY_STEP trained by 2 processes of a gloo group, never interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_distributed(_train_worker, world_size=2, args=(str(run_dir), EVERY_STEP))
    return run_dir


def _train_worker(rank: int, world: int, run_dir: str, overrides: list[str]) -> int:
    train(compose_config([f"run_dir={run_dir}", *overrides]))
    return rank


# Rank 0 (the lock's holder) in the default suite; rank 1 under -m slow.
@pytest.mark.parametrize("killed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_torchrun_restarts_a_group_whose_worker_was_killed_and_it_ends_bit_identical(tmp_path, uninterrupted, killed):
    """``torchrun --max-restarts=1``, 2 processes with 2 loader workers each, one killed (-9) at the start of step 4
    (mid-epoch): the survivor says it lost the process group in one line, the agent restarts the group, which takes
    the run's lock, continues from the newest checkpoint by itself and ends with the uninterrupted run's weights, bit
    for bit."""
    run_dir = tmp_path / "run"
    job = _launch(_torchrun(*EVERY_STEP, "data.num_workers=2", f"hydra.run.dir={run_dir}", restarts=1), tmp_path,
                  "job", fault=f"{killed}:4:KILL")
    assert job.wait(timeout=400) == 0, (tmp_path / "job.err").read_text()[-4000:]
    errors = _errors(tmp_path, "job")
    assert len(errors) == 1 and re.search(rf"rank {1 - killed} of 2 on \S+ lost the process group at step 4 \(.*\): "
                                          r"another process of the job died", errors[0]), errors
    assert "resumed from" in (tmp_path / "job.out").read_text()
    print(f"\ntorchrun --max-restarts=1, a worker killed -> the group training again: {_since_fault(tmp_path):.1f} s")
    _assert_identical(_weights(uninterrupted), _weights(run_dir), "restarted by torchrun")
    assert [int(r["step"]) for r in metrics_rows(run_dir)] == list(range(1, 9))  # each step once


@pytest.mark.slow  # the default suite resumes an fsdp checkpoint on 2 and on 1 process (tests/test_fsdp.py)
def test_torchrun_restarts_an_fsdp_group_whose_worker_was_killed_and_it_ends_bit_identical(tmp_path):
    """strategy=fsdp, 2 processes under ``torchrun --max-restarts=1``, rank 1 killed (-9) at the start of step 4: the
    restarted group shards the newest checkpoint's whole tensors again and ends with the weights of an fsdp run that
    was never interrupted, bit for bit."""
    reference = tmp_path / "reference"
    run_distributed(_train_worker, world_size=2, args=(str(reference), [*EVERY_STEP, "strategy=fsdp"]))
    run_dir = tmp_path / "run"
    job = _launch(_torchrun(*EVERY_STEP, "strategy=fsdp", "data.num_workers=2", f"hydra.run.dir={run_dir}",
                            restarts=1), tmp_path, "job", fault="1:4:KILL")
    assert job.wait(timeout=400) == 0, (tmp_path / "job.err").read_text()[-4000:]
    assert "resumed from" in (tmp_path / "job.out").read_text()
    _assert_identical(_weights(reference), _weights(run_dir), "fsdp restarted by torchrun")
    assert [int(r["step"]) for r in metrics_rows(run_dir)] == list(range(1, 9))

    # killed while writing its shards of step 4's checkpoint (rank 0 may have written its own): the restarted group
    # removes the temporary folder, continues from step 3's complete checkpoint and ends bit for bit the same
    run_dir = tmp_path / "killed_in_save"
    job = _launch(_torchrun(*EVERY_STEP, "strategy=fsdp", f"hydra.run.dir={run_dir}", restarts=1), tmp_path, "save",
                  fault="1:save-4:KILL")
    assert job.wait(timeout=400) == 0, (tmp_path / "save.err").read_text()[-4000:]
    said = (tmp_path / "save.out").read_text() + (tmp_path / "save.err").read_text()
    assert "removed .step_0000004.tmp" in said and "at step 3" in said, said[-3000:]
    _assert_identical(_weights(reference), _weights(run_dir), "fsdp killed in a save, restarted by torchrun")
    assert sorted(p.name for p in (run_dir / "checkpoints" / "shards").iterdir()) == ["step_0000008"]


def test_two_torchrun_agents_with_nnodes_2_train_one_run(tmp_path, uninterrupted):
    """Two agents on this machine, ``--nnodes=2 --nproc_per_node=1`` with a c10d rendezvous, as two nodes would
    start them: one run folder, written once, and the weights of the one-agent, two-process run. (torchrun sets
    OMP_NUM_THREADS=1 only for several processes per node; one intra-op thread each, as there, gives the same
    rounding.)"""
    port = free_port()
    agents = [_launch([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                       "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=msn-two-nodes",
                       str(FAULTS), *EVERY_STEP], tmp_path, f"node{n}", OMP_NUM_THREADS="1") for n in range(2)]
    assert [a.wait(timeout=400) for a in agents] == [0, 0], [(tmp_path / f"node{n}.err").read_text()[-3000:]
                                                            for n in range(2)]
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1, runs
    said = [(tmp_path / f"node{n}.out").read_text() for n in range(2)]
    assert sum(text.count("run directory") for text in said) == 1  # only rank 0 reports
    assert "global batch 32 = 16 per process x 2 processes" in "".join(said)
    _assert_identical(_weights(uninterrupted), _weights(runs[0]), "two agents")


# -------------------------------------------------------------------------------------------------- a stuck rank
@pytest.mark.parametrize("rerun", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_frozen_rank_ends_the_job_within_the_timeout(tmp_path, rerun):
    """Rank 1 stops itself (SIGSTOP) at the start of step 4: within ``dist.timeout_s`` rank 0 names it, its host
    and process in one line, kills it (same host) and the job ends; the last checkpoint is step 3 (-m slow: and the
    same command continues from it)."""
    run_dir = tmp_path / "run"
    args = [*EVERY_STEP, "dist.timeout_s=4", f"hydra.run.dir={run_dir}"]
    job = _launch(_torchrun(*args), tmp_path, "job", fault="1:4:STOP")
    assert job.wait(timeout=180) != 0
    print(f"\na rank frozen -> the whole job ended: {_since_fault(tmp_path, None):.1f} s (dist.timeout_s=4)")
    errors = _errors(tmp_path, "job")
    assert len(errors) == 1, (tmp_path / "job.err").read_text()[-3000:]
    assert re.match(rf"msn-pretrain: error: rank 1 on {re.escape(socket.gethostname())} \(process \d+\) stopped "
                    r"responding in step 4 \(no sign of life for \d+ s; killed\), while the other ranks waited for it "
                    r"for \d+ s \(dist.timeout_s=4\): the job ends here; the last checkpoint is step 3 ", errors[0]), \
        errors[0]
    pid = int(re.search(r"\(process (\d+)\)", errors[0]).group(1))
    assert _state(pid) in ("?", "Z")  # killed, not left stopped
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 3
    if not rerun:
        return
    again = _launch(_torchrun(*args), tmp_path, "again")
    assert again.wait(timeout=300) == 0, (tmp_path / "again.err").read_text()[-3000:]
    assert [int(r["step"]) for r in metrics_rows(run_dir)] == list(range(1, 9))


def test_the_watchdog_waits_for_a_busy_rank_and_names_a_frozen_one_or_one_stuck_on_its_data():
    """Three ranks' watchdogs on a real TCP store, driven round by round with the clock advanced by hand: a rank that
    is alive and busy (an evaluation) is waited for however long; a rank stuck loading its batch says so itself, one
    that gives no sign of life is named by the lowest healthy rank; every waiting rank ends, the others silently."""
    import torch.distributed as dist

    from msn.utils.watchdog import Watchdog

    def job(scenario: str) -> list[tuple[int, str | None]]:
        store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
        store = dist.PrefixStore(scenario, store)
        ended: list[tuple[int, str | None]] = []
        dogs = [Watchdog(rank=r, world=3, timeout_s=10, period=1, store=store, last_checkpoint=lambda: "step 7 (RUN)",
                         on_stuck=lambda line, r=r: ended.append((r, line))) for r in range(3)]
        for dog in dogs:
            dog.beat("step", 7)
        dogs[2].beat("data" if scenario == "data" else "step", 7)
        start = time.monotonic()
        for second in range(1, 16):
            for dog in dogs:
                if not (scenario == "frozen" and dog.rank == 1 and second > 2):  # rank 1 stops after 2 s
                    dog.check(start + second)
            if scenario == "busy":
                dogs[0].beat("step", 7)  # rank 0 evaluates, and says so
        return ended

    assert job("busy") == []
    host, pid = re.escape(socket.gethostname()), os.getpid()
    ended = job("data")  # rank 2 says it itself (it is alive); the others leave without a word
    assert sorted(r for r, _ in ended) == [0, 1, 2] and [line for r, line in ended if r != 2] == [None, None]
    assert re.fullmatch(rf"rank 2 on {host} \(process {pid}\) has waited 1\d s for its batch of step 8: its data does "
                        r"not load \(a file system that stopped answering\?\), while the other ranks waited for it for "
                        r"1\d s \(dist.timeout_s=10\): the job ends here; the last checkpoint is step 7 \(RUN\): run "
                        r"the same command again to continue", dict(ended)[2]), dict(ended)[2]
    ended = job("frozen")
    assert sorted(r for r, _ in ended) == [0, 2]  # rank 1 is frozen: it does nothing
    assert re.match(rf"rank 1 on {host} \(process {pid}\) stopped responding in step 8 \(no sign of life for \d+ s\)",
                    dict(ended)[0]), dict(ended)[0]  # (its own process: not killed)


def test_the_watchdog_names_a_store_that_stopped_answering(tmp_path):
    """The job's store served by a process that then freezes (SIGSTOP; under SLURM without torchrun rank 0 serves
    it): the watchdog's calls time out instead of hanging, and after ``dist.timeout_s`` rank 1 says so and ends."""
    import datetime

    import torch.distributed as dist

    from msn.utils.watchdog import Watchdog

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, torch.distributed as dist\n"
        "store = dist.TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, wait_for_workers=False)\n"
        "print('serving', flush=True)\ntime.sleep(120)"), str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "serving"
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=0.5),
                               wait_for_workers=False)
        ended: list[str | None] = []
        dog = Watchdog(rank=1, world=2, timeout_s=2, period=0.2, store=client, on_stuck=ended.append,
                       last_checkpoint=lambda: "step 3 (RUN)")
        dog.beat("step", 3)
        start = time.monotonic()
        dog.check(start)
        os.kill(server.pid, signal.SIGSTOP)
        for later in (1.1, 1.6, 2.2):
            dog.check(start + later)
        assert len(ended) == 1 and re.match(r"the job's store at \S+ \(served by rank 0 or by torchrun's agent\) "
                                            r"stopped answering in step 4, while the other ranks waited", ended[0])
    finally:
        server.kill()
        server.wait()
        # The watchdog left its stuck call behind (it stops waiting, the call goes on). Once the server is gone the
        # call fails, but until then its thread may hold glibc's resolver lock (the client reconnecting): a test that
        # forks meanwhile gives its child that lock held forever (seen: rank 0 of the next test never formed its group).
        for thread in threading.enumerate():
            if thread.name == "msn-watchdog-store":
                thread.join(timeout=30)
                assert not thread.is_alive(), "the watchdog's call to a dead store never returned"


# --------------------------------------------------------------------------------- another number of processes
def test_a_run_continued_on_fewer_processes_says_so_and_continues_as_the_new_count_does(tmp_path, caplog,
                                                                                         monkeypatch):
    """A 2-process run's step-4 checkpoint continued by 1 process with the same global batch (data.batch_size 32):
    the resume says what changed; it continues exactly as a 1-process run does from that state (an interruption at
    step 6 and a rerun give the same weights bit for bit), on the same data as the 2-process run (its losses follow
    the 2-process run's to rounding); another global batch is refused."""
    import msn.train.checkpoints as checkpoints

    two = tmp_path / "two"
    run_distributed(_train_worker, world_size=2, args=(str(two), [*EVERY_STEP, "checkpoint.every_steps=4"]))
    middle = two / "checkpoints" / "step_0000004.pt"
    one = [*EVERY_STEP, "data.batch_size=32", f"resume={middle}"]

    straight = tmp_path / "straight"
    train(compose_config([*one, f"run_dir={straight}"]))
    assert ("continuing a run of 2 processes x 16 images on 1 process x 32 images (the global batch, 32, as before)"
            in caplog.text)

    interrupted, real = tmp_path / "interrupted", checkpoints.save_checkpoint

    def save_then_fail(path, state):
        real(path, state)
        if state["step"] == 6:
            raise KeyboardInterrupt("interrupted after the checkpoint of step 6")

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        train(compose_config([*one, f"run_dir={interrupted}"]))
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    train(compose_config([*EVERY_STEP, "data.batch_size=32", f"run_dir={interrupted}"]))  # resume=auto
    _assert_identical(_weights(straight), _weights(interrupted), "1 process, interrupted and resumed")

    logged = {int(r["step"]): float(r["loss"]) for r in metrics_rows(two)}
    continued = {int(r["step"]): float(r["loss"]) for r in metrics_rows(straight)}
    assert sorted(continued) == list(range(5, 9))
    for step, loss in continued.items():  # the same images, views and masks: rounding apart, the same losses
        assert loss == pytest.approx(logged[step], abs=2e-4), step

    with pytest.raises(CheckpointError, match=r"global batch of 32 images.*16 x 1 processes = 16.*data.batch_size=32"):
        train(compose_config([*EVERY_STEP, "data.batch_size=16", f"resume={middle}", f"run_dir={tmp_path / 'x'}"]))


def _train_and_say(rank: int, world: int, run_dir: str, overrides: list[str]) -> str:
    """Train in a gloo group; return what this rank logged."""
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("msn")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train(compose_config([f"run_dir={run_dir}", *overrides]))
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


@pytest.mark.slow
def test_a_run_continued_on_more_processes_says_so_and_trains_on_the_same_data(tmp_path):
    """The other direction: a 1-process run's step-4 checkpoint continued by 2 processes of 16 images each."""
    one = tmp_path / "one"
    train(compose_config([*EVERY_STEP, "data.batch_size=32", "checkpoint.every_steps=4", f"run_dir={one}"]))
    middle = one / "checkpoints" / "step_0000004.pt"
    said = run_distributed(_train_and_say, world_size=2, args=(str(tmp_path / "two"), [*EVERY_STEP,
                                                                                        f"resume={middle}"]))
    assert ("continuing a run of 1 process x 32 images on 2 processes x 16 images (the global batch, 32, as before)"
            in said[0]) and "continuing" not in said[1]  # rank 0 says it
    logged = {int(r["step"]): float(r["loss"]) for r in metrics_rows(one)}
    continued = {int(r["step"]): float(r["loss"]) for r in metrics_rows(tmp_path / "two")}
    assert sorted(continued) == list(range(5, 9))
    for step, loss in continued.items():
        assert loss == pytest.approx(logged[step], abs=2e-4), step
