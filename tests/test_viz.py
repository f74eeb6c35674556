"""msn-viz: every kind writes a PNG of the documented size, from a run, overrides or an hf export; the
views grid shows the trainer's own views and masks; attention is the same for a checkpoint and its export."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from msn.cli.viz import main
from msn.data.loader import EpochSampler, MultiCropDataset, RunSampler, build_loader
from msn.data.multicrop import MultiCropTransform
from msn.data.registry import build_dataset
from msn.models.masking import MaskGenerator
from msn.plots.attention import COLORBAR_PX, TITLE_PX, attention_figure, cls_attention
from msn.plots.common import GREY, to_display
from msn.plots.views import DROPPED_LABEL, LEGEND_PX, views_figure
from msn.train.loop import train
from msn.train.views import trainer_views
from msn.weights.export import export_hf
from msn.weights.read import read_source
from tests.conftest import compose_config

SMOKE = ["experiment=cpu_smoke", "masking.ratio=0.5", "data.batch_size=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 4-step cpu_smoke run (logged every step) and its hf export next to it."""
    run_dir = tmp_path_factory.mktemp("viz") / "run"
    train(compose_config([*SMOKE, f"run_dir={run_dir}", "logger.progress=false", "optim.max_steps=4"]))
    export_hf(read_source(run_dir), run_dir / "hf")
    return run_dir


def _png(path: Path) -> Image.Image:
    image = Image.open(path)
    assert image.format == "PNG"
    image.load()  # a truncated file fails here
    return image


