"""Structured config schema (validated by Hydra/OmegaConf at composition) and value checks.

The dataclasses below are registered in Hydra's ConfigStore as ``msn_schema``; ``configs/config.yaml``
lists it first in its defaults, so a misspelt key or a wrongly typed value in any YAML file or
command-line override fails during composition. :func:`validate` then checks the values that a
type cannot express (ranges, divisibility, names) before any compute starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from msn.arch import WEIGHT_INITS, ViTArch, resolve_arch
from msn.errors import ConfigError
from msn.job import process_info
from msn.rundir import last_checkpoint, live_elsewhere, read_status

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the Hydra configs of this checkout


@dataclass
class ModelConfig:
    arch: str | None = "vit_pico"  # width / depth / heads preset (msn.arch.ARCHITECTURES); null: give all three
    embed_dim: int | None = None  # null: the preset's; set to change the width (or build a ViT with arch=null)
    depth: int | None = None  # null: the preset's number of blocks
    num_heads: int | None = None  # null: the preset's number of attention heads
    mlp_ratio: float | None = None  # null: the preset's (4)
    patch_size: int = 8
    img_size: int = 32  # native resolution: the position-embedding grid is img_size / patch_size
    drop_path_rate: float = 0.0
    weight_init: str = "msn"  # msn: the original code's initialisation; timm: timm's and PyTorch's defaults
    head_hidden_dim: int = 2048
    head_output_dim: int = 256
    head_layers: int = 3
    head_batchnorm: bool = True
    sync_batchnorm: bool = True  # multi-process runs: head BN uses the global batch's statistics
    head_per_resolution: bool = True  # one head pass (own BN statistics) per anchor resolution, as the original
    num_prototypes: int = 1024


@dataclass
class DataConfig:
    name: str = "digits"  # digits | fashion_mnist | folder | synthetic
    root: str | None = None  # image folder for name=folder
    list_file: str | None = None  # optional file of image paths (relative to root) to restrict to
    batch_size: int = 64  # images per process per step
    num_workers: int = 0
    augment_on: str = "auto"  # cpu: the whole augmentation in the loader workers; device: colour, blur and
    # normalisation on the training device (workers decode and crop); auto: device when training on a GPU
    global_size: int = 224  # target and anchor crop size
    global_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    num_focal: int = 10
    focal_size: int = 96
    focal_scale: list[float] = field(default_factory=lambda: [0.05, 0.3])
    hflip_p: float = 0.5
    color_jitter: float = 0.5  # strength s: brightness/contrast/saturation 0.8s, hue 0.2s
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    image_size: int = 32  # digits: 8x8 images upsampled to this; synthetic: generated size
    synthetic_size: int = 256  # number of synthetic images
    drop_last: bool = True
    max_bad_files: int = 20  # undecodable images are replaced and counted; more distinct ones than this stop the run
    max_bad_fraction: float = 0.001  # ... or than this fraction of the dataset, when that is larger


@dataclass
class MaskingConfig:
    ratio: float = 0.15  # fraction of patch tokens dropped from the masked anchor views
    per_sample: bool = True  # False: one mask for the whole batch, as in the original code
    mask_focal: bool = False  # also mask the focal views (the original does not)


@dataclass
class LossConfig:
    tau: float = 0.1
    sharpen_T: float = 0.25
    final_sharpen_T: float | None = None  # None: constant sharpen_T
    sinkhorn: bool = True
    sinkhorn_iterations: int = 3
    me_max_weight: float = 1.0
    entropy_weight: float = 0.0


@dataclass
class OptimConfig:
    epochs: int = 100
    max_steps: int | None = None  # optional cap on the total number of steps
    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_epochs: float = 15.0
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float | None = 3.0  # max global grad norm; None disables clipping
    ema_momentum: float = 0.996
    final_ema_momentum: float = 1.0
    schedule_stretch: float = 1.0  # the original code stretches every schedule over 1.25x the run
    prototype_grad: str = "sum"  # sum: the prototypes' gradient is summed over processes (original); mean: averaged


@dataclass
class WandbConfig:
    project: str = "msn"
    entity: str | None = None
    name: str | None = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | wandb (the CSV log is always written)
    log_every: int = 10  # steps between metric rows / console lines
    progress: str = "auto"  # the progress bar: auto (on a terminal only, not in a log file) | true | false
    console_every: int = 50  # steps between console lines (0: none); at most as often as log_every
    wandb: WandbConfig = field(default_factory=WandbConfig)


DEFAULT_CROP_PCT = 224 / 256  # the paper's evaluation view: resize to 256, centre-crop 224


def check_crop_pct(crop_pct: float, option: str) -> None:
    """Raise ValueError naming ``option`` unless 0 < crop_pct <= 1 (the evaluation's centre-crop share)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"{option}={crop_pct} must lie in (0, 1]: the share of the image the centre crop keeps "
                         f"(the paper's {DEFAULT_CROP_PCT}; 1 for the whole image)")


