"""Writing weights for other tools (``msn-export``): a Hugging Face ViTMSN folder, a timm export and the original
MSN layout, and the checks on where an export may go (before any weights are read: a typo, the source itself or
a run directory as OUT are refused at once).

Torch-free at import (torch and safetensors are imported by the writers), so ``msn-export`` answers a bad OUT
before it pays for importing torch. Reading: :mod:`msn.weights.read`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from msn.config import DEFAULT_CROP_PCT
from msn.config.arch import ARCHITECTURES, ViTArch, preset_name
from msn.errors import CheckpointError
from msn.utils.arguments import check_writable
from msn.utils.files import atomic_write, atomic_write_text
from msn.utils.rundir import LAST_CHECKPOINT, STATUS_FILE, last_checkpoint, run_dir_of

if TYPE_CHECKING:
    from msn.weights.convert import StateDict
    from msn.weights.read import WeightSource

TIMM_NAMES = {("vit_tiny", 16): "vit_tiny_patch16_224", ("vit_small", 16): "vit_small_patch16_224",
              ("vit_small", 8): "vit_small_patch8_224", ("vit_base", 16): "vit_base_patch16_224",
              ("vit_base", 8): "vit_base_patch8_224", ("vit_large", 16): "vit_large_patch16_224",
              ("vit_huge", 14): "vit_huge_patch14_224"}


def vit_msn_config(arch: ViTArch, patch_size: int, img_size: int) -> dict[str, Any]:
    """``config.json`` of a Hugging Face ViTMSNModel of these dimensions (``ViTMSNConfig(**...)`` builds one)."""
    return {
        "architectures": ["ViTMSNModel"], "model_type": "vit_msn", "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.depth, "num_attention_heads": arch.num_heads,
        "intermediate_size": int(arch.embed_dim * arch.mlp_ratio), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": 1e-6,
        "image_size": int(img_size), "patch_size": int(patch_size), "num_channels": 3,
        "qkv_bias": True, "torch_dtype": "float32",
    }


def hf_config(model_cfg: DictConfig) -> dict[str, Any]:
    """``config.json`` of a Hugging Face ViTMSNModel for the architecture of a model config."""
    from msn.weights.read import source_arch

    return vit_msn_config(source_arch(model_cfg), int(model_cfg.patch_size), int(model_cfg.img_size))


def preprocessor_config(size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """``preprocessor_config.json``: ViTImageProcessor resizing to ``size`` (bicubic) and normalising."""
    return {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std),
    }


def model_card(source: WeightSource, encoder: str) -> str:
    """A README.md for the exported folder: architecture, data, training, how to load it."""
    from msn.weights.read import source_arch

    m = source.model_cfg
    a = source_arch(m)
    name = preset_name(a) or f"ViT {a.embed_dim}x{a.depth}"
    lines = [
        "---", "library_name: transformers", "tags: [vit-msn, self-supervised, msn]", "---", "",
        f"# MSN-pretrained {name} / patch {m.patch_size}", "",
        f"A Vision Transformer pretrained with Masked Siamese Networks (MSN, Assran et al., 2022); the "
        f"{encoder} encoder{' (EMA target, as the paper evaluates)' if encoder == 'target' else ''}, without the "
        "projection head and prototypes.", "",
        "| | |", "|---|---|",
        f"| architecture | ViT, {a.embed_dim} wide, {a.depth} layers, {a.num_heads} heads, patch {m.patch_size}, "
        f"{m.img_size} px |",
        f"| source | `{source.path.name}` |",
    ]
    if source.config is not None:
        c = source.config
        data = c.data.root if c.data.name == "folder" else c.data.name
        lines += [
            f"| pretraining data | {data} |",
            f"| steps / epochs | {training_done(source.step, c, _steps_per_epoch(source.path))} |",
            f"| batch | {c.data.batch_size} images per process |",
            f"| views | 1 target + 1 anchor at {c.data.global_size} px, {c.data.num_focal} focal at "
            f"{c.data.focal_size} px |",
            f"| masking | {c.masking.ratio:.0%} of the anchor's patches dropped |",
            f"| prototypes | {c.model.num_prototypes} x {c.model.head_output_dim}, tau {c.loss.tau}, "
            f"T {c.loss.sharpen_T}, Sinkhorn {c.loss.sinkhorn}, ME-MAX weight {c.loss.me_max_weight} |",
            f"| optimiser | AdamW, lr {c.optim.lr}, weight decay {c.optim.weight_decay} -> "
            f"{c.optim.final_weight_decay}, EMA {c.optim.ema_momentum} -> {c.optim.final_ema_momentum} |",
        ]
        lines += _fitted_lines(c)
    elif source.epoch is not None:
        lines.append(f"| epochs | {source.epoch} (original MSN checkpoint) |")
    lines += [
        "", "## Use", "", "```python", "from transformers import AutoImageProcessor, ViTMSNModel",
        "", 'processor = AutoImageProcessor.from_pretrained("PATH")',
        'model = ViTMSNModel.from_pretrained("PATH")',
        'features = model(**processor(images, return_tensors="pt")).last_hidden_state[:, 0]  # CLS',
        "```", "",
        "Fine-tune with `ViTMSNForImageClassification.from_pretrained(PATH, num_labels=N)`; other sizes work with "
        "`interpolate_pos_encoding=True`.", "",
    ]
    return "\n".join(lines)


def _fitted_lines(c: DictConfig) -> list[str]:
    """The model card's section on what the run fitted to its data and machine (``fitted``: msn.plan), if any."""
    record = c.get("fitted") if hasattr(c, "get") else None
    values = (record or {}).get("values") or {}
    if not values:
        return []
    images = record.get("images")
    head = "" if not images else (f" to {images['count']:,} images of median {images['median_width']} x "
                                  f"{images['median_height']} px")
    lines = ["", "## Fitted recipe", "", f"These values were fitted by msn's plan{head} (the rest as configured):", "",
             "| key | value | why |", "|---|---|---|"]
    return lines + [f"| `{key}` | {v['value']} | {v['reason']} |" for key, v in values.items()]


