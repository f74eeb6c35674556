import subprocess
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from msn.config import CONFIG_DIR, ConfigError, to_schema, validate
from msn.models.msn import MSN
from tests.conftest import compose_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [(g.name, p.stem) for g in sorted(CONFIG_DIR.iterdir()) if g.is_dir() and g.name != "experiment"
                 for p in sorted(g.glob("*.yaml"))]


def test_expected_options_exist():
    assert {"msn_vits16", "msn_vitb16", "msn_vitl16", "msn_vitb4", "msn_vitl7", "cpu_smoke"} <= set(EXPERIMENTS)
    models = {o for g, o in GROUP_OPTIONS if g == "model"}
    assert {"vit_pico", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_base_p8", "vit_base_p4",
            "vit_large_p7"} <= models
    assert {o for g, o in GROUP_OPTIONS if g == "data"} == {"digits", "fashion_mnist", "folder", "synthetic",
                                                            "webdataset", "hf", "custom"}
    assert {"fmnist_cpu", "fmnist_gpu"} <= set(EXPERIMENTS)
    assert {o for g, o in GROUP_OPTIONS if g == "logger"} == {"csv", "wandb"}


def _instantiate(cfg) -> MSN:
    with torch.device("meta"):  # build every module without allocating ViT-H weights
        return MSN(cfg.model)


PAPER = {"msn_vits16": ("vit_small", 16, 800, 0.15), "msn_vitb16": ("vit_base", 16, 600, 0.3),
         "msn_vitl16": ("vit_large", 16, 600, 0.5), "msn_vitb4": ("vit_base", 4, 300, 0.7),
         "msn_vitl7": ("vit_large", 7, 200, 0.7)}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_validates_and_instantiates(experiment, tmp_path):
    overrides = [f"experiment={experiment}", f"run_dir={tmp_path}"]
    if experiment.startswith("msn_"):
        overrides.append(f"data.root={tmp_path}")
    cfg = to_schema(compose_config(overrides))
    model = _instantiate(cfg)
    assert model.prototypes.shape == (cfg.model.num_prototypes, cfg.model.head_output_dim)
    if experiment in PAPER:
        arch, patch, epochs, ratio = PAPER[experiment]
        assert (cfg.model.arch, cfg.model.patch_size, cfg.optim.epochs, cfg.masking.ratio) == (arch, patch, epochs,
                                                                                                 ratio)
        assert cfg.optim.schedule_stretch == 1.25 and cfg.masking.per_sample is False  # faithful settings
        assert (cfg.model.head_per_resolution, cfg.model.weight_init, cfg.optim.prototype_grad,
                cfg.masking.mask_focal) == (True, "msn", "sum", False)
        assert (cfg.optim.lr, cfg.optim.start_lr, cfg.optim.warmup_epochs) == (1e-3, 2e-4, 15)
        assert (cfg.data.num_focal, cfg.data.global_size, cfg.model.num_prototypes) == (10, 224, 1024)


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes_validates_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", f"run_dir={tmp_path}"]
    if group == "data" and option == "folder":
        overrides.append(f"data.root={tmp_path}")
    if group == "data" and option == "webdataset":
        overrides.append(f"data.shards={tmp_path}/shard-000000.tar")
    if group == "data" and option == "hf":
        overrides.append(f"data.path={tmp_path}")
    if group == "model" and option != "vit_pico":  # 224-px presets need 224/96-px views (ViT-H/14, L/7: 98)
        overrides += ["data=folder", f"data.root={tmp_path}"]
        if 96 % OmegaConf.load(CONFIG_DIR / "model" / f"{option}.yaml").patch_size:
            overrides.append("data.focal_size=98")
    cfg = to_schema(compose_config(overrides))
    _instantiate(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("masking.ratio=1.0", "masking.ratio=1.0 must lie in [0, 1)"),
        ("monitor.crop_pct=0", "monitor.crop_pct=0.0 must lie in (0, 1]"),
        ("masking.ratio=-0.1", "masking.ratio=-0.1 must lie in [0, 1)"),
        ("data.focal_size=20", "data.focal_size=20 is not divisible by model.patch_size=8"),
        ("optim.lr=0", "optim.lr=0.0 must be > 0"),
        ("optim.lr=-1e-3", "optim.lr=-0.001 must be > 0"),
        ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
        ("model.arch=vit_giant", "model.arch='vit_giant' is unknown; choose one of vit_pico, vit_tiny"),
        ("model.arch=null", "model.embed_dim is required when model.arch is null"),
        ("model.num_heads=3", "model.embed_dim=128 is not divisible by model.num_heads=3"),
        ("model.depth=0", "model.depth=0 must be a positive integer"),
        ("model.weight_init=xavier", "model.weight_init='xavier' is not allowed; choose one of msn, timm"),
        ("optim.prototype_grad=max", "optim.prototype_grad='max' is not allowed; choose one of sum, mean"),
        ("device=tpu", "device='tpu' is not allowed; choose one of auto, cpu, cuda"),
        ("precision=fp8", "precision='fp8' is not allowed; choose one of fp32, bf16, fp16"),
        ("logger.progress=sometimes", "logger.progress='sometimes' is not allowed; choose one of auto, true, false"),
        ("checkpoint.keep=-1", "checkpoint.keep=-1 must be >= 0"),
        ("data.global_scale=[0.9,0.3]", "data.global_scale=[0.9, 0.3] must be two increasing positive numbers"),
    ],
)
def test_bad_values_fail_with_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        to_schema(compose_config([override, f"run_dir={tmp_path}"]))
    assert message in str(err.value)


