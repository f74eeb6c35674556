"""scripts/gpu_check.sh --smoke: the GPU check's every section, on the CPU at tiny sizes, so that the prepared
command cannot rot between the sessions that have a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["tests", "step_vits16", "step_vits16_compile", "step_vitb16", "step_vitl7_checkpointing",
            "max_batch_vitl7", "max_batch_vitl7_checkpointing", "strategy_vitl16_ddp", "strategy_vitl16_fsdp", "jpegs",
            "data_decode_device", "data_device", "data_cpu", "e2e_decode_device", "e2e_device", "e2e_cpu", "fit_plan",
            "fmnist", "fmnist_knn", "fmnist_lowshot"]
GPU_ONLY = {"max_batch_vitl7", "max_batch_vitl7_checkpointing"}  # recorded as skipped on the CPU


@pytest.mark.slow
def test_the_smoke_check_runs_every_section_and_reports_it(tmp_path):
    out = tmp_path / "check"
    # a budget past the usual 110 s: on a CPU shared with other work the sections take longer, and cut ones exit 3
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", str(out), "--budget", "400"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    names = [r["section"] for r in records]
    fmnist_missing = records[names.index("fmnist")]["status"] == "skipped"
    assert names == (SECTIONS[:-2] if fmnist_missing else SECTIONS)
    for r in records:
        skipped_here = r["section"] in GPU_ONLY or (r["section"] == "fmnist" and fmnist_missing)
        assert r["status"] == ("skipped" if skipped_here else "ok"), r
    by_name = {r["section"]: r for r in records}
    ddp, fsdp = (by_name[f"strategy_vitl16_{s}"]["result"] for s in ("ddp", "fsdp"))  # 2 gloo processes
    assert (ddp["processes"], ddp["strategy"], fsdp["strategy"]) == (2, "ddp", "fsdp")
    assert fsdp["state_gib_per_process"] < 0.6 * ddp["state_gib_per_process"]
    assert "5 skipped" in by_name["tests"]["result"] or "skipped" in by_name["tests"]["result"]
    assert by_name["step_vits16"]["result"]["reference_img_s"] > 0
    assert by_name["step_vits16_compile"]["result"]["compile"] is True
    checkpointing = by_name["step_vitl7_checkpointing"]["result"]
    assert checkpointing["grad_checkpointing"] and checkpointing["peak_mem_gib_without_checkpointing"] > 0
    assert {by_name[s]["result"]["augment_on"] for s in ("data_device", "data_cpu")} == {"device", "cpu"}
    assert {by_name[s]["result"]["augment_on"] for s in ("e2e_device", "e2e_cpu")} == {"device", "cpu"}
    assert [by_name[s]["result"]["decode_on"] for s in ("data_decode_device", "data_device")] == ["device", "cpu"]
    assert [by_name[s]["result"]["decode_on"] for s in ("e2e_decode_device", "e2e_device")] == ["device", "cpu"]
    plan = "\n".join(by_name["fit_plan"]["result"])  # the JPEGs are 500 x 375: 96-px views on a CPU
    assert "plan for 16 images, median 500 x 375 px" in plan and "would train vit_pico (patch 16, native 96 px)" in plan
    if not fmnist_missing:
        assert set(by_name["fmnist_lowshot"]["result"]["results"]) == {"1", "5", "10"}
    table = (out / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    assert result.stdout.splitlines()[-1].startswith(
        f"gpu_check: {len(names) - 2 - fmnist_missing} ok, 0 failed, {2 + fmnist_missing} skipped (not for this "
        f"machine), 0 skipped (time budget); wrote {out / 'results.jsonl'}")


# the default suite's variant of the smoke check (about 35 of its 100 s): the pytest section, a step, the loader on
# the generated JPEGs (which needs the jpegs section) and the fitted plan
FAST = ["tests", "step_vits16", "jpegs", "data_device", "fit_plan"]


def test_the_smoke_check_runs_the_sections_named_and_refuses_an_unknown_name(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", str(out), "--budget", "400",
                             "--only", ",".join(FAST)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["section"] for r in records] == FAST and all(r["status"] == "ok" for r in records), records
    by_name = {r["section"]: r for r in records}
    assert by_name["step_vits16"]["result"]["reference_img_s"] > 0
    assert by_name["data_device"]["result"]["augment_on"] == "device"
    assert "would train vit_pico (patch 16, native 96 px)" in "\n".join(by_name["fit_plan"]["result"])
    assert result.stdout.splitlines()[-1].startswith(f"gpu_check: {len(FAST)} ok, 0 failed")

    refused = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "never", "--only",
                              "step_vits16,step_vit_huge"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and not (tmp_path / "never").exists()
    assert refused.stderr.startswith("gpu_check: --only step_vits16,step_vit_huge: no section is called "
                                     "step_vit_huge; the sections are tests, step_vits16,"), refused.stderr


def test_a_check_cut_by_its_budget_writes_where_asked_says_so_and_does_not_pass(tmp_path):
    """Run from another folder, OUT_DIR went into the repository, unnamed; 13 of 15 sections skipped past the time
    budget still ended "0 failed" with exit code 0. Now OUT_DIR is the caller's, the first and last lines name it,
    the skipped sections are counted apart, and the exit code is 3 (documented: none failed, some cut)."""
    before = set(REPO.iterdir())
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "res", "--budget", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = tmp_path / "res"
    assert set(REPO.iterdir()) == before and (out / "results.jsonl").is_file(), result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cut = [r for r in records if r.get("reason") == "past the check's time budget (--budget)"]
    assert len(cut) >= 10 and all(r["status"] == "skipped" for r in records)
    lines = result.stdout.splitlines()
    assert lines[0] == f"gpu_check: writing to {out}"
    assert lines[-1] == (f"gpu_check: 0 ok, 0 failed, {len(records) - len(cut)} skipped (not for this machine), "
                         f"{len(cut)} skipped (time budget); wrote {out / 'results.jsonl'}, {out / 'summary.md'} and "
                         f"{out / 'log.txt'}; rerun with a larger --budget for the sections skipped")
    assert result.returncode == 3
    assert f"{len(cut)} skipped (time budget)" in (out / "summary.md").read_text()


def test_a_missing_requirement_is_one_line(tmp_path):
    """Without CUDA the full check stops at once and says what is missing."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full check would run")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: missing: a CUDA device (torch.cuda.is_available() is False; --smoke runs on the CPU); see the "
        "header of scripts/gpu_check.sh"]
