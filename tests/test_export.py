import json
import os
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from transformers import AutoImageProcessor, ViTMSNForImageClassification, ViTMSNModel

from msn.cli.export import main as export_main
from msn.errors import CheckpointError, MSNError
from msn.models.msn import MSN
from msn.train import train
from msn.weights.convert import ConversionError, backbone_to_hf, hf_to_backbone
from msn.weights.export import export_hf, export_msn, export_timm, hf_config
from msn.weights.read import WeightSource as Source
from msn.weights.read import init_model_from, read_source
from tests.conftest import compose_config


def _source(tmp_path: Path, *overrides: str, seed: int = 0) -> tuple[MSN, Source]:
    """A randomly initialised MSN model (target != online) wrapped as an export source."""
    cfg = compose_config([f"run_dir={tmp_path}", *overrides])
    torch.manual_seed(seed)
    model = MSN(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (timm zero-inits biases), target != online
            p.add_(torch.randn_like(p) * 0.02)
    return model, Source(model.state_dict(), cfg.model, tmp_path / "last.pt", step=7, epoch=1, config=cfg)


PRESETS = {"tiny": ["model=vit_tiny", "data=folder", "data.root=."], "small": ["model=vit_small", "data=folder",
                                                                               "data.root=."]}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_export_matches_our_target_backbone(tmp_path, preset, attn):
    model, source = _source(tmp_path, *PRESETS[preset])
    out = export_hf(source, tmp_path / "hf")
    hf, info = ViTMSNModel.from_pretrained(out, attn_implementation=attn, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    for size, interpolate in ((224, False), (96, True)):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ours = model.target.backbone.forward_features(x)
            theirs = hf(pixel_values=x, interpolate_pos_encoding=interpolate).last_hidden_state
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model.online.backbone.forward_features(x), ours, atol=1e-3)  # the target


def test_hf_export_files(tmp_path):
    _, source = _source(tmp_path, "model=vit_pico")
    out = export_hf(source, tmp_path / "hf", encoder="online")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vit_msn" and config["architectures"] == ["ViTMSNModel"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["intermediate_size"], config["patch_size"], config["image_size"]) == (128, 4, 4, 512, 8, 32)
    assert config["layer_norm_eps"] == 1e-6 and config["qkv_bias"] is True and config["hidden_act"] == "gelu"
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(processor).__name__.startswith("ViTImageProcessor")
    assert processor.size == {"height": 32, "width": 32} and list(processor.image_mean) == [0.485, 0.456, 0.406]
    card = (out / "README.md").read_text()
    assert "vit_pico" in card and "online encoder" in card and "7 steps" in card and "from_pretrained" in card
    pixels = processor(images=[torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8)], return_tensors="pt")
    assert pixels["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("patch,size", [(4, 224), (7, 224), (8, 224), (14, 224), (16, 384)])
def test_hf_config_for_every_patch_size(patch, size, tmp_path):
    arch = "vit_huge" if patch == 14 else "vit_base"
    cfg = compose_config([f"run_dir={tmp_path}", "model=vit_base", f"model.arch={arch}",
                          f"model.patch_size={patch}", f"model.img_size={size}", "data=folder", "data.root=.",
                          f"data.global_size={size // patch * patch}", f"data.focal_size={patch * (96 // patch)}"])
    c = hf_config(cfg.model)
    assert (c["patch_size"], c["image_size"]) == (patch, size)
    with torch.device("meta"):
        hf = ViTMSNModel(__import__("transformers").ViTMSNConfig(**c))
        ours = MSN(cfg.model).target.backbone.state_dict()
    converted = backbone_to_hf(ours)
    expected = hf_to_backbone(converted)
    assert set(expected) == set(ours)
    assert sum(v.numel() for v in converted.values()) == sum(p.numel() for p in hf.parameters())


def test_classification_model_loads_backbone_and_fine_tunes(tmp_path):
    from sklearn.datasets import load_digits

    model, source = _source(tmp_path, "model=vit_pico")
    out = export_hf(source, tmp_path / "hf")
    clf, info = ViTMSNForImageClassification.from_pretrained(out, num_labels=10, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"]
    digits = load_digits()
    processor = AutoImageProcessor.from_pretrained(out)
    images = [torch.from_numpy(img * 255 / 16).to(torch.uint8).expand(3, -1, -1) for img in digits.images[:64]]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    labels = torch.from_numpy(digits.target[:64])
    optimizer = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    clf.train()
    losses = []
    for _ in range(25):
        loss = clf(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("preset,timm_name,size", [("vit_tiny", "vit_tiny_patch16_224", 224),
                                                   ("vit_pico", "vit_small_patch8_224", 32)])
def test_timm_round_trip(tmp_path, preset, timm_name, size):
    """An exact timm preset by its name; vit_pico (no timm preset) by the nearest one, every size in the kwargs."""
    overrides = [f"model={preset}"] + (["data=folder", "data.root=."] if preset != "vit_pico" else [])
    model, source = _source(tmp_path, *overrides)
    out = export_timm(source, tmp_path / "timm")
    args = json.loads((out / "timm_config.json").read_text())
    assert args["model_name"] == timm_name
    assert {"embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size"} <= set(args["kwargs"])
    net = timm.create_model(args["model_name"], pretrained=False, **args["kwargs"])
    from safetensors.torch import load_file

    net.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    net.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), model.target.backbone.forward_features(x))
        torch.testing.assert_close(net(x), model.target.backbone(x))


def test_timm_export_of_a_preset_timm_does_not_name(tmp_path):
    model, source = _source(tmp_path, "model=vit_pico")
    out = export_timm(source, tmp_path / "timm")
    args = json.loads((out / "timm_config.json").read_text())
    net = timm.create_model(args["model_name"], pretrained=False, **args["kwargs"]).eval()
    from safetensors.torch import load_file

    net.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), model.target.backbone.forward_features(x))