@dataclass
class MonitorConfig:
    every_steps: int = 0  # evaluate the target encoder every N steps (0: off); logged as metrics.csv "monitor"
    protocol: str = "knn"  # knn (k=20, full labels) | lowshot (5 images per class, logistic regression)
    dataset: str = "digits"  # digits, fashion_mnist, or a folder with train/ and val/ (ImageFolder layout)
    crop_pct: float = DEFAULT_CROP_PCT  # the centre share of each image evaluated (msn-eval --crop-pct; 1: all)


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # periodic checkpoints/step_XXXXXXX.pt (0: only last.pt)
    last_every_steps: int = 100  # how often checkpoints/last.pt is refreshed


@dataclass
class MSNConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; bf16/fp16 need a GPU)
    compile: bool = False  # torch.compile the online backbone and head and the target encoder
    compile_mode: str | None = None  # null (default) | reduce-overhead (CUDA graphs) | max-autotune | ...
    compile_backend: str = "inductor"  # any torch.compile backend (aot_eager, cudagraphs, ... for debugging)
    tf32: bool = True  # fp32 matmuls and convolutions on GPUs may use TF32 tensor cores (as the original's PyTorch did)
    resume: str | None = "auto"  # auto (continue RUN_DIR if it has last.pt) | RUN_DIR or .pt (continue there) | null
    run_name: str | None = None  # the run's folder under outputs/; null: named after the overrides that change results
    init_from: str | None = None  # start from weights: original MSN .pth.tar, HF ViTMSN folder, timm safetensors
    run_dir: str = "."


def model_arch(model: ModelConfig | DictConfig) -> ViTArch:
    """Width, depth, heads and MLP ratio of the configured ViT (the preset with any field overridden)."""
    return resolve_arch(model.arch, model.embed_dim, model.depth, model.num_heads, model.mlp_ratio)


