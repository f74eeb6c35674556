"""msn-bench on the CPU (a smoke test at small sizes), and the GPU-only checks of the step and evaluation."""

import json
import subprocess

import pytest
import torch

from msn.cli.bench import compose_bench_config, main
from msn.train.builder import local_process
from msn.train.memory import SyntheticStep


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_step_never_waits_for_the_gpu():
    """Between logging steps nothing reads the GPU: CUDA's sync debug mode turns any wait into an error."""
    cfg = compose_bench_config(["model=vit_pico", "data.batch_size=16", "device=cuda", "precision=bf16"])
    step = SyntheticStep(cfg, 16, local_process(cfg))
    step(0)  # first step: allocations, pinned-memory pool
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_augmentation_on_the_gpu_never_waits_for_it():
    """data.augment_on=device: the photometric stage queues its work; nothing reads the GPU back."""
    from msn.config import DataConfig
    from msn.data.loader import MultiCropDataset
    from msn.data.multicrop import MultiCropTransform, device_views
    from msn.data.sources.synthetic import SyntheticDataset

    cfg = DataConfig(name="synthetic", image_size=64, global_size=32, focal_size=16, num_focal=4)
    transform = MultiCropTransform(cfg)
    dataset = MultiCropDataset(SyntheticDataset(16, 64), transform, finish=False)
    batches = [dataset.__getitems__([(e, i) for i in range(8)]).pin_memory() for e in range(3)]
    device_views(batches[0], transform, torch.device("cuda"))  # first call: pinned-memory pool, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            device_views(batch, transform, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _jpeg_folder(root, n=12):
    import numpy as np
    from PIL import Image

    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (40 + i, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)
    return root


SMALL_VIEWS = ["model=vit_pico", "data.batch_size=4", "data.global_size=32", "data.focal_size=16", "data.num_focal=2"]


def test_bench_data_on_a_jpeg_folder(tmp_path, capsys):
    root = _jpeg_folder(tmp_path / "jpegs")
    assert main(["data", "--root", str(root), "--workers", "0", "--seconds", "0.2", "--step-img-s", "500",
                 *SMALL_VIEWS]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["images"] == 12 and report["batch"] == 4 and report["augment_on"] == "cpu"
    assert report["views"] == "2 x 32 + 2 x 16"
    assert report["ours_images_per_s"] > 0 and report["reference_images_per_s"] > 0
    assert report["ratio"] == pytest.approx(report["ours_images_per_s"] / report["reference_images_per_s"])
    # where the time goes: each stage timed on its own, the photometric stage counted in the workers (augment cpu)
    stages = report["stages"]
    assert stages["images_timed"] == 12 and all(stages[f"{s}_ms"] > 0 for s in ("read", "decode", "crop_resize",
                                                                                "photometric"))
    worker_ms = stages["read_ms"] + stages["decode_ms"] + stages["crop_resize_ms"] + stages["photometric_ms"]
    assert report["cores_per_gpu"] == pytest.approx(500 * worker_ms / 1000)
    assert out[-3].startswith("  per image on one CPU thread (12 images): read ") and "photometric" in out[-3]
    assert out[-2] == (f"  a step of 500 img/s needs about {report['cores_per_gpu']:.1f} loader cores per GPU "
                       "(read, decode, crop+resize, photometric in the workers)")
    assert main(["data", "--root", str(root), "--step-img-s", "0"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["msn-bench: error: --step-img-s 0 must be > 0"]
    assert main(["data", "--root", str(tmp_path / "missing"), "--workers", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0], err


def test_stage_times_of_a_source_without_stored_bytes():
    """A dataset class of the user's own has no ``read_bytes``: its reading is timed inside decoding."""
    from msn.benchmarks.stages import cores_needed, stage_times
    from msn.data.multicrop import MultiCropTransform
    from msn.data.sources.synthetic import SyntheticDataset

    cfg = compose_bench_config(["data=synthetic", *SMALL_VIEWS])
    stages = stage_times(SyntheticDataset(20, 48), MultiCropTransform(cfg.data), count=8)
    assert stages["images_timed"] == 8 and stages["read_ms"] is None and stages["decode_ms"] > 0
    on_device = cores_needed(stages, 1000, photometric_in_workers=False)
    assert on_device == pytest.approx(stages["decode_ms"] + stages["crop_resize_ms"])  # 1000 img/s x ms / 1000
    assert cores_needed(stages, 1000, photometric_in_workers=True) > on_device


def test_bench_data_reference_makes_the_recipes_views(tmp_path):
    from msn.benchmarks.data import ReferenceMultiCrop

    root = _jpeg_folder(tmp_path / "jpegs", 2)
    cfg = compose_bench_config(["data=folder", f"data.root={root}", *SMALL_VIEWS])
    views = ReferenceMultiCrop(sorted(root.rglob("*.jpg")), cfg.data)[0]
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2


def test_bench_e2e_runs_the_trainer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the trainer writes only under its temporary run folder
    result = _bench("e2e", "experiment=cpu_smoke", "data.synthetic_size=64", "data.batch_size=8", "--steps", "6",
                    "--warmup", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["steps"] == 6 and report["warmup"] == 2 and report["batch"] == 8
    assert report["e2e_images_per_s"] > 0 and report["step_images_per_s"] > 0
    assert report["ratio"] == pytest.approx(report["e2e_images_per_s"] / report["step_images_per_s"])
    assert list(tmp_path.iterdir()) == []


def test_e2e_steady_rate_leaves_out_the_warmup(tmp_path):
    from msn.benchmarks.e2e import log_interval, steady_images_per_s

    assert log_interval(20, 60) == 10 and log_interval(2, 6) == 2 and log_interval(3, 7) == 1
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,loss,images_per_s\n2,1,1\n4,1,100\n6,1,50\n")  # 8 images a step
    # steps 3-4: 16 images in 0.16 s; steps 5-6: 16 images in 0.32 s; the slow warm-up row is left out
    assert steady_images_per_s(csv, 2, 8) == pytest.approx(32 / 0.48)


def test_a_cpus_matmul_speed_is_shown_in_gflops_not_as_zero(capsys):
    from msn.cli.bench import _print_step

    record = {"overrides": ["device=cpu"], "batch": 8, "device_name": "CPU", "precision": "fp32", "compile": False,
              "torch": "2", "step_s": 0.1, "img_s": 80.0, "peak_mem_gib": 1.0, "flops_per_image": 2e8,
              "matmul_tflops": 0.0412, "mfu": 0.3}
    _print_step(record)
    assert "matmul 41.2 GFLOP/s" in capsys.readouterr().out
    _print_step({**record, "matmul_tflops": 712.0})
    assert "matmul 712.0 TFLOP/s" in capsys.readouterr().out
