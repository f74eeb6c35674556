"""Which runs fit their recipe (``fit``) and which keys the user gave: torch-free, so that the config check before a
run leaves alone the values a plan (:mod:`msn.plan`) is going to set."""

from __future__ import annotations

from typing import Any

BUNDLED = ("digits", "fashion_mnist", "synthetic")  # sources with their own hand-made views (fit=auto leaves them)
# A group chosen on the command line gives these keys (model=vit_small: the user chose the model's shape; its
# position grid (model.img_size) is still fitted to the views, and its prototypes to the data). The data group
# names the source: its values are the source's defaults.
GROUP_KEYS = {"model": ("model.arch", "model.embed_dim", "model.depth", "model.num_heads", "model.mlp_ratio",
                        "model.patch_size", "model.head_hidden_dim", "model.head_output_dim")}
# Every key a plan may fit, in the order it prints them.
FITTED_KEYS = ("data.global_size", "model.patch_size", "model.img_size", "data.focal_size", "data.num_focal",
               "masking.ratio", "data.global_scale", "data.focal_scale", "data.blur_p", "data.color_jitter",
               "data.grayscale_p", "data.color_jitter_p", "data.mean", "data.std", "model.arch",
               "model.head_hidden_dim", "model.head_output_dim", "data.batch_size", "model.num_prototypes", "optim.lr",
               "optim.start_lr", "optim.epochs", "optim.max_steps", "optim.warmup_epochs", "optim.ema_momentum",
               "optim.final_ema_momentum", "data.num_workers")


def override_keys(overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The config keys a command line's overrides set: ``optim.lr=5e-4`` and ``+x=1`` set ``optim.lr`` and ``x``, a
    group choice (``model=vit_small``) the keys of :data:`GROUP_KEYS`, ``~key`` deletes ``key``; Hydra's own
    (``hydra.*``) are left out."""
    keys: set[str] = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").strip()
        if not key or key.startswith("hydra"):
            continue
        keys.add(key)
        keys.update(GROUP_KEYS.get(key, ()))
    return keys


def should_fit(mode: Any, data_name: str, overrides: list[str] | tuple[str, ...] | None) -> bool:
    """Whether a run fits its recipe: ``fit=true`` always, ``false`` never; ``auto`` for a source of the user's own
    (not one of :data:`BUNDLED`) in a run that names no ``experiment=`` preset (the shipped presets also set
    ``fit: false``), composed from overrides (``overrides`` None: a config built in code, whose values are kept)."""
    mode = str(mode).lower()
    if mode in ("true", "false"):
        return mode == "true"
    if overrides is None:
        return False
    preset = any(o.lstrip("+").split("=", 1)[0] == "experiment" and o.split("=", 1)[1].strip() not in ("null", "")
                 for o in overrides if "=" in o)
    return str(data_name) not in BUNDLED and not preset


def pending_keys(cfg: Any) -> set[str]:
    """The keys a plan is still going to set in ``cfg`` (a composed config that has not fitted yet): every fitted
    key the command line did not give; none when the run is not fitted or has fitted already."""
    given = cfg.get("given")
    given = None if given is None else list(given)
    if cfg.get("fitted") or not should_fit(cfg.get("fit", "auto"), cfg.data.name, given):
        return set()
    return set(FITTED_KEYS) - override_keys(given or [])