class CheckBeforeRun(Callback):
    """Hydra callback (configs/config.yaml): refuse a bad config before Hydra creates or writes the run directory.

    Hydra saves ``.hydra/`` in the run directory before the job starts; a run that is going to be refused
    (an unknown key, a bad value, ``resume=null`` over an earlier run's ``last.pt``) must leave it as it
    was. Prints one line and exits with code 1. Multirun jobs are checked by ``train`` itself.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # what Hydra does first thing in run_job: ${hydra:...} resolves
        task = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k != "hydra"}
        try:
            cfg = to_schema(task)
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
            if cfg.resume is None and last_checkpoint(run_dir).is_file():
                raise ConfigError(resume_null_message(run_dir))
            info = process_info()  # in a multi-process job rank 0 asks (the others see rank 0 itself running)
            pid = live_elsewhere(read_status(run_dir)) if info is None or info.rank == 0 else None
            if pid is not None:
                raise ConfigError(f"{run_dir} is being trained right now by process {pid}; wait for it to stop, or "
                                  "pass run_name=NEW_NAME for a separate run")
            if cfg.data.name == "folder":  # the cheap part of the data check: no run folder for a typo
                from msn.data import check_data_root

                check_data_root(cfg.data.root)
            if cfg.data.name == "fashion_mnist":  # ... or for a dataset that is not installed
                from msn.data import find_fashion_mnist

                find_fashion_mnist(cfg.data.root)
        except ValueError as e:  # ConfigError, DataError
            sys.exit(f"msn-pretrain: error: {e}")
        status = finished_run(run_dir, cfg) if cfg.resume is not None else None
        if status is not None:
            print(complete_message(run_dir, status["step"], status["total_steps"]), flush=True)
            sys.exit(0)  # without touching the finished run: Hydra has not written anything yet


def resume_null_message(run_dir: Path) -> str:
    return (f"{run_dir} already holds checkpoints/last.pt from an earlier run and resume=null would overwrite it; "
            "pass resume=auto to continue that run, or run_name=NEW_NAME for a new one")


def finished_run(run_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """``RUN_DIR/status.json`` if ``run_dir`` holds a finished run as long as ``cfg`` asks for, else None."""
    status, saved = read_status(run_dir), run_dir / "config.yaml"
    if not (status and status.get("status") == "finished" and saved.is_file()):
        return None
    try:
        old = OmegaConf.load(saved)
        same = (old.optim.epochs, old.optim.max_steps) == (cfg.optim.epochs, cfg.optim.max_steps)
    except Exception:  # an unreadable config.yaml: let the run itself decide
        return None
    return status if same else None


def complete_message(run_dir: Path, step: int, total_steps: int) -> str:
    return (f"{run_dir} is complete (step {step} of {total_steps}): nothing to do. Its checkpoint is "
            f"{run_dir}/checkpoints/last.pt; to train it longer pass a larger optim.epochs with resume={run_dir}, "
            "for a new run pass run_name=NEW_NAME")


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (call before composing)."""
    ConfigStore.instance().store(name="msn_schema", node=MSNConfig)


START_TIME_ENV = "MSN_START_TIME"


def start_time(pattern: str) -> str:
    """``${start_time:%Y-%m-%d}``: the job's start time, the same on every rank of a multi-process job.

    ``msn-pretrain`` under torchrun or srun puts rank 0's clock (ISO format) in ``$MSN_START_TIME``
    before Hydra names the run directory, so all ranks share one directory; otherwise this is now.
    Like Hydra's ``${now:}``, a value is cached per config, and submitit jobs reuse the submitter's.
    """
    stamp = os.environ.get(START_TIME_ENV)
    return (datetime.fromisoformat(stamp) if stamp else datetime.now()).strftime(pattern)


def run_directory(root: str, run_name: str | None, overrides: str | None, resume: str | None) -> str:
    """``hydra.run.dir``: one stable folder per run, so that the same command continues the same run.

    ``resume=RUN_DIR`` (or a checkpoint under ``RUN_DIR/checkpoints/``) continues in RUN_DIR. Otherwise
    the folder is ``ROOT/RUN_NAME``, where the name is ``run_name`` or, by default, Hydra's
    ``override_dirname``: the command line's overrides that change the result (configs/config.yaml lists
    those that do not, such as ``resume``, ``device`` or ``logger.*``), ``experiment=`` left out, for
    example ``outputs/cpu_smoke,optim.lr=0.001``; ``outputs/default`` without any.
    """
    if resume not in (None, "auto"):
        path = Path(str(resume)).expanduser()
        if path.is_dir():
            return str(path)
        if path.parent.name == "checkpoints":
            return str(path.parent.parent)
    if run_name:
        return str(Path(root) / safe_name(run_name))
    name = re.sub(r"(^|,)experiment=", r"\1", overrides or "")
    return str(Path(root) / (safe_name(name) or "default"))


def safe_name(name: str, limit: int = 100) -> str:
    """A single folder name: path separators and unusual characters replaced, long names shortened with a hash."""
    cleaned = re.sub(r"[^A-Za-z0-9._=,+\-\[\]@]", "_", str(name)).strip("._")
    if len(cleaned) > limit:
        digest = hashlib.sha1(cleaned.encode()).hexdigest()[:8]
        cleaned = f"{cleaned[:limit - 9]}-{digest}"
    return cleaned


