"""Prove and measure the GPU paths in one prepared run: the driver behind ``scripts/gpu_check.sh``.

    python scripts/gpu_check.py OUT_DIR          # on a CUDA machine, about 8 minutes on one H200
    python scripts/gpu_check.py --smoke OUT_DIR  # the same sections on the CPU at tiny sizes, under 2 minutes

Each section appends one JSON line to ``OUT_DIR/results.jsonl`` (``section``, ``status`` ok | failed | skipped,
``seconds``, ``command`` and the command's own JSON record or the error; a skipped one its ``reason``), and
``OUT_DIR/summary.md`` gets a table of them with the claims they test. ``OUT_DIR`` is relative to the folder the
check is started in (the sections then run from the repository); the first line names it, the last counts the
sections (:func:`totals`). Exit code (:func:`exit_code`): 0 all ran (a section this machine cannot run is skipped
and said), 1 a section failed, 2 a requirement is missing or an argument is wrong, 3 none failed but some were
skipped past the time budget (``--budget``): a check cut short is not a pass. The sections and their commands are
in :func:`sections`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUDGET_SKIP = "past the check's time budget (--budget)"  # the reason of a section skipped for lack of time
EXIT_FAILED, EXIT_MISSING, EXIT_OUT_OF_TIME = 1, 2, 3
REQUIRED = ("torch", "torchvision", "timm", "hydra", "omegaconf", "sklearn", "safetensors", "PIL", "webdataset",
            "pytest")


@dataclass
class Section:
    """One measurement: a command (an msn CLI run in this process, or a process of its own) and its record."""

    name: str
    argv: list[str]
    in_process: bool = True  # msn-bench / msn-eval under --smoke: their main() here (torch imported once)
    timeout: float = 300.0
    claim: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def gpu_test_files() -> list[str]:
    """The test files that mark a test ``gpu`` (the smoke run collects only these: collecting the whole suite costs
    seconds of imports on a small CPU); all of ``tests/`` when none is found."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    marked = sorted(str(p) for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text())
    return marked or [str(tests)]


