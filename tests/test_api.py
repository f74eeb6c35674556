"""``import msn`` as a Python user meets it: a backbone from every format we read gives the same features, with the
preprocessing it was trained with; features of files, PIL images, a dataset and a loader agree; a fresh backbone
takes weights that fit and names the keys of weights that do not."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import msn
from msn.errors import ConversionError
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step cpu_smoke run with a normalisation of its own, and its exports in every format."""
    from msn.weights.export import export_hf, export_msn, export_timm
    from msn.weights.read import read_source

    base = tmp_path_factory.mktemp("api")
    run = base / "run"
    msn.train(compose_config(["experiment=cpu_smoke", "optim.max_steps=2", "logger.progress=false",
                              "data.mean=[0.3,0.4,0.5]", "data.std=[0.2,0.25,0.3]", f"run_dir={run}"]))
    source = read_source(run)
    exports = {"hf": export_hf(source, base / "hf"), "timm": export_timm(source, base / "timm"),
               "msn": export_msn(source, base / "msn.pth.tar")}
    images = []
    for i in range(5):
        pixels = np.random.default_rng(i).integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)
        images.append(base / f"{i}.png")
        Image.fromarray(pixels).save(images[-1])
    return run, exports, images


def test_every_format_loads_the_same_backbone_and_preprocessing(trained):
    run, exports, images = trained
    sources = {"run": run, "checkpoint": run / "checkpoints" / "last.pt", "hf": exports["hf"],
               "timm": exports["timm"], "timm file": exports["timm"] / "model.safetensors", "msn": exports["msn"]}
    reference = None
    for name, path in sources.items():
        backbone, transform = msn.load_backbone(path)
        features = msn.extract_features(backbone, images)
        assert features.shape == (5, 128) and features.dtype == torch.float32, name
        # the training normalisation travels with every format but the original one (ImageNet's: it records none);
        # the timm export's .safetensors file finds it in the timm_config.json beside it
        expected = (0.485, 0.456, 0.406) if name == "msn" else (0.3, 0.4, 0.5)
        assert tuple(round(m, 6) for m in backbone.pretrained_cfg["mean"]) == expected, name
        if expected != (0.3, 0.4, 0.5):
            continue
        if reference is None:
            reference = features
        torch.testing.assert_close(features, reference, atol=1e-5, rtol=0, msg=name)
    online, _ = msn.load_backbone(run, encoder="online")
    assert not torch.allclose(msn.extract_features(online, images), reference)  # a different encoder


def test_features_of_files_images_datasets_and_loaders_agree(trained):
    run, _, images = trained
    backbone, transform = msn.load_backbone(run)
    pictures = [Image.open(p).convert("RGB") for p in images]
    from_files = msn.extract_features(backbone, images, batch_size=2)
    torch.testing.assert_close(msn.extract_features(backbone, pictures), from_files)
    labelled = [(picture, i % 2) for i, picture in enumerate(pictures)]  # (image, label) items, as torchvision's
    torch.testing.assert_close(msn.extract_features(backbone, labelled), from_files)
    loader = DataLoader([(transform(p), 0) for p in pictures], batch_size=3)
    torch.testing.assert_close(msn.extract_features(backbone, loader), from_files)
    assert backbone.training is False
    backbone.train()
    msn.extract_features(backbone, pictures[:1])
    assert backbone.training is True  # the caller's mode is restored


def test_create_backbone_fresh_and_from_weights(trained):
    run, exports, images = trained
    fresh = msn.create_backbone("vit_pico", patch_size=8, img_size=32)
    assert fresh.pretrained_cfg["input_size"] == (3, 32, 32) and fresh.embed_dim == 128
    loaded = msn.create_backbone("vit_pico", patch_size=8, img_size=32, weights=exports["hf"])
    reference, _ = msn.load_backbone(run)
    torch.testing.assert_close(msn.extract_features(loaded, images), msn.extract_features(reference, images))
    with pytest.raises(ConversionError, match=r"weights=.* does not match the configured architecture: "
                                              r"different shapes \(54\): blocks.0.attn.proj.bias: expected "
                                              r"\(192,\), got \(128,\)"):
        msn.create_backbone("vit_tiny", patch_size=8, img_size=32, weights=exports["hf"])


def test_the_timm_export_gives_timm_the_preprocessing(trained):
    import json

    import timm

    _, exports, _ = trained
    args = json.loads((Path(exports["timm"]) / "timm_config.json").read_text())
    vit = timm.create_model(args["model_name"], pretrained=False, **args["kwargs"])
    config = timm.data.resolve_data_config({}, model=vit)
    assert tuple(config["mean"]) == (0.3, 0.4, 0.5) and tuple(config["input_size"]) == (3, 32, 32)


def test_compose_config_inside_an_application_of_the_callers_own_hydra(tmp_path):
    """A user's own Hydra app (initialised with its own config folder) composes msn's config through msn and finds
    its own Hydra state as it was."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    (tmp_path / "app.yaml").write_text("mine: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = msn.compose_config(["experiment=cpu_smoke", "optim.lr=0.01"])
        assert cfg.run_dir == "outputs/cpu_smoke_optim.lr-0.01" and cfg.optim.lr == 0.01
        assert GlobalHydra.instance().is_initialized()
        assert compose("app").mine == 1  # the caller's config folder, still in place