def training_done(step: int | None, c: DictConfig, steps_per_epoch: int | None) -> str:
    """What a run's checkpoint holds, for the model card: the steps done of the run's length and the epochs they
    make. A run capped by ``optim.max_steps`` may end inside its first epoch: "3 of 3 steps (optim.max_steps),
    0.75 of an epoch", not "0 epochs done of 100"."""
    epochs, cap = int(c.optim.epochs), c.optim.max_steps
    if steps_per_epoch is None:  # a checkpoint away from its run folder: no run.json to tell the epoch's length
        length = f"optim.max_steps {cap}, optim.epochs {epochs}" if cap is not None else f"optim.epochs {epochs}"
        return f"{step} steps ({length})"
    planned = epochs * steps_per_epoch
    total = min(planned, int(cap)) if cap is not None else planned
    capped = f" (optim.max_steps {cap}; optim.epochs {epochs} would be {planned})" if total < planned else ""
    done = (step or 0) / steps_per_epoch
    amount = f"{done:.3g} epoch{'s' if done != 1 else ''}" if done >= 1 or done == 0 else f"{done:.2g} of an epoch"
    return f"{step} of {total} steps{capped}: {amount} of {steps_per_epoch} steps"


def _steps_per_epoch(checkpoint: Path) -> int | None:
    """The epoch's length of the run ``checkpoint`` belongs to (``RUN_DIR/run.json``), or None."""
    try:
        layout = json.loads((checkpoint.parent.parent / "run.json").read_text())
        return int(layout["steps_per_epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prepare_out(source: WeightSource, out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse OUT as :func:`check_export_out` does (SOURCE itself, a run, a non-empty folder
    without ``overwrite``, ...), then create it."""
    check_export_out(out, fmt, overwrite, source.path)
    out.mkdir(parents=True, exist_ok=True)


def _write_safetensors(tensors: StateDict, path: Path) -> None:
    """``path`` as safetensors, written atomically with the umask's usual mode (safetensors' own ``save_file``
    leaves it readable by its owner only)."""
    from safetensors.torch import save as safetensors_bytes

    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write(path, lambda f: f.write(data))


def _write_json(path: Path, content: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


def export_hf(source: WeightSource, out: Path, encoder: str = "target", overwrite: bool = False) -> Path:
    """Write a Hugging Face ViTMSN folder (config, safetensors, preprocessor config, model card)."""
    from msn.weights.convert import split_encoder
    from msn.weights.read import source_arch

    backbone, _ = split_encoder(source.model, f"{encoder}.")
    _prepare_out(source, out, "hf", overwrite)
    m = source.model_cfg
    write_hf_folder(out, backbone, source_arch(m), int(m.patch_size), int(m.img_size), *source.mean_std())
    atomic_write_text(out / "README.md", model_card(source, encoder))
    return out


def write_hf_folder(out: Path, backbone: StateDict, arch: ViTArch, patch_size: int, img_size: int,
                    mean: list[float], std: list[float]) -> Path:
    """The files ``ViTMSNModel.from_pretrained(out)`` reads: ``model.safetensors`` (timm keys converted),
    ``config.json`` and ``preprocessor_config.json``. ``out`` must exist."""
    from msn.weights.convert import backbone_to_hf

    _write_safetensors(backbone_to_hf(backbone), out / "model.safetensors")
    _write_json(out / "config.json", vit_msn_config(arch, patch_size, img_size))
    _write_json(out / "preprocessor_config.json", preprocessor_config(img_size, mean, std))
    return out


def timm_create_args(model_cfg: DictConfig, mean: list[float], std: list[float]) -> dict[str, Any]:
    """``timm.create_model`` name and keyword arguments that build this backbone (no classifier), its
    preprocessing included: ``pretrained_cfg_overlay`` gives the model timm's ``pretrained_cfg`` (the training
    normalisation, the native size, the evaluation crop), so ``timm.data.resolve_data_config(model=vit)`` works."""
    from msn.weights.read import source_arch

    a = source_arch(model_cfg)
    size = int(model_cfg.img_size)
    name = closest_timm_name(a, int(model_cfg.patch_size))
    overlay = {"mean": list(mean), "std": list(std), "input_size": [3, size, size], "crop_pct": DEFAULT_CROP_PCT,
               "interpolation": "bicubic"}
    kwargs = {"num_classes": 0, "img_size": size, "patch_size": int(model_cfg.patch_size),
              "embed_dim": a.embed_dim, "depth": a.depth, "num_heads": a.num_heads, "mlp_ratio": a.mlp_ratio,
              "pretrained_cfg_overlay": overlay}
    return {"model_name": name, "pretrained": False, "kwargs": kwargs}


def closest_timm_name(arch: ViTArch, patch_size: int) -> str:
    """The registered timm ViT nearest to ``arch`` (the same patch size first, then the nearest width).

    timm builds a model by name, and the kwargs in ``timm_config.json`` give every size explicitly, so
    the name only picks timm's defaults for what the kwargs do not set; for an exact preset it is exact.
    """
    exact = TIMM_NAMES.get((preset_name(arch), patch_size))
    if exact is not None:
        return exact
    return min(TIMM_NAMES.items(), key=lambda item: (item[0][1] != patch_size,
                                                     abs(ARCHITECTURES[item[0][0]].embed_dim - arch.embed_dim)))[1]


def export_timm(source: WeightSource, out: Path, encoder: str = "target", overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` (timm ViT keys) and ``timm_config.json`` (create_model arguments)."""
    from msn.weights.convert import split_encoder

    backbone, _ = split_encoder(source.model, f"{encoder}.")
    _prepare_out(source, out, "timm", overwrite)
    _write_safetensors(backbone, out / "model.safetensors")
    _write_json(out / "timm_config.json", timm_create_args(source.model_cfg, *source.mean_std()))
    return out