def test_msn_format_round_trip(tmp_path):
    model, source = _source(tmp_path, "model=vit_pico")
    path = export_msn(source, tmp_path / "out.pth.tar")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"encoder", "target_encoder", "prototypes", "epoch"}
    assert all(k.startswith("module.") for k in raw["encoder"])
    assert {"module.fc.fc1.weight", "module.fc.bn1.running_mean", "module.fc.fc3.bias", "module.cls_token",
            "module.blocks.0.attn.qkv.weight", "module.norm.weight"} <= set(raw["target_encoder"])
    back = read_source(path)
    assert set(back.model) == set(source.model)
    for key, value in source.model.items():
        assert torch.equal(back.model[key], value), key
    assert back.model_cfg.arch == "vit_pico" and back.model_cfg.num_prototypes == 64


def _deit_original_checkpoint(path: Path) -> timm.models.VisionTransformer:
    """An original-layout MSN checkpoint written from timm's DeiT key names (independent of our model code)."""
    torch.manual_seed(3)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        for p in deit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    head = {"fc.fc1.weight": torch.randn(64, 192), "fc.fc1.bias": torch.randn(64), "fc.bn1.weight": torch.ones(64),
            "fc.bn1.bias": torch.zeros(64), "fc.bn1.running_mean": torch.zeros(64), "fc.bn1.running_var":
            torch.ones(64), "fc.bn1.num_batches_tracked": torch.tensor(0), "fc.fc2.weight": torch.randn(32, 64),
            "fc.fc2.bias": torch.randn(32)}
    encoder = {f"module.{k}": v for k, v in {**deit.state_dict(), **head}.items()}
    torch.save({"encoder": encoder, "target_encoder": dict(encoder), "prototypes": torch.randn(16, 32),
                "epoch": 300, "opt": {}, "lr": 1e-3}, path)
    return deit


