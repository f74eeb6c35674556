"""The config schema: one dataclass per group, registered with Hydra's ConfigStore as ``msn_schema``.

``msn/configs/config.yaml`` lists ``msn_schema`` first in its defaults, so a misspelt key or a wrongly typed
value in any YAML file or command-line override fails during composition. The comments are the keys'
documentation; :mod:`msn.config.checks` holds what a type cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from msn.config.arch import ViTArch, resolve_arch


@dataclass
class ModelConfig:
    arch: str | None = "vit_pico"  # width / depth / heads preset (msn.config.arch.ARCHITECTURES); null: give all three
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
    # Activation checkpointing of the online encoder's blocks: their activations are recomputed in the backward
    # pass instead of kept (about a third more compute, far less memory: larger batches for the large presets)
    grad_checkpointing: bool = False


@dataclass
class DataConfig:
    name: str = "digits"  # a registered source (msn.data.registry): digits | fashion_mnist | folder | synthetic |
    # webdataset | hf | custom (or the import path of a msn.data.Source subclass)
    root: str | None = None  # image folder for name=folder
    list_file: str | None = None  # optional file of image paths (relative to root) to restrict to
    # name=webdataset: tar shards as a brace pattern ('/data/shard-{000000..000099}.tar'), a glob, a list, or
    # pipe:COMMAND URLs; the members holding a sample's image; where pipe: / http(s) shards are copied
    shards: Any = None
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    shard_cache: str | None = None  # default ~/.cache/msn/shards
    # name=hf: a save_to_disk folder, a folder of parquet / arrow files, or a hub id; its split and image column
    path: str | None = None
    split: str = "train"
    image_key: str = "image"
    # name=custom: a Hydra _target_ node naming a map-style dataset class and its keyword arguments
    dataset: Any = None
    samples_per_epoch: int | None = None  # an epoch of this many samples of the dataset (default: all of them)
    batch_size: int = 64  # images per process per step
    num_workers: int | None = 0  # null: min(8, the CPU cores this process may use)
    augment_on: str = "auto"  # cpu: the whole augmentation in the loader workers; device: colour, blur and
    # normalisation on the training device (workers decode and crop); auto: device when training on a GPU
    cpu_photometric: str = "auto"  # the photometric stage on a CPU: uint8 (OpenCV, as the original's PIL ops: ~2.6x
    # faster), float (the GPU's float formulas), auto: uint8 when OpenCV is installed
    decode_on: str = "auto"  # device: workers read the files, the training device decodes JPEGs (nvJPEG) and cuts
    # the views (needs augment_on device/auto); cpu: workers decode and crop; auto: device on a GPU with JPEG data
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


PRIORS = ("uniform", "power_law")  # loss.prior: MSN's ME-MAX, PMSN's power law


@dataclass
class LossConfig:
    """The MSN loss's settings (msn.train.loss reads them from here, and only here)."""

    tau: float = 0.1  # temperature of the cosine similarity to the prototypes
    sharpen_T: float = 0.25  # target sharpening temperature
    final_sharpen_T: float | None = None  # None: constant sharpen_T; else scheduled linearly to it
    sinkhorn: bool = True
    sinkhorn_iterations: int = 3
    me_max_weight: float = 1.0  # lambda: the weight of the regulariser (ME-MAX, or PMSN's prior matching)
    entropy_weight: float = 0.0
    # The regulariser's prior over the prototypes: uniform (MSN's ME-MAX) | power_law (PMSN, rho_k ~ k^-prior_tau)
    prior: str = "uniform"
    prior_tau: float = 0.25  # PMSN's power-law exponent (the paper's 0.25)
    # Terms of your own: {name: {_target_: mypkg.terms.fn, weight: 0.1, ...}} (msn.train.terms)
    # (null, and untyped, so that the command line may also give the whole node: 'loss.extra_terms={name:{...}}')
    extra_terms: Any = None


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
    # The run's length as a time budget ("30m", "2h", "1h30m", "90s"): the run times its steps over its first ones
    # and fixes its number of steps (and schedules) then, in place of optim.epochs / optim.max_steps
    budget: str | None = None
    # Scale lr and start_lr linearly with the global batch: lr x global batch / lr_base_size (the paper's 1e-3 is for
    # 1024 images). Off for the presets (their recipes stay exact); a fitted recipe (fit) scales its own lr.
    scale_lr: bool = False
    lr_base_size: int = 1024


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
    # any registered protocol (msn.eval.registry): knn (k=20, full labels) | lowshot (5 images per class,
    # logistic regression) | linear | finetune | a plugin's, or a protocol function's import path
    # ... and rankme (label-free: RankMe of the backbone and the head on a fixed sample of the training images,
    # metrics.csv "rankme", "rankme_head" and "rankme_centred"), alone or beside one labelled protocol: [knn, rankme]
    protocol: Any = "knn"
    dataset: str = "digits"  # digits, fashion_mnist, or a folder with train/ and val/ (ImageFolder layout)
    rankme_images: int = 1024  # rankme's sample of the training images (fixed: seed 0); RankMe cannot exceed it
    crop_pct: float = DEFAULT_CROP_PCT  # the centre share of each image evaluated (msn-eval --crop-pct; 1: all)
    options: Any = None  # the protocol's options over its monitoring defaults: {k: 10}, 'monitor.options={k:10}'