def export_msn(source: WeightSource, out: Path, overwrite: bool = False) -> Path:
    """Write an original-layout MSN checkpoint (``OUT`` ending in .pth.tar/.pth/.pt, else ``OUT/msn.pth.tar``)."""
    import torch

    from msn.weights.convert import to_original_msn

    path = check_export_out(out, "msn", overwrite, source.path)
    original = to_original_msn(source.model, epoch=source.epoch or 0)
    return atomic_write(path, lambda f: torch.save(original, f))


# An export target, checked before any work (and before importing torch): neither the source nor a run.

def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory: a folder with ``checkpoints/`` or ``status.json``."""
    path = Path(path)
    return (path / LAST_CHECKPOINT.parent).is_dir() or (path / STATUS_FILE).is_file()


def run_within(folder: str | os.PathLike, depth: int = 3, limit: int = 5000) -> Path | None:
    """The first run directory (:func:`is_run_dir`) at ``folder`` or at most ``depth`` levels below it (a sweep's
    runs lie two levels down), looking into ``limit`` folders at most; None when there is none. Symbolic links
    are not followed."""
    level, seen = [Path(folder)], 0
    for _ in range(depth + 1):
        below = []
        for path in level:
            if is_run_dir(path):
                return path
            seen += 1
            if seen >= limit:
                return None
            try:
                below += sorted(Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
            except OSError:
                continue
        level = below
    return None


MSN_SUFFIXES = (".pth.tar", ".pth", ".pt")  # an msn-format OUT ending so is the file itself, else OUT/msn.pth.tar


def export_path(out: str | os.PathLike, fmt: str) -> Path:
    """What ``msn-export --format FMT`` writes for OUT: the folder OUT (hf, timm), or the file OUT (msn, when it
    ends in .pth.tar, .pth or .pt) or OUT/msn.pth.tar."""
    out = Path(out)
    if fmt != "msn" or out.name.endswith(MSN_SUFFIXES):
        return out
    return out / "msn.pth.tar"


def check_export_out(out: str | os.PathLike, fmt: str, overwrite: bool,
                     source: str | os.PathLike | None = None) -> Path:
    """Refuse an export target that would lose or confuse something, before the weights are loaded: OUT that is
    SOURCE (or its run), a run directory or a folder holding one (the run would read as an export), a
    non-empty folder or an existing file without ``overwrite``, a checkpoint of a run, a file where a folder
    is needed, an unwritable place. Returns :func:`export_path`. Torch-free."""
    out = Path(out).expanduser()
    path = export_path(out, fmt)
    if source is not None:
        source = Path(source).expanduser()
        targets = {out.resolve(), path.resolve()}
        if source.resolve() in targets:
            raise CheckpointError(f"OUT {out} is SOURCE itself; choose another OUT (a new folder or file)")
        checkpoint = source if source.is_file() else last_checkpoint(source)
        if {checkpoint.resolve(), (run_dir_of(checkpoint) or checkpoint).resolve()} & targets:
            raise CheckpointError(f"OUT {out} is the run directory or checkpoint of SOURCE {source}; choose another "
                                  "OUT (a new folder or file)")
    into_folder = fmt != "msn" or path != out  # OUT names a folder (hf, timm; msn: OUT/msn.pth.tar)
    if into_folder and out.exists() and not out.is_dir():
        kind = "a folder" if fmt != "msn" else f"a folder or a file ending in {', '.join(MSN_SUFFIXES)}"
        raise CheckpointError(f"{out} is a file; OUT must be {kind} for this format (choose another OUT)")
    if into_folder and out.is_dir():
        run = run_within(out)
        if run == out:
            raise CheckpointError(f"{out} is a run directory (it has checkpoints/ or status.json), which an export "
                                  f"into it would turn into an export folder; choose another OUT, e.g. {out / fmt}")
        if run is not None:
            raise CheckpointError(f"{out} holds the run directory {run}; export into a folder of its own, "
                                  f"e.g. {out / fmt}")
    receiving = out if into_folder else out.parent
    if receiving.name == LAST_CHECKPOINT.parent.name and is_run_dir(receiving.parent):
        raise CheckpointError(f"{receiving} is the checkpoints folder of the run {receiving.parent}; choose another "
                              "OUT")
    if fmt != "msn" and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; choose another OUT or pass --overwrite")
    if fmt == "msn" and path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists; choose another OUT or pass --overwrite")
    check_writable(receiving, path, "choose another OUT")
    return path
