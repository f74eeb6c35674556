"""Value checks a type cannot express (ranges, divisibility, names), and the merge onto the schema."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from msn.config.arch import WEIGHT_INITS
from msn.config.fitting import override_keys, pending_keys
from msn.config.schema import FIT_MODES, PRIORS, RANK_BY, MSNConfig, check_crop_pct, model_arch
from msn.errors import ConfigError

_CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
    "strategy": ("ddp", "fsdp"),
    "logger.name": ("csv", "wandb"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
    "model.weight_init": WEIGHT_INITS,
    "optim.prototype_grad": ("sum", "mean"),
    "loss.prior": PRIORS,
    "data.augment_on": ("auto", "cpu", "device"),
    "data.decode_on": ("auto", "cpu", "device"),
    "data.cpu_photometric": ("auto", "uint8", "float"),
    "sweep.rank_by": RANK_BY,
    "compile_mode": (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


# logger.progress -> tqdm's ``disable``: None (auto: off when stderr is not a terminal, so that a SLURM or
# nohup log gets the console lines and not a bar redrawn at every step), False (true) or True (false).
PROGRESS_MODES: dict[str, bool | None] = {"auto": None, "true": False, "false": True}


def progress_bar_disabled(progress: str) -> bool | None:
    """tqdm's ``disable`` for a ``logger.progress`` value (:data:`PROGRESS_MODES`)."""
    return PROGRESS_MODES[str(progress).lower()]


def fit_mode(fit: Any) -> str:
    """``fit`` as one of :data:`FIT_MODES` (Hydra reads ``fit=true`` as a boolean, which the string key holds as
    ``"True"``); a ``ValueError`` for anything else."""
    mode = str(fit).lower()
    if mode not in FIT_MODES:
        raise ValueError(f"fit={fit!r} is not allowed; choose one of {', '.join(FIT_MODES)}")
    return mode


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")


def budget_seconds(budget: str) -> float:
    """``optim.budget`` in seconds: ``"30m"`` 1800, ``"2h"`` 7200, ``"1h30m"`` 5400, ``"90s"`` 90; a ``ValueError``
    naming the form for anything else (a number without its unit included: minutes or seconds?)."""
    text = str(budget).strip().lower().replace(" ", "")
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"optim.budget={budget!r} is not a duration; give hours, minutes or seconds with their "
                         "unit: 30m, 2h, 1h30m, 90s")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"optim.budget={budget!r} must be longer than 0 s")
    return seconds


LABEL_FREE_MONITORS = ("rankme",)  # monitor.protocol values that need no labelled set


def monitor_protocols(protocol: Any) -> tuple[str | None, bool]:
    """``monitor.protocol`` (a name or a list of names) as (the labelled protocol or None, whether RankMe is
    measured); a ``ValueError`` for an empty list, a name given twice or two labelled protocols (one ``monitor``
    column holds one accuracy)."""
    names = [str(protocol)] if isinstance(protocol, str) else [str(p) for p in (protocol or [])]
    if not names or any(not n for n in names):
        raise ValueError(f"monitor.protocol={protocol!r}: name a protocol (knn, lowshot, ..., rankme) or a list of "
                         "them, e.g. [knn,rankme]")
    labelled = [n for n in names if n not in LABEL_FREE_MONITORS]
    if len(labelled) > 1 or len(set(names)) < len(names):
        raise ValueError(f"monitor.protocol={names}: give one labelled protocol at most, beside rankme (e.g. "
                         "[knn,rankme]); metrics.csv's monitor column holds one accuracy")
    return (labelled[0] if labelled else None), "rankme" in names


