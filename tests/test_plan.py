"""A recipe fitted to the user's images and machine (``fit``, msn/plan): the rules with their reasons, real folder
runs at 32 and 96 px, an explicit override winning over the plan, a resume that reuses its recorded plan, a time
budget (``optim.budget``), ``plan=true`` and the presets left exactly as written.

The GPU cases of the rules are fed a GPU's description and, for the batch, a stand-in for the memory search
(no GPU here); everything else runs for real on this CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from msn.config import budget_seconds
from msn.plan import ImageStats, Machine, Plan, budget_steps, make_plan, measure_images, override_keys, should_fit
from msn.train.builder import local_process
from msn.train.fitting import fit_run
from msn.train.loop import train
from tests.conftest import compose_config

CPU = Machine("cpu", cores=2)
GPU = Machine("cuda", cores=16, world=1, gpu="a GPU")


def _stats(width: int, height: int, count: int, colour: float = 0.0) -> ImageStats:
    return ImageStats(count, min(count, 256), width, height, min(width, height), min(width, height), colour)


def _choices(plan: Plan) -> dict[str, tuple[object, str]]:
    return {c.key: (c.value, c.reason) for c in plan.choices}


def _folder(root: Path, size: tuple[int, int], count: int, fmt: str = "png", seed: int = 0) -> Path:
    """``count`` real image files of ``size`` (width, height): blobs of colour, so that the views differ."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(count):
        pixels = np.kron(rng.integers(0, 255, ((h + 3) // 4, (w + 3) // 4, 3)), np.ones((4, 4, 1)))[:h, :w]
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{i:03d}.{fmt}")
    return root


# --- the rules ---------------------------------------------------------------------------------------------

def test_small_images_on_a_cpu_get_small_views_a_small_model_and_mild_crops():
    plan = make_plan(_stats(32, 32, 400), CPU, {})
    c = _choices(plan)
    assert c["data.global_size"] == (32, "the median image is 32 x 32 px")
    assert c["model.patch_size"][0] == 8 and "4 x 4 tokens" in c["model.patch_size"][1]
    assert c["model.img_size"][0] == 32 and c["data.focal_size"][0] == 16
    assert c["model.arch"][0] == "vit_pico" and c["data.num_focal"][0] == 2  # the fmnist_cpu preset's
    assert c["masking.ratio"][0] == 0.3  # the fmnist_cpu preset's: a cheaper step at the same accuracy
    assert c["data.global_scale"][0] == [0.25, 1.0] and c["data.blur_p"][0] == 0.0  # the fmnist_cpu preset's
    assert c["data.batch_size"] == (32, "an eighth of 400 images")
    assert c["model.num_prototypes"][0] == 64
    assert c["optim.lr"][0] == 1e-3 and "kept for a global batch of 32" in c["optim.lr"][1]  # not scaled down
    assert c["data.num_workers"][0] == 1


def test_28px_images_get_32px_views_and_fashion_mnist_sized_prototypes():
    c = _choices(make_plan(_stats(28, 28, 60_000), CPU, {}))
    assert c["data.global_size"] == (32, "the median image is 28 x 28 px")
    assert c["data.batch_size"][0] == 64 and c["model.num_prototypes"][0] == 128  # the fmnist_cpu preset's
    assert c["data.focal_scale"][0] == [0.1, 0.4] and "Fashion-MNIST preset" in c["data.focal_scale"][1]
    digits = _choices(make_plan(_stats(8, 8, 1_797), CPU, {}))  # 8-px digits: the digits preset's crops
    assert (digits["data.global_scale"][0], digits["data.focal_scale"][0]) == ([0.6, 1.0], [0.3, 0.7])
    assert _choices(make_plan(_stats(64, 64, 10_000), CPU, {}))["data.focal_scale"][0] == [0.15, 0.4]
    assert c["optim.epochs"][0] * (60_000 // 64) >= 5_000  # at least 5,000 steps on a CPU


def test_photos_get_the_paper_views_on_a_gpu_and_96px_on_a_cpu():
    seen = {}

    def largest(cap, values):  # stands in for the GPU memory search (no GPU here)
        seen.update(values, cap=cap)
        return 128

    gpu = _choices(make_plan(_stats(500, 375, 1_281_167), GPU, {}, largest_batch=largest))
    assert (gpu["data.global_size"][0], gpu["model.patch_size"][0], gpu["data.focal_size"][0]) == (224, 16, 96)
    assert gpu["model.arch"][0] == "vit_small" and gpu["data.num_focal"][0] == 10
    assert gpu["masking.ratio"][0] == 0.15 and 0.9999 < gpu["optim.final_ema_momentum"][0] < 1.0  # ~the paper's
    assert gpu["data.global_scale"][0] == [0.3, 1.0] and gpu["data.focal_scale"][0] == [0.05, 0.3]
    assert gpu["data.batch_size"][0] == 128 and "fits the GPU's memory" in gpu["data.batch_size"][1]
    assert seen["model.arch"] == "vit_small" and seen["data.global_size"] == 224 and seen["cap"] == 256
    assert gpu["optim.lr"][0] == 1e-3 and gpu["optim.epochs"][0] == 100
    wide = _choices(make_plan(_stats(500, 375, 1_281_167), Machine("cuda", 16, world=16), {"data.batch_size": 256}))
    assert wide["optim.lr"][0] == pytest.approx(4e-3) and "linear scaling" in wide["optim.lr"][1]  # 4096 images
    assert gpu["data.num_workers"][0] == 15 and gpu["optim.ema_momentum"][0] == 0.996
    cpu = _choices(make_plan(_stats(500, 375, 1_281_167), CPU, {}))
    assert cpu["data.global_size"][0] == 96 and "at most 96 px on a CPU" in cpu["data.global_size"][1]
    assert (cpu["model.patch_size"][0], cpu["data.focal_size"][0]) == (16, 48)


def test_the_gpu_batch_search_goes_down_when_16_do_not_fit_and_is_skipped_when_the_batch_is_given():
    from msn.train.memory import largest_batch

    def search(limit):  # the memory search with a stand-in for the trial step (no GPU here): batches up to limit fit
        tried = []

        def fits(cfg, process, batch):
            tried.append(batch)
            return batch <= limit
        return (lambda start, cap: largest_batch(None, None, start=start, cap=cap, fits=fits)), tried

    for start, limit, cap, found, tried_sizes in [
            (16, 100, 256, 64, [16, 32, 64, 128]), (16, 1_000, 256, 256, [16, 32, 64, 128, 256]),
            (16, 5, 256, 4, [16, 8, 4]), (16, 1, 256, 0, [16, 8, 4, 2]), (16, 100, 8, 8, [8]),
            (24, 2, None, 2, [24, 12, 6, 3, 2]), (1, 3, None, 2, [2, 4])]:  # msn-bench's start: data.batch_size
        run, tried = search(limit)
        assert run(start, cap) == found and tried == tried_sizes
    with pytest.raises(ValueError, match="not even a batch of 2 images fits"):
        make_plan(_stats(96, 96, 50_000), GPU, {}, largest_batch=lambda cap, values: search(1)[0](16, cap))
    big = _choices(make_plan(_stats(96, 96, 50_000), GPU, {}, largest_batch=lambda cap, values: search(5)[0](16, cap)))
    assert big["data.batch_size"] == (4, "the largest batch whose step fits the GPU's memory")

    def no_search(cap, values):
        raise AssertionError("searched the GPU's memory for a batch the user gave")
    given = make_plan(_stats(96, 96, 50_000), GPU, {"data.batch_size": 32}, largest_batch=no_search)
    assert "data.batch_size" not in _choices(given) and _choices(given)["model.num_prototypes"][0] == 64
    few = _choices(make_plan(_stats(96, 96, 12), GPU, {}, largest_batch=no_search))  # 12 images: nothing to search
    assert few["data.batch_size"][0] == 2 and "BatchNorm needs 2 images" in few["data.batch_size"][1]
    epoch = _choices(make_plan(_stats(28, 28, 60_000), CPU, {}, epoch_images=256))  # data.samples_per_epoch=256
    assert epoch["data.batch_size"] == (32, "an eighth of 256 images")


def test_every_global_view_size_gets_the_tokens_its_device_is_given():
    for machine, least, most in ((CPU, 4, 6), (GPU, 8, 14)):  # 4 x 4 to 6 x 6 on a CPU; 8 x 8 to 14 x 14 on a GPU
        for side in range(8, 600, 4):
            c = _choices(make_plan(_stats(side, side, 10_000), machine, {}))
            grid = c["data.global_size"][0] // c["model.patch_size"][0]
            assert least <= grid <= most, (machine.device, side, c["data.global_size"][0], c["model.patch_size"][0])
            assert c["data.global_size"][0] % c["model.patch_size"][0] == 0
    c = _choices(make_plan(_stats(48, 48, 10_000), CPU, {}))
    assert (c["data.global_size"][0], c["model.patch_size"]) == (48, (8, "6 x 6 tokens a global view on a CPU"))


def test_model_and_prototypes_follow_the_data_set_size():
    assert _choices(make_plan(_stats(96, 96, 5_000), GPU, {}))["model.arch"][0] == "vit_tiny"
    assert _choices(make_plan(_stats(96, 96, 50_000), GPU, {}))["model.arch"][0] == "vit_small"
    few = _choices(make_plan(_stats(96, 96, 1_797), CPU, {"data.batch_size": 64}))
    many = _choices(make_plan(_stats(96, 96, 1_281_167), GPU, {"data.batch_size": 1024}))
    assert few["model.num_prototypes"][0] == 64 and many["model.num_prototypes"][0] == 1024


def test_the_run_length_warmup_and_ema_follow_the_number_of_steps():
    short = _choices(make_plan(_stats(32, 32, 1_797), CPU, {"optim.epochs": 20}))  # 20 x 28 = 560 steps
    assert short["optim.warmup_epochs"][0] == pytest.approx(28 / 28)  # 5 % of 560 steps = 28 steps = 1 epoch
    assert short["optim.ema_momentum"][0] == 0.99  # the digits preset's for a run this short
    assert short["optim.final_ema_momentum"][0] == 0.99  # 1.0 would freeze the target within the run
    fmnist = _choices(make_plan(_stats(28, 28, 60_000), CPU, {"optim.max_steps": 7_500}))
    assert 0.995 <= fmnist["optim.final_ema_momentum"][0] < 0.998  # the fmnist_cpu preset's 0.995 at 7,500 steps
    long = _choices(make_plan(_stats(32, 32, 1_797), CPU, {"optim.epochs": 2000}))  # 56,000 steps
    assert long["optim.ema_momentum"][0] == 0.996
    assert 0.9995 < long["optim.final_ema_momentum"][0] < 1.0  # towards the paper's 1.0 as the run grows
    assert "(the paper's 0.996 at most)" in long["optim.ema_momentum"][1]


def test_the_reasons_of_a_run_of_a_few_steps_read_as_sentences():
    tiny = _choices(make_plan(_stats(32, 32, 400), CPU, {"optim.max_steps": 3}))
    assert tiny["optim.warmup_epochs"][1] == "5 % of the run: 1 step"
    assert tiny["optim.ema_momentum"][1] == ("the target averages ~100 steps, more than the run's 3 steps "
                                             "(0.99 at least, the digits preset's)")
    assert "more than the run's 3 steps" in tiny["optim.final_ema_momentum"][1]
    assert "%" not in tiny["optim.ema_momentum"][1] + tiny["optim.final_ema_momentum"][1]
    three = _choices(make_plan(_stats(32, 32, 3), Machine("cpu", cores=1), {}))  # batch 2: one step an epoch
    assert three["optim.epochs"][1].startswith("1 step an epoch: 5,000 steps")
    assert three["data.num_workers"] == (1, "1 core: one worker, sharing it with the step")
    wide = _choices(make_plan(_stats(32, 32, 50_000), Machine("cuda", cores=64), {}))
    assert wide["data.num_workers"] == (16, "64 cores for this process: 16 at most (a ViT-S step needs about 13)")


def test_the_warm_up_a_plan_states_is_the_one_the_schedules_take():
    from msn.train.builder import build_schedules

    cfg = compose_config(["data=folder"])
    cases = [(20, 49), (400, 49), (1_644, 937), (5_012, 28), (3, 12), *((t, 57) for t in range(1, 300))]
    for total, per_epoch in cases:
        plan = _choices(make_plan(_stats(32, 32, per_epoch * 64), CPU, {"optim.max_steps": total}))
        stated = int(plan["optim.warmup_epochs"][1].split(": ")[1].split()[0].replace(",", ""))
        cfg.optim.warmup_epochs = plan["optim.warmup_epochs"][0]
        # the value is stored in config.yaml and read back on resume: the same steps after the round trip
        cfg = OmegaConf.create(OmegaConf.to_yaml(cfg))
        assert build_schedules(cfg, total, per_epoch).warmup_steps == stated == max(1, round(0.05 * total))


def test_what_the_user_gives_is_left_alone_and_the_rest_fits_around_it():
    plan = make_plan(_stats(32, 32, 400), CPU, {"model.patch_size": 4, "data.batch_size": 16})
    c = _choices(plan)
    assert "model.patch_size" not in c and "data.batch_size" not in c
    assert c["data.focal_size"][0] % 4 == 0 and "global batch of 16" in c["optim.lr"][1]
    assert "yours, as given: data.batch_size=16, model.patch_size=4" in plan.lines()[-1]
    c = _choices(make_plan(_stats(32, 32, 400), CPU, {"data.global_size": 40}))
    assert 40 % c["model.patch_size"][0] == 0 and c["model.img_size"][0] == 40
    c = _choices(make_plan(_stats(28, 28, 60_000), CPU, {"model.patch_size": 7}))  # the fmnist_cpu preset's views
    assert (c["data.global_size"][0], c["data.focal_size"][0]) == (28, 14)
    assert _choices(make_plan(_stats(500, 375, 999), CPU, {"model.patch_size": 7}))["data.global_size"][0] == 91


def test_the_check_before_a_fitted_run_leaves_the_views_to_its_plan():
    from msn.config import ConfigError, to_schema

    to_schema(compose_config(["data=folder", "data.root=.", "model.patch_size=7"]))  # 224/96-px defaults: fitted
    with pytest.raises(ConfigError, match="not divisible by model.patch_size=7"):  # a preset's are checked at once
        to_schema(compose_config(["experiment=cpu_smoke", "data=folder", "data.root=.", "model.patch_size=7"]))


def test_the_command_line_names_what_it_gives_and_whether_to_fit():
    assert override_keys(["optim.lr=1e-3", "+x.y=1", "~z", "hydra.run.dir=o"]) == {"optim.lr", "x.y", "z"}
    assert {"model.arch", "model.patch_size", "model.head_output_dim"} <= override_keys(["model=vit_small"])
    assert not {"model.num_prototypes", "model.img_size"} & override_keys(["model=vit_small"])  # fitted around it
    assert not {k for k in override_keys(["data=folder"]) if k.startswith("data.")}  # the source, not its values
    assert should_fit("auto", "folder", ["data=folder", "data.root=x"])
    assert should_fit("auto", "hf", []) and should_fit("auto", "mypkg.Source", [])
    assert not should_fit("auto", "folder", ["experiment=msn_vits16", "data.root=x"])
    assert should_fit("auto", "folder", ["experiment=null"])
    assert not should_fit("auto", "digits", []) and not should_fit("auto", "fashion_mnist", [])
    assert should_fit("true", "digits", []) and not should_fit("false", "folder", [])
    assert not should_fit("auto", "folder", None)  # a config built in code (no command line): its values are kept


def test_a_budget_and_a_given_length_are_refused_and_init_from_fixes_the_model():
    from msn.config import ConfigError, to_schema
    from msn.train.fitting import given_values

    with pytest.raises(ConfigError, match="optim.budget=30m sets the run's length, and so does optim.epochs"):
        to_schema(compose_config(["data=folder", "data.root=.", "optim.budget=30m", "optim.epochs=5"]))
    cfg = compose_config(["data=folder", "data.root=.", "init_from=weights.pt"])
    assert {"model.arch", "model.patch_size", "model.num_prototypes"} <= set(given_values(cfg))


def test_budgets_and_the_steps_they_hold():
    assert (budget_seconds("30m"), budget_seconds("2h"), budget_seconds("1h30m"), budget_seconds("90s")) == (
        1800, 7200, 5400, 90)
    for bad in ("30", "soon", "0m"):
        with pytest.raises(ValueError):
            budget_seconds(bad)
    assert budget_steps(600, 100, 0.5, 23) == 1023  # 500 s left at 0.5 s a step
    assert budget_steps(600, 700, 0.5, 23) == 24  # over budget already: one more step


def test_image_sizes_are_read_from_the_files_of_a_folder(tmp_path):
    from msn.data.sources.folder import ImageFolderDataset
    from msn.plan import median_size

    _folder(tmp_path / "a", (40, 30), 5, "jpg")
    _folder(tmp_path / "a", (64, 64), 3, "png", seed=1)  # the same names' png twins: 8 images
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")  # left out of the sizes, counted in the set
    stats = measure_images(ImageFolderDataset(tmp_path / "a"))
    assert (stats.count, stats.sampled, stats.median_width, stats.median_height, stats.short_side) == (9, 8, 40, 30,
                                                                                                      30)
    assert ImageStats.from_dict(stats.to_dict()) == stats and stats.colour_share == 1.0  # RGB files
    old_record = {k: v for k, v in stats.to_dict().items() if k != "colour_share"}  # a plan made before colour
    assert ImageStats.from_dict(old_record).colour_share == 0.0
    (tmp_path / "grey").mkdir()
    for i in range(4):  # grey-level files (mode L): not colour
        Image.fromarray(np.full((20, 24), 40 * i, np.uint8), "L").save(tmp_path / "grey" / f"{i}.png")
    grey = measure_images(ImageFolderDataset(tmp_path / "grey"))
    assert (grey.median_width, grey.median_height, grey.colour_share) == (24, 20, 0.0)
    levels = np.array([0, 40, 80, 120]) / 255  # one level an image: the pixels' spread is the levels'
    assert grey.mean == pytest.approx((levels.mean(),) * 3, abs=1e-3)
    assert grey.std == pytest.approx((levels.std(),) * 3, abs=1e-3)
    assert ImageStats.from_dict(grey.to_dict()) == grey
    before_pixels = {k: v for k, v in grey.to_dict().items() if k not in ("mean", "std")}  # a plan made before them
    assert ImageStats.from_dict(before_pixels).mean is None
    (tmp_path / "photos").mkdir()  # photos are read at a fraction of their size: the same mean
    for i, colour in enumerate([(200, 40, 0), (0, 120, 240)]):
        Image.fromarray(np.full((480, 640, 3), colour, np.uint8)).save(tmp_path / "photos" / f"{i}.jpg", quality=95)
    photos = measure_images(ImageFolderDataset(tmp_path / "photos"))
    assert photos.mean == pytest.approx((100 / 255, 80 / 255, 120 / 255), abs=0.01)
    assert photos.std == pytest.approx((100 / 255, 40 / 255, 120 / 255), abs=0.01)
    (tmp_path / "cut").mkdir()  # JPEGs cut short: their headers give sizes, their pixels do not decode
    _folder(tmp_path / "cut", (40, 30), 3, "png")
    for i in range(4):
        whole = tmp_path / "cut" / f"{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(whole)
        whole.write_bytes(whole.read_bytes()[:1_000])  # of about 3,000
    cut = measure_images(ImageFolderDataset(tmp_path / "cut"))  # the sizes a resume reads again are the same ones
    assert (cut.median_width, cut.median_height, cut.sampled) == (*median_size(ImageFolderDataset(tmp_path / "cut")),
                                                                  7)


def test_what_shows_grey_counts_as_grey_and_16_bit_images_are_measured_as_training_decodes_them(tmp_path):
    from msn.data.sources.custom import CustomImages
    from msn.data.sources.folder import ImageFolderDataset

    rng = np.random.default_rng(0)
    (tmp_path / "x16").mkdir()  # 16-bit grey PNGs (microscopy, X-rays): clipped at 255 they would all read white
    levels = [rng.integers(0, 65536, (30, 30)).astype(np.uint16) for _ in range(3)]
    for i, values in enumerate(levels):
        Image.fromarray(values).save(tmp_path / "x16" / f"{i}.png")
    x16 = measure_images(ImageFolderDataset(tmp_path / "x16"))
    as_trained = np.stack([np.rint(v * (255 / 65535)) / 255 for v in levels])  # msn.data.images.to_8bit's levels
    assert x16.mean == pytest.approx((as_trained.mean(),) * 3, abs=1e-3) and x16.colour_share == 0.0
    (tmp_path / "scans").mkdir()  # grey content saved as RGB JPEGs and as a grey palette: grey
    for i in range(3):
        grey = Image.fromarray(rng.integers(0, 256, (48, 48)).astype(np.uint8), "L")
        grey.convert("RGB").save(tmp_path / "scans" / f"{i}.jpg", quality=90)
        grey.convert("P").save(tmp_path / "scans" / f"{i}.png")
    assert measure_images(ImageFolderDataset(tmp_path / "scans")).colour_share == 0.0
    coloured = _folder(tmp_path / "colour", (48, 48), 3, "jpg")  # colour blobs: colour
    assert measure_images(ImageFolderDataset(coloured)).colour_share == 1.0
    (tmp_path / "dark").mkdir()  # small coloured things on black (fluorescence, night skies): colour
    for i, colour in enumerate([(255, 40, 40), (40, 200, 90), (60, 90, 255)]):
        pixels = np.zeros((128, 128, 3), np.uint8)
        pixels[50:68, 60:78] = colour  # 2 % of the image
        Image.fromarray(pixels).save(tmp_path / "dark" / f"{i}.png")
        marked = np.repeat(rng.integers(0, 256, (128, 128, 1)), 3, axis=2).astype(np.uint8)
        marked[120:124, 4:40] = (255, 0, 0)  # a grey scan with a red scale bar (0.9 %): grey
        Image.fromarray(marked).save(tmp_path / "scans" / f"bar{i}.png")
    assert measure_images(ImageFolderDataset(tmp_path / "dark")).colour_share == 1.0
    assert measure_images(ImageFolderDataset(tmp_path / "scans")).colour_share == 0.0
    # a dataset class of the user's (data=custom) is handed out as RGB copies: what they show decides
    garments = [Image.fromarray(rng.integers(0, 256, (28, 28)).astype(np.uint8), "L") for _ in range(4)]
    custom = measure_images(CustomImages(garments, "mypkg.Garments"))
    assert custom.colour_share == 0.0 and custom.median_width == 28
    painted = [Image.open(path) for path in sorted(coloured.iterdir())]
    assert measure_images(CustomImages(painted, "mypkg.Paintings")).colour_share == 1.0


def test_grey_images_are_normalised_with_their_own_statistics_colour_ones_with_imagenets():
    fashion = ImageStats(60_000, 256, 28, 28, 28, 28, 0.0, mean=(0.286,) * 3, std=(0.353,) * 3)
    c = _choices(make_plan(fashion, CPU, {}))
    assert (c["data.mean"][0], c["data.std"][0]) == ([0.286] * 3, [0.353] * 3)
    assert "grey images: the 256 sampled images' pixels" in c["data.mean"][1]
    assert c["data.color_jitter_p"] == (0.5, "grey images: the digits and Fashion-MNIST presets' (brightness and "
                                        "contrast are all the jitter changes)")
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    for side, machine in ((500, GPU), (64, CPU)):  # colour photos and small colour images: the paper's
        colour = ImageStats(10_000, 256, side, side, side, side, 1.0, mean=(0.5, 0.4, 0.3), std=(0.3,) * 3)
        c = _choices(make_plan(colour, machine, {}))
        assert (c["data.mean"][0], c["data.std"][0]) == imagenet and c["data.color_jitter_p"][0] == 0.8
    c = _choices(make_plan(_stats(28, 28, 60_000), CPU, {}))  # a plan recorded before the pixels were measured
    assert c["data.mean"] == (imagenet[0], "ImageNet's (the paper's)")
    given = _choices(make_plan(fashion, CPU, {"data.mean": [0.5] * 3, "data.std": [0.5] * 3}))
    assert "data.mean" not in given and "data.std" not in given


def test_small_colour_images_get_a_stronger_colour_distortion_than_grey_ones_or_photos():
    colour = _choices(make_plan(_stats(64, 64, 10_000, colour=1.0), CPU, {}))
    assert (colour["data.color_jitter"][0], colour["data.grayscale_p"][0]) == (1.0, 0.5)
    assert "colour must not tell the views apart" in colour["data.color_jitter"][1]
    grey = _choices(make_plan(_stats(64, 64, 10_000, colour=0.0), CPU, {}))
    photos = _choices(make_plan(_stats(500, 375, 10_000, colour=1.0), GPU, {}))
    for c in (grey, photos):  # the paper's
        assert (c["data.color_jitter"][0], c["data.grayscale_p"][0]) == (0.5, 0.2)
    assert grey["data.color_jitter"][1] == "the paper's (grey images)"
    # with that distortion, the digits preset's milder crops and no blur (docs/studies.md); grey ones keep theirs
    assert (colour["data.global_scale"][0], colour["data.focal_scale"][0], colour["data.blur_p"][0]) == (
        [0.6, 1.0], [0.3, 0.7], 0.0)
    assert "colour distortion" in colour["data.global_scale"][1] and "colour distortion" in colour["data.blur_p"][1]
    assert (grey["data.global_scale"][0], grey["data.blur_p"][0]) == ([0.4, 1.0], 0.5)
    assert photos["data.global_scale"][0] == [0.3, 1.0] and photos["data.blur_p"][0] == 0.5


# --- real runs ---------------------------------------------------------------------------------------------

def _run(tmp_path: Path, root: Path, *overrides: str) -> dict:
    run_dir = tmp_path / "run"
    train(compose_config(["data=folder", f"data.root={root}", f"run_dir={run_dir}", "logger.progress=false",
                          "data.num_workers=0", *overrides]))
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_a_folder_of_32px_images_trains_with_the_fitted_recipe(tmp_path):
    cfg = _run(tmp_path, _folder(tmp_path / "img", (32, 32), 40), "optim.max_steps=2")
    assert (cfg["data"]["global_size"], cfg["data"]["focal_size"], cfg["model"]["patch_size"],
            cfg["model"]["img_size"], cfg["model"]["arch"]) == (32, 16, 8, 32, "vit_pico")
    assert cfg["data"]["batch_size"] == 4  # an eighth of 40 images
    assert cfg["fitted"]["images"]["median_width"] == 32
    assert cfg["fitted"]["values"]["data.global_size"]["reason"] == "the median image is 32 x 32 px"
    assert "data.num_workers" not in cfg["fitted"]["values"]  # given on the command line
    assert (cfg["data"]["mean"], cfg["data"]["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # colour
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 2


def test_a_folder_of_grey_images_trains_normalised_with_its_own_pixels(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "grey").mkdir()
    for i in range(24):  # 28-px garments' stand-ins: dark blobs on black, mode L
        blob = np.kron(rng.integers(0, 160, (7, 7)), np.ones((4, 4))) * (rng.random((28, 28)) < 0.6)
        Image.fromarray(blob.astype(np.uint8), "L").save(tmp_path / "grey" / f"{i:02d}.png")
    cfg = _run(tmp_path, tmp_path / "grey", "optim.max_steps=1")
    pixels = np.stack([np.asarray(Image.open(p), np.float64) / 255 for p in sorted((tmp_path / "grey").iterdir())])
    assert cfg["data"]["mean"] == pytest.approx([pixels.mean()] * 3, abs=1e-3)  # all 24 are sampled
    assert cfg["data"]["std"] == pytest.approx([pixels.std()] * 3, abs=1e-3)
    assert cfg["data"]["color_jitter_p"] == 0.5 and cfg["fitted"]["images"]["mean"] == cfg["data"]["mean"]


def test_a_folder_of_96px_images_gets_96px_views_and_an_override_wins(tmp_path):
    root = _folder(tmp_path / "img", (96, 96), 24, "jpg")
    cfg = _run(tmp_path, root, "optim.max_steps=1", "data.batch_size=8")
    assert (cfg["data"]["global_size"], cfg["model"]["patch_size"], cfg["data"]["focal_size"]) == (96, 16, 48)
    assert cfg["data"]["batch_size"] == 8 and "data.batch_size" not in cfg["fitted"]["values"]
    assert "global batch of 8" in cfg["fitted"]["values"]["optim.lr"]["reason"]  # fitted around the given batch
    from msn.train.fitting import fit_composed

    cfg = compose_config(["data=folder", f"data.root={root}", "device=cpu", "run_dir=.", "data.global_size=64",
                          "model.arch=vit_tiny", "model.depth=2"])  # fitted as the run would, without training
    fit_composed(cfg, local_process(cfg))
    assert (cfg.data.global_size, cfg.model.arch, cfg.model.depth) == (64, "vit_tiny", 2)
    assert 64 % cfg.model.patch_size == 0 and "model.arch" not in cfg.fitted["values"]
    assert cfg.model.head_hidden_dim == 2048  # vit_tiny's head, not the vit_pico default's
    cfg = compose_config(["data=folder", f"data.root={root}", "device=cpu", "run_dir=.", "model=vit_small"])
    fit_composed(cfg, local_process(cfg))  # ViT-S/16 chosen by its group: its position grid sized to the views
    assert (cfg.model.arch, cfg.model.patch_size, cfg.data.global_size, cfg.model.img_size) == ("vit_small", 16, 96, 96)


def test_a_resume_reuses_the_recorded_plan_and_says_the_images_changed(tmp_path, caplog, monkeypatch):
    from msn.plan import measure

    root = _folder(tmp_path / "img", (32, 32), 40)
    first = _run(tmp_path, root, "optim.max_steps=2", "optim.lr=2e-3")
    for path in root.iterdir():  # the same 40 files, now 64 px: the plan would change, the run's must not
        Image.open(path).resize((64, 64)).save(path)
    caplog.set_level("INFO")

    def no_pixels(image):
        raise AssertionError("a resume decoded the sample's pixels: it measures nothing again but the sizes")
    monkeypatch.setattr(measure, "pixel_moments", no_pixels)
    second = _run(tmp_path, root, "optim.max_steps=4", "optim.lr=2e-3", "optim.scale_lr=true")
    assert second["data"]["global_size"] == 32 == first["data"]["global_size"]
    assert second["optim"]["lr"] == 2e-3 and "this run started without it, and a resume keeps its lr" in caplog.text
    assert second["fitted"]["images"] == first["fitted"]["images"]
    assert "resumed from" in caplog.text and "median size changed" in caplog.text
    assert json.loads((tmp_path / "run" / "status.json").read_text())["step"] == 4


def test_a_run_started_without_a_plan_keeps_its_values_when_resumed(tmp_path, caplog):
    """A run folder whose config.yaml records no plan (a run from before fitting, or fit=false) is continued with its
    values: fit=auto on the rerun chooses nothing."""
    root = _folder(tmp_path / "img", (32, 32), 24)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("data:\n  global_size: 224\n")  # the earlier session's: no fitted
    cfg = compose_config(["data=folder", f"data.root={root}", "device=cpu", f"run_dir={tmp_path / 'run'}"])
    caplog.set_level("INFO")
    from msn.data.sources.folder import ImageFolderDataset

    plan = fit_run(cfg, process=local_process(cfg), images=ImageFolderDataset(root),
                   resume_path=tmp_path / "run" / "checkpoints" / "last.pt")
    assert plan is None and cfg.fitted is None and cfg.data.global_size == 224  # the folder default, as trained
    assert "no fitted plan recorded" in caplog.text


def test_a_time_budget_fixes_the_run_length_from_its_timed_steps(tmp_path, caplog):
    # random blobs teach nothing: on a fast machine the run lasts long enough for the collapse watch to stop it as
    # uniform (from step 120), which is not what this test is about
    cfg = _run(tmp_path, _folder(tmp_path / "img", (32, 32), 40), "optim.budget=6s", "checkpoint.last_every_steps=10",
               "collapse.stop=false")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    total = cfg["fitted"]["length"]["steps"]
    assert total == run["total_steps"] == cfg["optim"]["max_steps"] >= 26  # the 5 + 20 steps timed, and more
    assert "optim.budget=6s at" in cfg["fitted"]["values"]["optim.max_steps"]["reason"]
    warmup_steps = int(cfg["optim"]["warmup_epochs"] * run["steps_per_epoch"])  # as the schedules take it
    assert warmup_steps == max(1, round(0.05 * total))  # 5 % of the run: refitted for the decided length
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status == {**status, "status": "finished", "step": total}
    assert cfg["fitted"]["length"]["budget"] == "6s"
    _run(tmp_path, tmp_path / "img", "optim.budget=0m6s", "collapse.stop=false")  # the same budget, written otherwise
    assert "is not this run's" not in caplog.text
    again = _run(tmp_path, tmp_path / "img", "optim.budget=1m", "collapse.stop=false")  # another budget: kept, said
    assert ("optim.budget=1m is not this run's: optim.budget=6s fixed its length at "
            f"{total:,} steps") in caplog.text and again["optim"]["max_steps"] == total


def test_presets_are_left_as_written_and_scale_lr_scales_them(tmp_path):
    proc = local_process(compose_config(["device=cpu"]))
    for overrides in (["experiment=fmnist_cpu"], [], ["experiment=msn_vits16", "data.root=."],
                      ["experiment=cpu_smoke", "data=folder", "data.root=."]):
        cfg = compose_config([*overrides, "run_dir=."])
        before = OmegaConf.to_yaml(cfg)
        assert fit_run(cfg, process=proc, images=[], resume_path=None) is None
        assert OmegaConf.to_yaml(cfg) == before, overrides
    cfg = compose_config(["experiment=fmnist_cpu", "optim.scale_lr=true", "run_dir=."])
    fit_run(cfg, process=proc, images=[], resume_path=None)
    assert cfg.optim.lr == pytest.approx(1e-3 * 64 / 1024) and cfg.optim.start_lr == pytest.approx(2e-4 * 64 / 1024)
    assert "optim.scale_lr" in cfg.fitted["values"]["optim.lr"]["reason"]
    from msn.data.sources.folder import ImageFolderDataset

    root = _folder(tmp_path / "img", (32, 32), 64)  # a fitted run: the lr the user gives is scaled, its own is not
    cfg = compose_config(["data=folder", f"data.root={root}", "optim.scale_lr=true", "optim.lr=2e-3", "run_dir=."])
    fit_run(cfg, process=proc, images=ImageFolderDataset(root), resume_path=None)
    assert cfg.data.batch_size == 8 and cfg.optim.lr == pytest.approx(2e-3 * 8 / 1024)
    assert cfg.optim.start_lr == pytest.approx(2e-4)  # the plan's, for a global batch of 8: kept below 1024
    assert cfg.fitted["scaled_lr"] and "optim.scale_lr" in cfg.fitted["values"]["optim.lr"]["reason"]


def test_plan_true_prints_the_plan_and_trains_nothing(tmp_path):
    root = _folder(tmp_path / "img", (28, 28), 16)
    result = subprocess.run(["msn-pretrain", "data=folder", f"data.root={root}", "plan=true"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "plan for 16 images, median 28 x 28 px" in out
    assert "data.global_size" in out and "the median image is 28 x 28 px" in out
    assert "would train vit_pico (patch 8, native 32 px)" in out
    assert not any((tmp_path / "outputs").glob("*")) if (tmp_path / "outputs").exists() else True


def _fitted_worker(rank: int, world: int, run_dir: str, root: str) -> int:
    train(compose_config(["data=folder", f"data.root={root}", f"run_dir={run_dir}", "logger.progress=false",
                          "data.num_workers=0", "optim.budget=5s"]))
    return rank


@pytest.mark.slow
def test_two_processes_train_one_plan_and_one_budget_decision(tmp_path):
    """Rank 0 measures, plans and times; both ranks apply its plan and stop after the same step (a rank that fitted
    or decided on its own would fail a collective or wait for ever). Two real gloo processes."""
    from tests.dist_utils import run_distributed

    root = _folder(tmp_path / "img", (48, 48), 64)
    run_distributed(_fitted_worker, world_size=2, args=(str(tmp_path / "run"), str(root)))
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    state_step = json.loads((tmp_path / "run" / "status.json").read_text())["step"]
    assert run["world_size"] == 2 and cfg["data"]["batch_size"] == 4  # an eighth of 64 images over 2 processes
    assert cfg["data"]["global_size"] == 48 and state_step == run["total_steps"] == cfg["fitted"]["length"]["steps"]


def test_the_budget_clock_times_a_twentieth_of_the_budget_before_it_decides(monkeypatch):
    """At 0.1 s a step, 20 timed steps are 2 s of a 200-s budget: the clock times on until 10 s (5 %), then gives the
    steps 95 % of the budget holds. A fake clock: each step takes 0.1 s, the start-up 3 s."""
    import msn.train.fitting as fitting

    now = [3.0]
    monkeypatch.setattr(fitting.time, "perf_counter", lambda: now[0])
    clock = fitting.BudgetClock("200s", 200.0, start_step=0, started=0.0, workers=1)  # 5 + 2 skipped steps
    decisions = {}
    for step in range(1, 400):
        now[0] += 0.1
        decision = clock.after_step(step)
        if decision is not None:
            decisions[step] = decision
            break
    (step, (total, pace)), = decisions.items()
    assert clock.timed_start == 7 and step == 7 + 100 and pace == pytest.approx(0.1)
    assert total == 107 + 1_763  # 190 s less the 13.7 s spent (3 s, and 107 steps of 0.1 s): 1,763 more steps