def test_original_checkpoint_converts_to_hf_and_matches(tmp_path):
    deit = _deit_original_checkpoint(tmp_path / "vitt16_300ep.pth.tar")
    result = subprocess.run(["msn-export", str(tmp_path / "vitt16_300ep.pth.tar"), str(tmp_path / "hf")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    hf = ViTMSNModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, deit.forward_features(x),
                                   atol=1e-5, rtol=1e-5)
    source = read_source(tmp_path / "vitt16_300ep.pth.tar")
    assert (source.model_cfg.arch, source.model_cfg.head_layers, source.model_cfg.head_hidden_dim,
            source.model_cfg.head_output_dim, source.epoch) == ("vit_tiny", 2, 64, 32, 300)


def test_init_from_every_format(tmp_path):
    model, source = _source(tmp_path, "model=vit_pico", seed=1)
    cfg = source.config
    hf_dir = export_hf(source, tmp_path / "hf")
    timm_dir = export_timm(source, tmp_path / "timm")
    msn_path = export_msn(source, tmp_path / "msn.pth.tar")
    for path, kind in ((hf_dir, "backbone"), (timm_dir / "model.safetensors", "backbone"), (timm_dir, "backbone"),
                       (msn_path, "msn")):
        torch.manual_seed(5)
        fresh = MSN(cfg.model)
        head_before = fresh.online.head.fc1.weight.detach().clone()
        assert init_model_from(fresh, path) == kind
        if kind == "msn":  # both encoders, head and prototypes, each from its own copy
            for name, value in model.state_dict().items():
                assert torch.equal(fresh.state_dict()[name], value), name
        else:  # the exported (target) backbone initialises both backbones
            for name, value in model.target.backbone.state_dict().items():
                assert torch.equal(fresh.online.backbone.state_dict()[name], value), name
                assert torch.equal(fresh.target.backbone.state_dict()[name], value), name
            assert torch.equal(fresh.online.head.fc1.weight, head_before)  # head stays fresh


def test_init_from_mismatch_lists_keys_and_shapes(tmp_path):
    _, source = _source(tmp_path, "model=vit_tiny", "data=folder", "data.root=.")
    hf_dir = export_hf(source, tmp_path / "hf")
    cfg = compose_config([f"run_dir={tmp_path}"])
    with pytest.raises(ConversionError) as err:
        init_model_from(MSN(cfg.model), hf_dir)
    message = str(err.value)
    assert "does not match" in message and "blocks.0.attn.proj.bias: expected (128,), got (192,)" in message
    assert "unexpected keys (96): blocks.10." in message  # vit_tiny's 8 extra blocks, 12 tensors each


def test_pretrain_cli_init_from_hf_export(tmp_path):
    _, source = _source(tmp_path, "experiment=cpu_smoke")
    hf_dir = export_hf(source, tmp_path / "hf")
    result = subprocess.run(["msn-pretrain", "experiment=cpu_smoke", f"init_from={hf_dir}", "optim.max_steps=1",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"initialised the backbones from {hf_dir}" in result.stdout
    # Another architecture (in-process: the command's one line for an MSNError is tested throughout test_errors.py)
    with pytest.raises(MSNError, match="does not match the configured architecture"):
        train(compose_config(["experiment=cpu_smoke", "model=vit_tiny", "data.global_size=224", "data.focal_size=96",
                              f"init_from={hf_dir}", f"run_dir={tmp_path / 'bad'}"]))


def test_export_cli_errors(tmp_path, capsys):
    run = tmp_path / "missing"
    result = subprocess.run(["msn-export", str(run), str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and "does not exist" in result.stderr
    with pytest.raises(SystemExit) as exit_:  # the entry point in this process: argparse's usage error
        export_main([str(run), str(tmp_path / "out"), "--format", "msn", "--encoder", "online"])
    assert exit_.value.code == 2 and "--encoder does not apply" in capsys.readouterr().err
    _, source = _source(tmp_path, "model=vit_pico")
    export_hf(source, tmp_path / "hf")
    with pytest.raises(Exception, match="not empty; choose another OUT or pass --overwrite"):
        export_hf(source, tmp_path / "hf")
    export_hf(source, tmp_path / "hf", overwrite=True)


CUSTOM = ["model.arch=null", "model.embed_dim=96", "model.depth=2", "model.num_heads=3", "model.mlp_ratio=2"]


def test_architecture_given_field_by_field_exports_and_loads(tmp_path):
    from msn.eval.features import load_encoder

    model, source = _source(tmp_path, *CUSTOM)
    out = export_hf(source, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["intermediate_size"]) == (96, 2, 3, 192)
    hf = ViTMSNModel.from_pretrained(out).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.target.backbone.forward_features(x)
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_encoder(out).backbone.forward_features(x), ours, atol=1e-5, rtol=1e-5)

    # An original-layout file keeps no config: the number of heads of a non-preset ViT is unknown.
    original = read_source(export_msn(source, tmp_path / "custom.pth.tar"))
    assert original.model_cfg.embed_dim == 96 and original.model_cfg.num_heads is None
    with pytest.raises(ConversionError, match="number of attention heads cannot be read off the weights"):
        export_hf(original, tmp_path / "hf2")


def test_every_exported_file_follows_the_umask(tmp_path):
    """model.safetensors was 0600 (safetensors' own save_file) while the other files followed the umask."""
    _, source = _source(tmp_path, "model=vit_pico")
    old = os.umask(0o022)
    try:
        written = [export_hf(source, tmp_path / "hf"), export_timm(source, tmp_path / "timm"),
                   export_msn(source, tmp_path / "msn"), export_msn(source, tmp_path / "vit.pth.tar")]
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
             for w in written for p in ([w] if w.is_file() else w.iterdir())}
    assert len(modes) == 4 + 2 + 1 + 1, modes
    assert modes == dict.fromkeys(modes, oct(0o644))


def test_an_export_never_goes_into_a_run_or_over_its_source(tmp_path):
    """msn-export RUN RUN --overwrite wrote an hf export into the run, which then read as an export."""
    _, source = _source(tmp_path, "model=vit_pico")
    run = tmp_path / "outputs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    for export in (export_hf, export_timm, export_msn):
        with pytest.raises(CheckpointError, match=f"{run} is a run directory"):
            export(source, run, overwrite=True)
        with pytest.raises(CheckpointError, match=f"holds the run directory {run}"):
            export(source, run.parent, overwrite=True)
    with pytest.raises(CheckpointError, match="is the checkpoints folder of the run"):
        export_msn(source, run / "checkpoints" / "last.pt", overwrite=True)
    source.path = run / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match="is SOURCE itself"):
        export_msn(source, source.path, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "last.pt", "outputs", "run"]
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"a checkpoint"
    export_hf(source, run / "hf")  # a folder of its own inside the run is fine
    assert (run / "hf" / "config.json").is_file()