# At import, so that submitit job processes (which import this module to unpickle the task) have them too.
OmegaConf.register_new_resolver("start_time", start_time, use_cache=True, replace=True)
OmegaConf.register_new_resolver("msn_run_dir", run_directory, replace=True)


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("digits", "fashion_mnist", "folder", "synthetic"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
    "logger.name": ("csv", "wandb"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
    "monitor.protocol": ("knn", "lowshot"),
    "model.weight_init": WEIGHT_INITS,
    "optim.prototype_grad": ("sum", "mean"),
    "data.augment_on": ("auto", "cpu", "device"),
    "compile_mode": (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


# logger.progress -> tqdm's ``disable``: None (auto: off when stderr is not a terminal, so that a SLURM or
# nohup log gets the console lines and not a bar redrawn at every step), False (true) or True (false).
PROGRESS_MODES: dict[str, bool | None] = {"auto": None, "true": False, "false": True}


def progress_bar_disabled(progress: str) -> bool | None:
    """tqdm's ``disable`` for a ``logger.progress`` value (:data:`PROGRESS_MODES`)."""
    return PROGRESS_MODES[str(progress).lower()]


def _get(cfg: Any, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def validate(cfg: DictConfig | MSNConfig) -> None:
    """Check values a type cannot express; raise :class:`ConfigError` naming the key and fix."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    errors: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        names = ", ".join("null" if a is None else a for a in allowed)
        check(value in allowed, f"{key}={value!r} is not allowed; choose one of {names}")
    check(str(cfg.logger.progress).lower() in PROGRESS_MODES,  # true / false arrive as "True" / "False"
          f"logger.progress={cfg.logger.progress!r} is not allowed; choose one of {', '.join(PROGRESS_MODES)}")
    try:
        model_arch(cfg.model)
    except ValueError as e:
        errors.append(str(e))
    try:
        check_crop_pct(cfg.monitor.crop_pct, "monitor.crop_pct")
    except ValueError as e:
        errors.append(str(e))
    for key in ("model.patch_size", "model.img_size", "model.head_hidden_dim", "model.head_output_dim",
                "model.head_layers", "model.num_prototypes", "data.batch_size", "data.global_size",
                "data.focal_size", "data.image_size", "data.synthetic_size", "optim.epochs",
                "logger.log_every", "loss.sinkhorn_iterations"):
        check(_get(cfg, key) > 0, f"{key}={_get(cfg, key)} must be a positive integer")
    for key in ("optim.lr", "optim.start_lr", "loss.tau", "loss.sharpen_T"):
        check(_get(cfg, key) > 0, f"{key}={_get(cfg, key)} must be > 0")
    for key in ("optim.final_lr", "optim.weight_decay", "optim.final_weight_decay", "optim.warmup_epochs",
                "loss.me_max_weight", "loss.entropy_weight", "data.num_focal", "data.num_workers",
                "checkpoint.every_steps", "checkpoint.last_every_steps", "model.drop_path_rate",
                "data.max_bad_files", "data.max_bad_fraction",
                "logger.console_every", "monitor.every_steps"):
        check(_get(cfg, key) >= 0, f"{key}={_get(cfg, key)} must be >= 0")
    check(not cfg.model.head_batchnorm or cfg.data.batch_size >= 2,
          f"data.batch_size={cfg.data.batch_size}: the head's BatchNorm needs at least 2 images per batch; "
          "use data.batch_size>=2 (or model.head_batchnorm=false)")
    check(cfg.model.num_prototypes >= 2, f"model.num_prototypes={cfg.model.num_prototypes}: with a single "
          "prototype every prediction is certain and the loss is 0 forever; use at least 2 (the paper: 1024)")
    check(cfg.data.max_bad_fraction <= 1, f"data.max_bad_fraction={cfg.data.max_bad_fraction} must lie in [0, 1]")
    check(cfg.optim.max_steps is None or cfg.optim.max_steps > 0,
          f"optim.max_steps={cfg.optim.max_steps} must be a positive integer or null")
    check(cfg.optim.clip_grad is None or cfg.optim.clip_grad > 0,
          f"optim.clip_grad={cfg.optim.clip_grad} must be > 0 or null (no clipping)")
    check(cfg.loss.final_sharpen_T is None or cfg.loss.final_sharpen_T > 0,
          f"loss.final_sharpen_T={cfg.loss.final_sharpen_T} must be > 0 or null")
    check(cfg.optim.schedule_stretch >= 1.0, f"optim.schedule_stretch={cfg.optim.schedule_stretch} must be >= 1")
    for key in ("optim.ema_momentum", "optim.final_ema_momentum"):
        check(0.0 <= _get(cfg, key) <= 1.0, f"{key}={_get(cfg, key)} must lie in [0, 1]")
    check(0.0 <= cfg.masking.ratio < 1.0, f"masking.ratio={cfg.masking.ratio} must lie in [0, 1)")
    for key in ("data.hflip_p", "data.color_jitter_p", "data.grayscale_p", "data.blur_p"):
        check(0.0 <= _get(cfg, key) <= 1.0, f"{key}={_get(cfg, key)} must be a probability in [0, 1]")
    for key in ("data.global_scale", "data.focal_scale", "data.blur_sigma", "optim.betas"):
        value = list(_get(cfg, key))
        check(len(value) == 2 and 0 < value[0] <= value[1],
              f"{key}={value} must be two increasing positive numbers [low, high]")
    check(len(cfg.data.mean) == 3 and len(cfg.data.std) == 3 and min(cfg.data.std) > 0,
          f"data.mean / data.std must hold 3 values each (RGB), std > 0; "
          f"got {list(cfg.data.mean)} / {list(cfg.data.std)}")
    patch = cfg.model.patch_size
    for key in ("model.img_size", "data.global_size", "data.focal_size"):
        size = _get(cfg, key)
        if key == "data.focal_size" and cfg.data.num_focal == 0:
            continue
        check(size % patch == 0,
              f"{key}={size} is not divisible by model.patch_size={patch}; use a multiple of {patch}")
    if cfg.data.name == "folder":
        check(bool(cfg.data.root), "data.root is required for data=folder: pass data.root=/path/to/images")
    if 0 < cfg.masking.ratio < 1:
        for key, size in (("data.global_size", cfg.data.global_size), ("data.focal_size", cfg.data.focal_size)):
            n = (size // patch) ** 2
            if key == "data.focal_size" and not cfg.masking.mask_focal:
                continue
            check(int(n * (1 - cfg.masking.ratio)) >= 1,
                  f"masking.ratio={cfg.masking.ratio} keeps no patch of the {size}-px views ({key}); lower it")
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))


def unknown_keys(cfg: DictConfig | dict, schema: type = MSNConfig, prefix: str = "") -> list[str]:
    """Keys of ``cfg`` that ``schema`` (a dataclass) does not define, as dotted paths.

    Hydra's struct mode rejects a misspelt ``key=value`` override, but ``+key=value`` adds the key anyway
    and it would pass through the merge silently; this walks the config itself.
    """
    node = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    hints = typing.get_type_hints(schema)
    found = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in hints:
            found.append(path)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            found += unknown_keys(value, hints[key], f"{path}.")
    return found


def to_schema(cfg: DictConfig | dict) -> DictConfig:
    """Merge a plain config onto the schema (unknown keys, however added, and wrong types fail) and validate it."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (added with "
                          "+key=value?); msn reads only the keys of configs/ and msn/config.py: check the spelling")
    merged = OmegaConf.merge(OmegaConf.structured(MSNConfig), cfg)
    validate(merged)
    return merged


def compose_run_config(overrides: list[str], placeholder_root: bool = False) -> DictConfig:
    """The validated msn-pretrain config for ``overrides``, composed without running the app (for tools).

    ``placeholder_root``: a folder dataset without ``data.root`` gets ``.`` (for tools that read no images).
    """
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=.", *overrides])
    if placeholder_root and cfg.data.name == "folder" and not cfg.data.root:
        cfg.data.root = "."
    return to_schema(cfg)


def load_run_config(run_dir: Path) -> DictConfig:
    """The validated config a run was trained with (``RUN_DIR/config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no config.yaml; give a run directory that msn-pretrain wrote")
    return to_schema(OmegaConf.load(path))