@dataclass
class CollapseConfig:
    # Stop a run whose representations collapsed (msn.train.collapse): it writes last.pt, sets status.json to
    # "collapsed", says what collapsed and the usual fixes, and exits 1. false: train on whatever happens.
    stop: bool = True
    # how long a signal must hold (in steps, at the logged rows) before the run stops; null: 5 % of the run's steps,
    # at least 5 logged rows. Signals count after the learning-rate warm-up only.
    window_steps: int | None = None
    rankme_below: float = 1.5  # RankMe (when monitored) under this, backbone or head: collapsed to about one direction


RANK_BY = ("rankme_centred", "rankme", "knn", "loss")  # sweep.rank_by: the figures msn.sweeps.ranking ranks jobs by


@dataclass
class SweepConfig:
    # how a sweep's summary (summary.csv, its table) and a search (hydra/sweeper=optuna) rank the jobs:
    # rankme_centred | rankme (label-free, higher is better) | knn (the labelled monitor's accuracy) | loss (lower is
    # better); the default follows docs/studies.md ("Picking a run without labels")
    rank_by: str = "rankme_centred"


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # periodic checkpoints/step_XXXXXXX.pt (0: only last.pt)
    last_every_steps: int = 100  # how often checkpoints/last.pt is refreshed
    keep: int = 0  # keep only the newest N periodic step_XXXXXXX.pt, deleting older ones (0: keep all)


@dataclass
class DistConfig:
    # A rank that stops making progress (frozen, or waiting for its data) ends the whole job after this many
    # seconds, with one line naming the rank and host (msn.utils.watchdog); 0: never (wait as long as the
    # collectives' own 30-minute timeout). A rank that is alive and busy (an evaluation, a save) is waited for.
    timeout_s: float = 300.0


FIT_MODES = ("auto", "true", "false")  # fit: when msn.plan fits the recipe to the data and the machine


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
    dist: DistConfig = field(default_factory=DistConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; bf16/fp16 need a GPU)
    compile: bool = False  # torch.compile the online backbone and head and the target encoder
    # ddp: every process holds the whole model; fsdp: FSDP2 shards the encoders, gradients and AdamW per block
    strategy: str = "ddp"
    compile_mode: str | None = None  # null (default) | reduce-overhead (CUDA graphs) | max-autotune | ...
    compile_backend: str = "inductor"  # any torch.compile backend (aot_eager, cudagraphs, ... for debugging)
    tf32: bool = True  # fp32 matmuls and convolutions on GPUs may use TF32 tensor cores (as the original's PyTorch did)
    resume: str | None = "auto"  # auto (continue RUN_DIR if it has last.pt) | RUN_DIR or .pt (continue there) | null
    run_name: str | None = None  # the run's folder under outputs/; null: named after the overrides that change results
    init_from: str | None = None  # start from weights: original MSN .pth.tar, HF ViTMSN folder, timm safetensors
    run_dir: str = "."
    # Fit every value you did not give to the data and the machine (msn.plan: view sizes, patch, model, prototypes,
    # batch, lr, steps, warm-up, EMA, workers; each with its reason). auto: a run on a source of your own (folder,
    # hf, webdataset, custom) without experiment=; true: any run (the bundled sets too); false: as configured
    fit: str = "auto"
    plan: bool = False  # true: print the plan (what the run would train, each fitted value and why) and exit
    # the command line's overrides (filled by msn-pretrain and compose_config): the plan leaves what they set alone;
    # null (a config built in code): fit=auto fits nothing, the values are yours (fit=true fits all it may)
    given: list[str] | None = None
    fitted: Any = None  # written by the run: the measured images and each fitted value with its reason; a resume
    # reuses it (msn.plan.Plan.to_record)


def model_arch(model: ModelConfig | DictConfig) -> ViTArch:
    """Width, depth, heads and MLP ratio of the configured ViT (the preset with any field overridden)."""
    return resolve_arch(model.arch, model.embed_dim, model.depth, model.num_heads, model.mlp_ratio)