def sections(out: Path, smoke: bool, fmnist: Path | None) -> list[Section]:
    """What the check runs, in order. ``smoke``: the same commands on the CPU at tiny sizes."""
    jpegs = out / "jpegs"
    if smoke:
        dev = ["device=cpu", "precision=fp32"]
        vits = ["model=vit_pico", "data.batch_size=8", *dev]
        vitb = ["model=vit_pico", "masking.ratio=0.3", "data.batch_size=8", *dev]
        vitl = ["model=vit_pico", "data.batch_size=8", *dev]
        views = ["model=vit_pico", "data.global_size=32", "data.focal_size=16", "data.num_focal=2",
                 "data.batch_size=4", *dev]
        steps, compile_on = ["--steps", "2", "--warmup", "1"], ["compile=true", "compile_backend=eager"]
        e2e_steps, workers, data_seconds, count = ["--steps", "2", "--warmup", "1"], "1", "1", 16
        fmnist_run = ["device=cpu", "precision=fp32", "compile=false", "optim.max_steps=2", "data.batch_size=16",
                      "data.num_workers=0"]
    else:
        dev = ["device=cuda", "precision=bf16"]
        vits = ["experiment=msn_vits16", "data.batch_size=128", *dev]
        vitb = ["experiment=msn_vitb16", "masking.ratio=0.3", "data.batch_size=128", *dev]
        vitl = ["experiment=msn_vitl7", "data.batch_size=16", *dev]
        views = ["experiment=msn_vits16", "data.batch_size=128", *dev]
        steps, compile_on = ["--steps", "10", "--warmup", "3"], ["compile=true"]
        e2e_steps, workers, data_seconds, count = ["--steps", "40", "--warmup", "15"], "15", "8", 2048
        fmnist_run = ["optim.max_steps=1000", "monitor.every_steps=0"]  # a few minutes of fmnist_gpu at most
    root = f"data.root={jpegs}"
    result = [
        Section("tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs",
                          *(gpu_test_files() if smoke else [])],
                in_process=False, timeout=240, claim="every test that needs CUDA passes"),
        Section("step_vits16", ["msn-bench", "step", *vits, *steps, "--reference"],
                claim="ViT-S/16 step >= 2.0x the original's (ratio)"),
        Section("step_vits16_compile", ["msn-bench", "step", *vits, *compile_on, *steps, "--reference"],
                claim="the compiled step, against the original"),
        Section("step_vitb16", ["msn-bench", "step", *vitb, *steps], claim="ViT-B/16 mask 0.3 MFU >= 45 %"),
        Section("step_vitl7_checkpointing", ["msn-bench", "step", *vitl, "model.grad_checkpointing=true", *steps],
                claim="peak memory with and without activation checkpointing"),
    ]
    if smoke:  # --max-batch needs a GPU: its lines say so, and step_vitl7_checkpointing has both peaks
        reason = {"skip": "--max-batch needs a GPU; step_vitl7_checkpointing has the peak memory with and without"}
        result += [Section("max_batch_vitl7", [], claim="largest msn_vitl7 batch without activation checkpointing",
                           extra=reason),
                   Section("max_batch_vitl7_checkpointing", [], claim="largest msn_vitl7 batch with activation "
                           "checkpointing", extra=reason)]
    else:
        result += [
            Section("max_batch_vitl7", ["msn-bench", "step", *vitl, "--max-batch"], timeout=300,
                    claim="largest msn_vitl7 batch without activation checkpointing"),
            Section("max_batch_vitl7_checkpointing", ["msn-bench", "step", *vitl, "model.grad_checkpointing=true",
                                                      "--max-batch"], timeout=300,
                    claim="largest msn_vitl7 batch with activation checkpointing"),
        ]
    result += strategy_sections(smoke, vitl_16=["experiment=msn_vitl16", "data.batch_size=32", *dev], steps=steps)
    result += [
        Section("jpegs", ["msn-bench", "jpegs", str(count), str(jpegs)], claim="benchmark images written"),
        Section("data_decode_device", ["msn-bench", "data", "--root", str(jpegs), "--workers", workers, "--seconds",
                                       data_seconds, *views, "data.decode_on=device", "data.augment_on=device"],
                claim="loader, JPEGs decoded and cut on the GPU (ours_images_per_s)"),
        Section("data_device", ["msn-bench", "data", "--root", str(jpegs), "--workers", workers, "--seconds",
                                data_seconds, *views, "data.decode_on=cpu", "data.augment_on=device"],
                claim="loader >= 3x 886 img/s (ours_images_per_s)"),
        Section("data_cpu", ["msn-bench", "data", "--root", str(jpegs), "--workers", workers, "--seconds",
                             data_seconds, *views, "data.decode_on=cpu", "data.augment_on=cpu"],
                claim="the loader, photometric on CPU"),
        Section("e2e_decode_device", ["msn-bench", "e2e", *views, "data=folder", root, f"data.num_workers={workers}",
                                      "data.decode_on=device", "data.augment_on=device", *e2e_steps], timeout=420,
                claim="end to end, JPEGs decoded on the GPU, >= 0.9x the step alone (ratio)"),
        Section("e2e_device", ["msn-bench", "e2e", *views, "data=folder", root, f"data.num_workers={workers}",
                               "data.decode_on=cpu", "data.augment_on=device", *e2e_steps], timeout=420,
                claim="end to end, decoded and cut in the workers (ratio)"),
        Section("e2e_cpu", ["msn-bench", "e2e", *views, "data=folder", root, f"data.num_workers={workers}",
                            "data.decode_on=cpu", "data.augment_on=cpu", *e2e_steps], timeout=420,
                claim="end to end, photometric on CPU"),
    ]
    # the recipe fitted to the benchmark JPEGs and this machine (fit=auto): its plan (the batch measured on the GPU)
    # and the steps a 60-second budget holds; the smoke prints the plan only
    fitted = ["plan=true", "device=cpu"] if smoke else ["optim.budget=60s", "monitor.every_steps=0"]
    result.append(Section("fit_plan", ["msn-pretrain", "data=folder", root, *fitted, f"hydra.run.dir={out / 'fit'}",
                                       "resume=null", "logger.progress=false"],
                          in_process=False, timeout=300, claim="the fitted plan, and a run of a 60 s budget"))
    if fmnist is None:
        result.append(Section("fmnist", [], claim="Fashion-MNIST not found", extra={"skip": "no Fashion-MNIST idx "
                              "files: install dataset-fashion-mnist or set MSN_FASHION_MNIST=DIR"}))
    else:
        run = out / "fmnist_gpu"
        # smoke: digits (a check of the path only), 300 of its training images (--train-subset: seconds, not minutes)
        evaluation = (["--dataset", "digits", "--train-subset", "300"] if smoke
                      else ["--dataset", str(fmnist), "--crop-pct", "1"])
        result += [
            Section("fmnist", ["msn-pretrain", "experiment=fmnist_gpu", f"data.root={fmnist}", *fmnist_run,
                               f"hydra.run.dir={run}", "resume=null", "logger.progress=false"],
                    in_process=False, timeout=420, claim="a shortened fmnist_gpu trains"),
            Section("fmnist_knn", ["msn-eval", "knn", str(run), *evaluation, "--overwrite",
                                   "--output", str(out / "fmnist_knn.json")],
                    claim="k-NN-20 accuracy (%) on the test split (smoke: digits, a check of the path only)"),
            Section("fmnist_lowshot", ["msn-eval", "lowshot", str(run), *evaluation, "--shots", "1", "5", "10",
                                       "--fraction", "0", "--overwrite", "--output", str(out / "fmnist_lowshot.json")],
                    claim="1/5/10-shot accuracy (%), 3 draws"),
        ]
    return result