def test_views_grid_shows_the_trainers_batch_and_greys_exactly_the_dropped_patches(tmp_path, capsys):
    step, count = 5, 3
    out = tmp_path / "views.png"
    assert main(["views", *SMOKE, "--step", str(step), "--count", str(count), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    picture = np.asarray(_png(out).convert("RGB"))
    cell = 96  # the smallest multiple of the 32-px global view that is at least 96
    assert picture.shape == (count * cell + LEGEND_PX, (2 + 2) * cell, 3)  # target, anchor, 2 focal views; legend
    assert (picture[count * cell:] < 100).any()  # the legend's text and swatch are drawn under the grid

    # what the trainer does at this step, rebuilt from its parts
    cfg = compose_config(SMOKE)
    base = build_dataset(cfg.data)
    sampler = RunSampler(EpochSampler(len(base), seed=cfg.seed), cfg.data.batch_size, start_step=step)
    loader = build_loader(cfg.data, MultiCropDataset(base, MultiCropTransform(cfg.data), seed=cfg.seed), sampler)
    batch = next(iter(loader)).views()
    make_masks = MaskGenerator(0.5, True, False, cfg.model.patch_size, cfg.seed)
    keep = make_masks(step, 8, anchor_size=32).anchor_keep  # (8, K)
    tv = trainer_views(cfg, step, count)
    assert all(torch.equal(a, b[:count]) for a, b in zip(tv.views, batch, strict=True))
    figure = views_figure(tv.views, tv.dropped, mean=list(cfg.data.mean), std=list(cfg.data.std), cell=cell)
    (legend,) = figure.legends  # what the grey patches are: it had no legend
    assert [t.get_text() for t in legend.get_texts()] == [DROPPED_LABEL] and "dropped" in DROPPED_LABEL
    assert legend.legend_handles[0].get_facecolor()[:3] == pytest.approx((GREY / 255,) * 3)
    plt.close(figure)

    grid = 32 // cfg.model.patch_size  # patches per side
    scale = cell // grid  # px per patch in the picture
    for i in range(count):
        dropped = set(range(grid * grid)) - set(keep[i].tolist())
        assert len(dropped) == grid * grid - keep.shape[1] > 0
        anchor = picture[i * cell:(i + 1) * cell, cell:2 * cell]
        for p in range(grid * grid):
            r, c = divmod(p, grid)
            block = anchor[r * scale:(r + 1) * scale, c * scale:(c + 1) * scale]
            if r == 0 and c < 3:
                continue  # the column label is drawn over the first row's top-left corner
            assert (block == GREY).all() == (p in dropped), (i, p)
        target = picture[i * cell:(i + 1) * cell, :cell][::3, ::3]  # nearest upscaling x3: every 3rd pixel
        if i > 0:  # the first row carries the labels
            assert np.array_equal(target, to_display(batch[0][i:i + 1], cfg.data.mean, cfg.data.std)[0])


def test_views_of_a_run_directory_use_its_config(run, tmp_path):
    out = tmp_path / "v.png"
    assert main(["views", str(run), "--count", "2", "--cell", "64", "--out", str(out)]) == 0
    assert _png(out).size == (4 * 64, 2 * 64 + LEGEND_PX)


def test_attention_of_a_checkpoint_and_of_its_hf_export_are_the_same(run, tmp_path):
    from msn.eval.features import load_encoder
    from msn.eval.splits import load_splits
    from msn.plots.attention import load_images

    checkpoint, export = load_encoder(run), load_encoder(run / "hf")
    _, test = load_splits("digits")
    images = load_images(checkpoint, dataset_images=[test.images[i] for i in range(3)])
    maps = cls_attention(checkpoint.backbone, images)
    heads, grid = checkpoint.backbone.blocks[-1].attn.num_heads, 32 // 8
    assert maps.shape == (3, heads, grid, grid)
    assert ((maps.sum(dim=(2, 3)) > 0) & (maps.sum(dim=(2, 3)) < 1)).all()  # the rest is CLS on itself
    torch.testing.assert_close(cls_attention(export.backbone, images), maps, atol=1e-6, rtol=0)

    # the same weights as timm's own (unfused) attention computes them
    attn = checkpoint.backbone.blocks[-1].attn
    seen = []
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            checkpoint.backbone(images)
    finally:
        attn.fused_attn = fused
        hook.remove()
    torch.testing.assert_close(seen[0][:, :, 0, 1:].reshape(maps.shape), maps, atol=1e-6, rtol=0)

    for source in (run, run / "hf"):
        out = tmp_path / f"{source.name}.png"
        assert main(["attention", str(source), "--count", "3", "--cell", "48", "--out", str(out)]) == 0
        assert _png(out).size == ((2 + heads) * 48 + COLORBAR_PX, TITLE_PX + 3 * 48)

    # the picture names the block and the encoder, and has a colour bar of its overlay (it had neither)
    figure = attention_figure(images, maps, checkpoint.mean, checkpoint.std, 48, block=4, blocks=4)
    assert figure.get_suptitle().startswith("target encoder, block 4 of 4: CLS-to-patch attention\nmean over ")
    (bar,) = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert bar.get_ylabel() == "attention" and [t.get_text() for t in bar.get_yticklabels()] == ["min", "max"]
    plt.close(figure)


def test_attention_on_image_files(run, tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "files.png"
    assert main(["attention", str(run / "hf"), "--images", *map(str, paths), "--out", str(out)]) == 0
    assert _png(out).size[1] == TITLE_PX + 2 * 96


def test_crop_pct_sets_what_the_attention_and_prototype_pictures_see(run, tmp_path, monkeypatch):
    """--crop-pct reaches the images the encoder sees: attention gets exactly msn-eval's crop-1 view of the
    test images (not the default 0.875 one), and prototypes assign with the same crop."""
    import msn.plots.attention as attention
    import msn.plots.prototypes as prototypes
    from msn.eval.features import load_encoder
    from msn.eval.splits import load_splits

    seen_images, seen_crops = [], []
    real_attention, real_use = attention.cls_attention, prototypes.prototype_use
    monkeypatch.setattr(attention, "cls_attention", lambda b, x: seen_images.append(x) or real_attention(b, x))
    monkeypatch.setattr(prototypes, "prototype_use",
                        lambda m, enc, images: seen_crops.append(enc.crop_pct) or real_use(m, enc, images))
    out = tmp_path / "a.png"
    for crop in ("1", "0.875"):
        assert main(["attention", str(run / "hf"), "--count", "2", "--crop-pct", crop, "--out", str(out)]) == 0
    _, test = load_splits("digits")
    pictures = [test.images[i] for i in range(2)]
    whole = attention.load_images(load_encoder(run / "hf", crop_pct=1.0), dataset_images=pictures)
    torch.testing.assert_close(seen_images[0], whole, atol=0, rtol=0)
    assert not torch.allclose(seen_images[1], whole)  # the default crop zooms in
    assert main(["prototypes", str(run), "--dataset", "digits", "--limit", "20", "--crop-pct", "1",
                 "--out", str(tmp_path / "p.png")]) == 0
    assert seen_crops == [1.0]


def test_curves_of_a_run_and_of_a_sweep(run, tmp_path):
    out = tmp_path / "curves.png"
    assert main(["curves", str(run), "--size", "900", "600", "--out", str(out)]) == 0
    assert _png(out).size == (900, 600)
    sweep = tmp_path / "sweep"
    for n, lr in enumerate(("0.001", "0.002")):
        member = sweep / str(n)
        (member / ".hydra").mkdir(parents=True)
        shutil.copy(run / "metrics.csv", member / "metrics.csv")
        (member / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n- logger.progress=false\n")
    from msn.plots.curves import find_runs

    assert [r.label for r in find_runs([sweep])] == ["optim.lr=0.001", "optim.lr=0.002"]
    assert main(["curves", str(sweep), "--out", str(out)]) == 0
    assert _png(out).size == (1500, 1000)


def test_prototypes_of_a_run(run, tmp_path):
    from msn.eval.splits import load_splits
    from msn.plots.prototypes import load_model, prototype_use

    out = tmp_path / "protos.png"
    assert main(["prototypes", str(run), "--dataset", "digits", "--limit", "60", "--show", "2",
                 "--per-prototype", "3", "--out", str(out)]) == 0
    assert _png(out).size == (1400, 700)
    model, encoder, trained_on = load_model(run)
    assert trained_on == "synthetic"  # cpu_smoke
    train_split, _ = load_splits("digits")
    use = prototype_use(model, encoder, [train_split.images[i] for i in range(20)])
    assert use.counts.sum() == 20 and len(use.counts) == 32 and use.unused == (use.counts == 0).sum()
    assert (use.similarity.argmax(axis=1) == use.assigned).all()


@pytest.mark.parametrize(("args", "message"), [
    (["views", "/no/such/run", "--out", "x.png"], "neither a run directory nor an override"),
    (["views", "experiment=cpu_smoke", "--out", "x.jpg"], "give a path ending in .png"),
    (["views", "experiment=cpu_smoke", "model.depth=oops", "--out", "x.png"], "model.depth"),
    (["attention", "/no/such/run", "--out", "x.png"], "does not exist"),
    (["curves", "/no/such/run", "--out", "x.png"], "is not a folder"),
    (["prototypes", "HF", "--dataset", "digits", "--out", "x.png"], "holds the backbone only"),
    (["prototypes", "RUN", "--out", "x.png"], "prototypes needs --dataset for a run trained on data=synthetic: pass "
                                              "--dataset digits, fashion_mnist or a folder with train/ and val/"),
    (["attention", "HF", "--crop-pct", "0", "--out", "x.png"], "--crop-pct=0.0 must lie in (0, 1]"),
])
def test_bad_input_is_one_line(run, tmp_path, capsys, args, message):
    args = [{"HF": str(run / "hf"), "RUN": str(run)}.get(a, a) for a in args]
    args[args.index("--out") + 1] = str(tmp_path / args[args.index("--out") + 1])
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msn-viz: error: ") and message in err[0], err
    assert not list(tmp_path.glob("x.*"))


def test_curves_of_a_metrics_csv_of_random_bytes_is_one_line(tmp_path):
    """It died with a UnicodeDecodeError traceback; the console script itself now answers in one line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_bytes(random.Random(3).randbytes(4096))
    result = subprocess.run(["msn-viz", "curves", str(run), "--out", str(tmp_path / "c.png")], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"msn-viz: error: {run / 'metrics.csv'} is not a readable metrics table (not UTF-8")
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(("content", "words"), [
    (b"loss,lr\n5.0,0.1\n", "(line 2: no step column)"),
    (b"step,loss\n1,5.0\nten,4.0\n", "(line 3: ValueError: invalid literal for int()"),
])
def test_curves_of_a_damaged_metrics_csv_is_one_line(tmp_path, capsys, content, words):
    sweep = tmp_path / "sweep"
    for name, text in (("0", b"step,loss\n1,5.0\n"), ("1", content)):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "metrics.csv").write_bytes(text)
    assert main(["curves", str(sweep), "--out", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"msn-viz: error: {sweep / '1' / 'metrics.csv'} is not a readable "
                                               f"metrics table {words}"), err
    assert not (tmp_path / "c.png").exists()