def _floats(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float of ``cfg`` (lists included) as (dotted key, value)."""
    found = []
    for key, value in (cfg.items() if hasattr(cfg, "items") else enumerate(cfg)):
        name = f"{prefix}{key}" if not isinstance(key, int) else f"{prefix[:-1]}[{key}]"
        if isinstance(value, float):
            found.append((name, value))
        elif isinstance(value, (dict, list)):
            found += _floats(value, f"{name}.")
    return found


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
    check(not (cfg.data.decode_on == "device" and cfg.data.augment_on == "cpu"),
          "data.decode_on=device cuts the views in the training process, so the photometric stage runs there too; "
          "set data.augment_on=device (or auto), or data.decode_on=cpu")
    if cfg.strategy == "fsdp":  # what the sharded model does not run yet, named before anything starts
        check(cfg.precision != "fp16", "strategy=fsdp runs precision=fp32 or bf16 (fp16's loss scaler does not take "
              "sharded gradients); use precision=bf16")
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
    try:
        monitor_protocols(cfg.monitor.protocol)
    except ValueError as e:
        errors.append(str(e))
    try:
        fit_mode(cfg.fit)
        if cfg.optim.budget is not None:
            budget_seconds(cfg.optim.budget)
    except ValueError as e:
        errors.append(str(e))
    length = sorted(override_keys(list(cfg.given or [])) & {"optim.epochs", "optim.max_steps"})
    check(cfg.optim.budget is None or not length, f"optim.budget={cfg.optim.budget} sets the run's length, and so does "
          f"{' and '.join(length)}: give one of them")
    check(cfg.monitor.rankme_images >= 2, f"monitor.rankme_images={cfg.monitor.rankme_images} must be at least 2 "
          "(RankMe cannot exceed the sample's size; 1024 by default)")
    check(cfg.collapse.window_steps is None or cfg.collapse.window_steps > 0,
          f"collapse.window_steps={cfg.collapse.window_steps} must be a positive number of steps, or null (5 % of the "
          "run)")
    check(cfg.collapse.rankme_below >= 1, f"collapse.rankme_below={cfg.collapse.rankme_below} must be >= 1 (RankMe is "
          "at least 1; 1.5 by default)")
    for key in ("model.patch_size", "model.img_size", "model.head_hidden_dim", "model.head_output_dim",
                "model.head_layers", "model.num_prototypes", "data.batch_size", "data.global_size",
                "data.focal_size", "data.image_size", "data.synthetic_size", "optim.epochs", "optim.lr_base_size",
                "logger.log_every", "loss.sinkhorn_iterations"):
        check(_get(cfg, key) > 0, f"{key}={_get(cfg, key)} must be a positive integer")
    for key in ("optim.lr", "optim.start_lr", "loss.tau", "loss.sharpen_T"):
        check(_get(cfg, key) > 0, f"{key}={_get(cfg, key)} must be > 0")
    for key in ("optim.final_lr", "optim.weight_decay", "optim.final_weight_decay", "optim.warmup_epochs",
                "loss.me_max_weight", "loss.entropy_weight", "loss.prior_tau", "data.num_focal",
                "checkpoint.every_steps", "checkpoint.last_every_steps", "checkpoint.keep", "model.drop_path_rate",
                "data.max_bad_files", "data.max_bad_fraction",
                "logger.console_every", "monitor.every_steps", "dist.timeout_s"):
        check(_get(cfg, key) >= 0, f"{key}={_get(cfg, key)} must be >= 0")
    check(cfg.data.num_workers is None or cfg.data.num_workers >= 0,
          f"data.num_workers={cfg.data.num_workers} must be >= 0 (or null: min(8, the CPU cores available))")
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
    for key in ("data.global_scale", "data.focal_scale"):  # shares of the image's area
        value = list(_get(cfg, key))
        check(len(value) == 2 and 0 < value[0] <= value[1] <= 1,
              f"{key}={value} must be two increasing positive numbers [low, high] of at most 1 (shares of the "
              "image's area)")
    value = list(cfg.data.blur_sigma)
    check(len(value) == 2 and 0 < value[0] <= value[1],
          f"data.blur_sigma={value} must be two increasing positive numbers [low, high]")
    value = list(cfg.optim.betas)
    check(len(value) == 2 and all(0 <= b < 1 for b in value),
          f"optim.betas={value} must be two numbers in [0, 1) (AdamW's beta1, beta2; the default [0.9, 0.999])")
    check(cfg.model.drop_path_rate < 1, f"model.drop_path_rate={cfg.model.drop_path_rate} must lie in [0, 1) "
          "(the probability of skipping a block; 0 in MSN)")
    plain = OmegaConf.to_container(cfg, resolve=False)  # interpolations (run_dir) stay unresolved strings
    for key, number in _floats(plain):  # NaN and infinity pass every comparison above, or fail them confusingly
        check(math.isfinite(number), f"{key}={number} must be a finite number")
    check(len(cfg.data.mean) == 3 and len(cfg.data.std) == 3 and min(cfg.data.std) > 0,
          f"data.mean / data.std must hold 3 values each (RGB), std > 0; "
          f"got {list(cfg.data.mean)} / {list(cfg.data.std)}")
    patch = cfg.model.patch_size
    pending = pending_keys(cfg)  # a fitted run's views and patch are set by its plan: checked after it
    for key in ("model.img_size", "data.global_size", "data.focal_size"):
        size = _get(cfg, key)
        if (key == "data.focal_size" and cfg.data.num_focal == 0) or {key, "model.patch_size"} & pending:
            continue
        check(size % patch == 0,
              f"{key}={size} is not divisible by model.patch_size={patch}; use a multiple of {patch}")
    check(cfg.data.samples_per_epoch is None or cfg.data.samples_per_epoch >= 1,
          f"data.samples_per_epoch={cfg.data.samples_per_epoch} must be >= 1 (or null: the whole dataset)")
    if 0 < cfg.masking.ratio < 1 and not pending:
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
                          "+key=value?); msn reads only the keys of msn/configs/ and msn/config/schema.py: check the "
                          "spelling")
    merged = OmegaConf.merge(OmegaConf.structured(MSNConfig), cfg)
    validate(merged)
    return merged


def load_run_config(run_dir: Path) -> DictConfig:
    """The validated config a run was trained with (``RUN_DIR/config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no config.yaml; give a run directory that msn-pretrain wrote")
    return to_schema(OmegaConf.load(path))