def strategy_sections(smoke: bool, *, vitl_16: list[str], steps: list[str]) -> list[Section]:
    """ViT-L/16's step under strategy=ddp and =fsdp, one process per GPU: each process's share of weights, gradients
    and AdamW state, its peak memory and step time. One GPU cannot shard: both sections are then skipped. The smoke
    runs them on 2 CPU processes with gloo."""
    if smoke:
        processes, model = 2, ["model=vit_pico", "data.batch_size=4", "device=cpu", "precision=fp32"]
    else:
        import torch

        processes, model = torch.cuda.device_count(), vitl_16
    result = []
    for strategy in ("ddp", "fsdp"):
        name, claim = f"strategy_vitl16_{strategy}", f"ViT-L/16 per-process state and peak memory under {strategy}"
        if processes < 2:
            result.append(Section(name, [], claim=claim, extra={"skip": "a strategy's sharding needs 2 GPUs or more; "
                                                                      f"this machine has {processes}"}))
            continue
        result.append(Section(name, ["torchrun", f"--nproc_per_node={processes}", "--no-python", "msn-bench", "step",
                                     *model, f"strategy={strategy}", *steps], in_process=False, timeout=300,
                              claim=claim))
    return result


def run_section(section: Section, log: Path, smoke: bool, deadline: float) -> dict[str, Any]:
    """Run one section; its record for results.jsonl. Past ``deadline`` (time.monotonic) it is skipped."""
    record: dict[str, Any] = {"section": section.name, "command": shlex.join(section.argv), "claim": section.claim}
    if "skip" in section.extra:
        return {**record, "status": "skipped", "seconds": 0.0, "reason": section.extra["skip"]}
    if time.monotonic() >= deadline:
        return {**record, "status": "skipped", "seconds": 0.0, "reason": BUDGET_SKIP}
    tic = time.perf_counter()
    if section.in_process and smoke:  # on a GPU every section is a process of its own, with its own time limit
        code, output = _in_process(section.argv)
    else:
        try:
            limit = max(10.0, min(section.timeout, deadline - time.monotonic()))
            done = subprocess.run(section.argv, capture_output=True, text=True, timeout=limit, cwd=REPO)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            code, output = 124, f"{partial}\ntimed out after {e.timeout:.0f} s"
    record["seconds"] = round(time.perf_counter() - tic, 1)
    with log.open("a") as f:
        f.write(f"$ {record['command']}\n{output}\n")
    lines = output.strip().splitlines()
    record["status"] = "ok" if code == 0 else "failed"
    if code != 0:
        record["error"] = lines[-1] if lines else f"exit code {code}"
    if section.name == "tests":
        record["result"] = lines[-1] if lines else ""
        if code == 5 or "no tests ran" in record["result"]:
            record["status"] = "failed"  # the marker selects nothing: the check itself is broken
    elif section.name == "fit_plan":  # the plan's lines, the budget's decision and the end
        keep = ("plan for", "  ", "optim.budget=", "would train", "run complete", "run directory")
        record["result"] = [line for line in lines if line.startswith(keep)][:40]
    elif "--output" in section.argv and code == 0:  # msn-eval: its report is the file it wrote
        record["result"] = json.loads(Path(section.argv[section.argv.index("--output") + 1]).read_text())
    else:
        for line in reversed(lines):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record["result"] = json.loads(line)
                    break
    return record


def _in_process(argv: list[str]) -> tuple[int, str]:
    """``msn-bench ...`` / ``msn-eval ...`` through their main(): torch and the rest are imported once."""
    from msn.cli import bench, evaluate

    main = {"msn-bench": bench.main, "msn-eval": evaluate.main}[argv[0]]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv[1:])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # a bug, not bad input: recorded, and the check goes on
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            code = 1
    return int(code or 0), out.getvalue() + err.getvalue()


def missing_requirements(smoke: bool) -> list[str]:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if not missing and not smoke:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA device (torch.cuda.is_available() is False; --smoke runs on the CPU)")
    return missing


def find_fashion_mnist() -> Path | None:
    for candidate in (os.environ.get("MSN_FASHION_MNIST"), REPO / ".gpu-data" / "fashion-mnist",
                      "/usr/share/datasets/fashion-mnist"):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("train-images-idx3-ubyte*")):
            return Path(candidate)
    return None