def test_typos_and_wrong_types_fail_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_config(["optim.lrr=1e-3"])
    with pytest.raises(ConfigCompositionException, match="batch_size"):
        compose_config(["data.batch_size=many"])
    with pytest.raises(ConfigCompositionException, match="vit_giant"):
        compose_config(["model=vit_giant"])


def test_typo_in_a_yaml_file_fails(tmp_path):
    cfg = OmegaConf.to_container(compose_config([f"run_dir={tmp_path}"]))
    cfg["optim"]["warmup_epoch"] = 3
    with pytest.raises(Exception, match="warmup_epoch"):
        to_schema(cfg)


def test_validate_accepts_defaults(tmp_path):
    cfg = to_schema(compose_config([f"run_dir={tmp_path}"]))
    validate(cfg)
    # The digits default takes the original's step too (see docs/fidelity.md).
    assert (cfg.model.head_per_resolution, cfg.model.weight_init, cfg.optim.prototype_grad) == (True, "msn", "sum")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The ``msn-pretrain`` command (``python -m msn.train``, the same entry point, runs under torchrun in
    tests/test_distributed.py)."""
    return subprocess.run(["msn-pretrain", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_bad_value_exits_nonzero_with_one_line_reason(tmp_path):
    result = _cli("masking.ratio=1.5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == ["msn-pretrain: error: invalid config: masking.ratio=1.5 must lie in [0, 1)"]
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any compute


def test_cli_unknown_option_lists_the_allowed_values(tmp_path):
    result = _cli("model=vit_giant", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "vit_giant" in result.stderr and "vit_small" in result.stderr


def test_keys_added_with_plus_fail_too(tmp_path):
    """``+optim.lrr=1e-3`` (the form Hydra's own error suggests) passes composition; msn still refuses it."""
    with pytest.raises(ConfigError, match=r"unknown config keys optim\.lrr, lr_typo"):
        to_schema(compose_config(["+optim.lrr=1e-3", "+lr_typo=1", f"run_dir={tmp_path}"]))
    result = _cli("+optim.lrr=1e-3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "msn-pretrain: error: unknown config key optim.lrr (added with +key=value?); msn reads only the keys of "
        "msn/configs/ and msn/config/schema.py: check the spelling"]
    assert not (tmp_path / "run").exists()  # refused before Hydra created the run directory


def test_refused_resume_null_leaves_the_run_directory_as_it_was(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"an earlier run's checkpoint")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("the earlier run's config\n")
    result = _cli("resume=null", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 1 and "resume=null would overwrite it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (run / ".hydra" / "config.yaml").read_text() == "the earlier run's config\n"
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints"]


def test_every_data_option_is_a_registered_source_and_each_source_has_one():
    """A built-in source is one module (msn/data/sources/) and one YAML (msn/configs/data/): the two lists agree,
    and each YAML names its own source."""

    from msn.data.registry import get_source, source_names

    options = {o for g, o in GROUP_OPTIONS if g == "data"}
    # the built-in ones: a test that ran before may have put the test plugin's sources (data.name=discs) on the path
    built_in = {name for name in source_names() if type(get_source(name)).__module__.startswith("msn.")}
    assert built_in == options
    for option in options:
        assert compose_config([f"data={option}", "run_dir=."]).data.name == option


@pytest.mark.parametrize(("override", "message"), [
    ("data=folder", "data.root is required for data=folder: pass data.root=/path/to/images"),
    ("data=webdataset", "data.shards is required for data=webdataset"),
    ("data=hf", "data.path is required for data=hf"),
    ("data=custom", "data=custom needs data.dataset._target_"),
    ("data.name=imagenet", "data.name='imagenet' is not a registered data source; choose one of custom, digits, "
                           "fashion_mnist, folder, hf, synthetic, webdataset"),
    ("data.dataset={_target_:mypkg.X}", "data.dataset is set, but data=digits reads its own images and would "
                                        "ignore it; pass data=custom"),
])
def test_each_source_refuses_what_it_cannot_read_before_any_work(override, message, tmp_path):
    from msn.data.registry import check_source

    cfg = to_schema(compose_config([override, f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError) as err:
        check_source(cfg.data)
    assert message in str(err.value)
