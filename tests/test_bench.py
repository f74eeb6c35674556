"""msn-bench on the CPU (a smoke test at small sizes), and the GPU-only checks of the step and evaluation."""

import json
import subprocess

import pytest
import torch

from msn.bench import _OurStep, compose_bench_config, main

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["msn-bench", *args], capture_output=True, text=True, timeout=600)


def test_bench_step_with_reference_on_cpu():
    result = _bench("step", "model=vit_pico", "data.batch_size=8", "device=cpu", "--reference", "--steps", "2",
                    "--warmup", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("img_s", "step_s", "peak_mem_gib", "flops_per_image", "mfu", "matmul_tflops", "reference_img_s",
                "ratio", "reference_flops_per_image"):
        assert report[key] > 0, key
    assert report["batch"] == 8 and report["device"] == "cpu" and report["precision"] == "fp32"
    assert report["img_s"] == pytest.approx(8 / report["step_s"])
    assert report["ratio"] == pytest.approx(report["img_s"] / report["reference_img_s"])
    # Two independent implementations of the same ViT, head and loss: the counted work must agree.
    assert report["flops_per_image"] == pytest.approx(report["reference_flops_per_image"], rel=0.05)


def test_bench_bad_input_is_one_line(capsys):
    result = _bench("step", "model.arch=vit_giant")  # the console script itself
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "msn-bench: error: invalid config: model.arch='vit_giant' is unknown; choose one of vit_pico, vit_tiny, "
        "vit_small, vit_base, vit_large, vit_huge, or null with model.embed_dim, model.depth and model.num_heads"]
    for args, message in ((["step", "optim.lrr=1"], "optim.lrr"),
                          (["step", "+optim.lrr=1"], "unknown config key optim.lrr"),
                          (["step", "model=vit_pico", "device=cpu", "--max-batch"], "--max-batch needs a GPU")):
        assert main(args) == 1, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("msn-bench: error: ") and message in lines[0], lines


@needs_gpu
def test_step_never_waits_for_the_gpu():
    """Between logging steps nothing reads the GPU: CUDA's sync debug mode turns any wait into an error."""
    cfg = compose_bench_config(["model=vit_pico", "data.batch_size=16", "device=cuda", "precision=bf16"])
    step = _OurStep(cfg, 16, torch.device("cuda"))
    step(0)  # first step: allocations, pinned-memory pool
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