def totals(records: list[dict[str, Any]]) -> str:
    """``N ok, N failed, N skipped (not for this machine), N skipped (time budget)``: the sections a machine cannot
    run (a GPU-only measurement on the CPU, a dataset that is not there) apart from those the budget cut."""
    out_of_time = sum(r["status"] == "skipped" and r.get("reason") == BUDGET_SKIP for r in records)
    count = {status: sum(r["status"] == status for r in records) for status in ("ok", "failed", "skipped")}
    return (f"{count['ok']} ok, {count['failed']} failed, {count['skipped'] - out_of_time} skipped (not for this "
            f"machine), {out_of_time} skipped (time budget)")


def exit_code(records: list[dict[str, Any]]) -> int:
    """1 if a section failed, else 3 if the time budget left sections out, else 0."""
    if any(r["status"] == "failed" for r in records):
        return EXIT_FAILED
    if any(r["status"] == "skipped" and r.get("reason") == BUDGET_SKIP for r in records):
        return EXIT_OUT_OF_TIME
    return 0


def summary(records: list[dict[str, Any]], smoke: bool) -> str:
    """summary.md: the device, then one row per section with its headline figure, then :func:`totals`."""
    lines = [f"# GPU check{' (smoke, CPU)' if smoke else ''}", "", f"device: {_device_name()}", "",
             "| section | status | s | figure | claim |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['section']} | {r['status']} | {r.get('seconds', 0)} | {_figure(r)} | {r['claim']} |")
    return "\n".join([*lines, "", f"sections: {totals(records)}"]) + "\n"


def _figure(record: dict[str, Any]) -> str:
    r = record.get("result")
    if not isinstance(r, dict):
        return str(r or record.get("error") or record.get("reason") or "")[:80]
    keys = [("img_s", "{:.0f} img/s"), ("mfu", "MFU {:.1%}"), ("ratio", "ratio {:.2f}"), ("max_batch", "batch {}"),
            ("peak_mem_gib", "peak {:.2f} GiB"), ("peak_mem_gib_without_checkpointing", "without {:.2f} GiB"),
            ("state_gib_per_process", "state {:.2f} GiB per process"),
            ("ours_images_per_s", "{:.0f} img/s"), ("e2e_images_per_s", "{:.0f} img/s")]
    parts = [fmt.format(r[k]) for k, fmt in keys if isinstance(r.get(k), (int, float))]
    if "results" in r:
        parts += [f"{k}: {v['mean']:.1f}" for k, v in r["results"].items()]
    return ", ".join(parts)


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for results.jsonl, summary.md and log.txt")
    parser.add_argument("--smoke", action="store_true", help="the same sections on the CPU at tiny sizes")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which no section starts (default: 450, or 110 with --smoke)")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME...]",
                        help="run these sections only (a rerun of one that failed); a section that reads another's "
                             "output (data_* and e2e_* read jpegs', fmnist_knn and fmnist_lowshot fmnist's) needs it "
                             "named too")
    args = parser.parse_args()
    if args.budget is not None and not args.budget >= 0:
        print(f"gpu_check: --budget {args.budget:g} must be >= 0 (seconds)", file=sys.stderr)
        return EXIT_MISSING
    missing = missing_requirements(args.smoke)
    if missing:
        print(f"gpu_check: missing: {', '.join(missing)}; see the header of scripts/gpu_check.sh", file=sys.stderr)
        return EXIT_MISSING
    out = args.out.expanduser().absolute()  # the caller's folder, before the sections move to the repository
    chosen = sections(out, args.smoke, find_fashion_mnist())
    if args.only is not None:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in {section.name for section in chosen}]
        if unknown or not names:
            print(f"gpu_check: --only {args.only}: no section is called {', '.join(unknown) or 'that'}; the sections "
                  f"are {', '.join(section.name for section in chosen)}", file=sys.stderr)
            return EXIT_MISSING
        chosen = [section for section in chosen if section.name in names]
    try:
        out.mkdir(parents=True, exist_ok=True)
        results, log = out / "results.jsonl", out / "log.txt"
        results.write_text("")
        log.write_text("")
    except OSError as e:
        print(f"gpu_check: cannot write to {out}: {e.strerror or e}; give an OUT_DIR you can write to", file=sys.stderr)
        return EXIT_MISSING
    os.chdir(REPO)  # what the sections read and write relative to the repository (tests, benchmarks)
    print(f"gpu_check: writing to {out}", flush=True)
    records = []
    deadline = time.monotonic() + (args.budget if args.budget is not None else (110.0 if args.smoke else 450.0))
    for section in chosen:
        record = run_section(section, log, args.smoke, deadline)
        records.append(record)
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{record['section']}: {record['status']} ({record.get('seconds', 0)} s) {_figure(record)}", flush=True)
    (out / "summary.md").write_text(summary(records, args.smoke))
    code = exit_code(records)
    print(f"gpu_check: {totals(records)}; wrote {results}, {out / 'summary.md'} and {log}"
          f"{'; rerun with a larger --budget for the sections skipped' if code == EXIT_OUT_OF_TIME else ''}",
          flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
