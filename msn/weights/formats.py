"""Reading and writing weights in every format we speak (docs/design.md, "Weights on disk").

Readers: a training checkpoint, a run directory (its ``checkpoints/last.pt``) or an original MSN
``*.pth.tar`` (:func:`read_source`); weights to start pretraining from, including Hugging Face ViTMSN
folders and timm safetensors (:func:`read_init_weights`, :func:`init_model_from`). Writers: the
Hugging Face ViTMSN folder, timm safetensors and the original MSN layout (``export_*``). The
``msn-export`` CLI (:mod:`msn.cli.export`), ``msn-pretrain init_from=`` and ``msn-eval`` all use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from msn.config import ModelConfig, model_arch
from msn.config.arch import ARCHITECTURES, ViTArch, preset_name
from msn.utils.files import atomic_write, atomic_write_text
from msn.utils.rundir import check_export_out, is_hf_export, last_checkpoint, source_file
from msn.weights.checkpoint import CheckpointError, check_training_checkpoint, is_training_checkpoint, safe_load
from msn.weights.convert import (
    ConversionError,
    StateDict,
    backbone_to_hf,
    check_compatible,
    from_original_msn,
    hf_to_backbone,
    split_encoder,
    to_original_msn,
)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TIMM_NAMES = {("vit_tiny", 16): "vit_tiny_patch16_224", ("vit_small", 16): "vit_small_patch16_224",
              ("vit_small", 8): "vit_small_patch8_224", ("vit_base", 16): "vit_base_patch16_224",
              ("vit_base", 8): "vit_base_patch8_224", ("vit_large", 16): "vit_large_patch16_224",
              ("vit_huge", 14): "vit_huge_patch14_224"}


@dataclass
class Source:
    """Weights to export: a training-format state dict and what we know about how they were trained."""

    model: StateDict  # online.*, target.*, prototypes
    model_cfg: DictConfig
    path: Path
    step: int | None = None
    epoch: int | None = None
    config: DictConfig | None = None  # the full training config, when the source is ours
    extra: dict[str, Any] = field(default_factory=dict)

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel (mean, std) the weights were trained with: the run's ``data`` config, else ImageNet's
        (an original MSN checkpoint)."""
        if self.config is None:
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        return list(self.config.data.mean), list(self.config.data.std)


def infer_backbone(backbone: StateDict) -> dict[str, Any]:
    """:class:`ModelConfig` fields of a timm-keyed ViT backbone, read off its shapes.

    Returns ``arch`` (a preset's name) when width, depth and MLP width match a preset; otherwise
    ``arch=None`` with ``embed_dim``, ``depth`` and ``mlp_ratio``, and ``num_heads=None``: the number of
    attention heads does not show in any shape. Always ``patch_size`` and ``img_size``.
    """
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in backbone]
    if missing:
        raise ConversionError(f"not a ViT backbone: no {', '.join(missing)}")
    dim = backbone["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in backbone if k.startswith("blocks.")})
    if depth and "blocks.0.mlp.fc1.weight" not in backbone:
        raise ConversionError("not a ViT backbone: no blocks.0.mlp.fc1.weight")
    mlp_ratio = backbone["blocks.0.mlp.fc1.weight"].shape[0] / dim if depth else 4.0
    patch = backbone["patch_embed.proj.weight"].shape[-1]
    grid = round((backbone["pos_embed"].shape[1] - 1) ** 0.5)
    sizes = {"patch_size": patch, "img_size": grid * patch}
    arch = next((n for n, a in ARCHITECTURES.items() if (a.embed_dim, a.depth, a.mlp_ratio) == (dim, depth, mlp_ratio)),
                None)
    if arch is not None:
        return {"arch": arch, **sizes}
    return {"arch": None, "embed_dim": dim, "depth": depth, "num_heads": None, "mlp_ratio": mlp_ratio, **sizes}


def source_arch(model_cfg: DictConfig | ModelConfig) -> ViTArch:
    """The ViT dimensions of a source, or a :class:`ConversionError` that says why they are unknown."""
    try:
        return model_arch(model_cfg)
    except ValueError as e:
        raise ConversionError(
            f"cannot tell the ViT's architecture ({e}): its width and depth match no preset, and the number of "
            "attention heads cannot be read off the weights; export it from an msn training checkpoint or "
            "run directory, whose config records it") from None


def infer_model_config(model_sd: StateDict) -> DictConfig:
    """Architecture of a training-format state dict, read off its shapes (for original MSN files)."""
    backbone, head = split_encoder(model_sd, "target.")
    linears = sorted(k for k in head if k.startswith("fc") and k.endswith(".weight"))
    return OmegaConf.structured(ModelConfig(
        **infer_backbone(backbone), head_layers=len(linears),
        head_hidden_dim=head[linears[0]].shape[0] if len(linears) > 1 else 2048,
        head_output_dim=head[linears[-1]].shape[0], head_batchnorm=any(k.startswith("bn") for k in head),
        num_prototypes=model_sd["prototypes"].shape[0],
    ))


def read_source(path: str | Path) -> Source:
    """Load SOURCE: a run directory, a training checkpoint or an original MSN checkpoint."""
    path = source_file(path)
    raw = safe_load(path)
    if is_training_checkpoint(raw):
        check_training_checkpoint(raw, path)
        config = OmegaConf.create(raw["config"])
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), config.model)  # fields added since: defaults
        return Source(raw["model"], model_cfg, path, raw["step"], raw.get("epoch"), config)
    if isinstance(raw, dict) and "target_encoder" in raw:
        model = from_original_msn(raw)
        try:
            model_cfg = infer_model_config(model)
        except ConversionError as e:
            raise ConversionError(f"{path} is not an original MSN ViT checkpoint ({e})") from None
        except (KeyError, IndexError, AttributeError) as e:
            raise ConversionError(f"{path} is not an original MSN ViT checkpoint: its encoder has no {e}") from None
        return Source(model, model_cfg, path, epoch=raw.get("epoch"))
    raise CheckpointError(f"{path} is neither an msn training checkpoint nor an original MSN checkpoint "
                          "(a dict with encoder, target_encoder and prototypes)")


def hf_config(model_cfg: DictConfig) -> dict[str, Any]:
    """``config.json`` of a Hugging Face ViTMSNModel for this architecture."""
    a = source_arch(model_cfg)
    return {
        "architectures": ["ViTMSNModel"], "model_type": "vit_msn", "hidden_size": a.embed_dim,
        "num_hidden_layers": a.depth, "num_attention_heads": a.num_heads,
        "intermediate_size": int(a.embed_dim * a.mlp_ratio), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": 1e-6,
        "image_size": int(model_cfg.img_size), "patch_size": int(model_cfg.patch_size), "num_channels": 3,
        "qkv_bias": True, "torch_dtype": "float32",
    }


def preprocessor_config(size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """``preprocessor_config.json``: ViTImageProcessor resizing to ``size`` (bicubic) and normalising."""
    return {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std),
    }


def model_card(source: Source, encoder: str) -> str:
    """A README.md for the exported folder: architecture, data, training, how to load it."""
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
            f"| steps / epochs | {source.step} steps, {source.epoch} epochs done of {c.optim.epochs} |",
            f"| batch | {c.data.batch_size} images per process |",
            f"| views | 1 target + 1 anchor at {c.data.global_size} px, {c.data.num_focal} focal at "
            f"{c.data.focal_size} px |",
            f"| masking | {c.masking.ratio:.0%} of the anchor's patches dropped |",
            f"| prototypes | {c.model.num_prototypes} x {c.model.head_output_dim}, tau {c.loss.tau}, "
            f"T {c.loss.sharpen_T}, Sinkhorn {c.loss.sinkhorn}, ME-MAX weight {c.loss.me_max_weight} |",
            f"| optimiser | AdamW, lr {c.optim.lr}, weight decay {c.optim.weight_decay} -> "
            f"{c.optim.final_weight_decay}, EMA {c.optim.ema_momentum} -> {c.optim.final_ema_momentum} |",
        ]
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


def _prepare_out(source: Source, out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse OUT as :func:`msn.utils.rundir.check_export_out` does (SOURCE itself, a run, a non-empty folder
    without ``overwrite``, ...), then create it."""
    check_export_out(out, fmt, overwrite, source.path)
    out.mkdir(parents=True, exist_ok=True)


def _write_safetensors(tensors: StateDict, path: Path) -> None:
    """``path`` as safetensors, written atomically with the umask's usual mode (safetensors' own ``save_file``
    leaves it readable by its owner only)."""
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write(path, lambda f: f.write(data))


def _write_json(path: Path, content: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


def export_hf(source: Source, out: Path, encoder: str = "target", overwrite: bool = False) -> Path:
    """Write a Hugging Face ViTMSN folder (config, safetensors, preprocessor config, model card)."""
    backbone, _ = split_encoder(source.model, f"{encoder}.")
    _prepare_out(source, out, "hf", overwrite)
    _write_safetensors(backbone_to_hf(backbone), out / "model.safetensors")
    _write_json(out / "config.json", hf_config(source.model_cfg))
    _write_json(out / "preprocessor_config.json",
                preprocessor_config(int(source.model_cfg.img_size), *source.mean_std()))
    atomic_write_text(out / "README.md", model_card(source, encoder))
    return out


def timm_create_args(model_cfg: DictConfig) -> dict[str, Any]:
    """``timm.create_model`` name and keyword arguments that build this backbone (no classifier)."""
    a = source_arch(model_cfg)
    name = closest_timm_name(a, int(model_cfg.patch_size))
    kwargs = {"num_classes": 0, "img_size": int(model_cfg.img_size), "patch_size": int(model_cfg.patch_size),
              "embed_dim": a.embed_dim, "depth": a.depth, "num_heads": a.num_heads, "mlp_ratio": a.mlp_ratio}
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


def export_timm(source: Source, out: Path, encoder: str = "target", overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` (timm ViT keys) and ``timm_config.json`` (create_model arguments)."""
    backbone, _ = split_encoder(source.model, f"{encoder}.")
    _prepare_out(source, out, "timm", overwrite)
    _write_safetensors(backbone, out / "model.safetensors")
    _write_json(out / "timm_config.json", timm_create_args(source.model_cfg))
    return out


def export_msn(source: Source, out: Path, overwrite: bool = False) -> Path:
    """Write an original-layout MSN checkpoint (``OUT`` ending in .pth.tar/.pth/.pt, else ``OUT/msn.pth.tar``)."""
    path = check_export_out(out, "msn", overwrite, source.path)
    original = to_original_msn(source.model, epoch=source.epoch or 0)
    return atomic_write(path, lambda f: torch.save(original, f))


def read_safetensors(path: Path) -> StateDict:
    """Tensors of a ``.safetensors`` file; a missing or corrupt file is one :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:160]})") from None


@dataclass
class HFFolder:
    """A Hugging Face ViTMSN folder: the backbone in timm keys, its ViT dimensions and the normalisation."""

    backbone: StateDict
    arch: ViTArch
    mean: list[float]
    std: list[float]


def read_hf_folder(path: Path) -> HFFolder:
    """Read ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` (optional) of a ViTMSN
    folder; a malformed file is one :class:`CheckpointError` naming it."""
    config_path, pre_path = path / "config.json", path / "preprocessor_config.json"
    try:
        hf = json.loads(config_path.read_text())
        arch = ViTArch(int(hf["hidden_size"]), int(hf["num_hidden_layers"]), int(hf["num_attention_heads"]),
                       int(hf["intermediate_size"]) / int(hf["hidden_size"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{config_path} is not a valid ViTMSN config ({type(e).__name__}: {e})") from None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if pre_path.is_file():
        try:
            pre = json.loads(pre_path.read_text())
            mean, std = [float(x) for x in pre.get("image_mean", mean)], [float(x) for x in pre.get("image_std", std)]
            if len(mean) != 3 or len(std) != 3:
                raise ValueError("image_mean and image_std need 3 values")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{pre_path} is not a valid preprocessor config ({type(e).__name__}: {e})") from None
    return HFFolder(hf_to_backbone(read_safetensors(path / "model.safetensors")), arch, mean, std)


def read_init_weights(path: str | Path) -> tuple[str, StateDict]:
    """Weights to start pretraining from, in training-state-dict keys, and the kind of source.

    Returns ``("msn", online.* + target.* + prototypes)`` for an original MSN or msn training checkpoint,
    or ``("backbone", timm backbone keys)`` for a Hugging Face ViTMSN folder or a timm safetensors file.
    """
    path = Path(path)
    if is_hf_export(path):
        return "backbone", read_hf_folder(path).backbone
    if path.is_dir() and (path / "timm_config.json").is_file():
        path = path / "model.safetensors"
    if path.is_file() and path.suffix == ".safetensors":
        return "backbone", read_safetensors(path)
    if path.is_file() or (path.is_dir() and last_checkpoint(path).is_file()):
        return "msn", read_source(path).model
    raise CheckpointError(f"init_from={path}: not a Hugging Face ViTMSN folder, a timm .safetensors file, "
                          "an original MSN .pth.tar or an msn checkpoint")


def init_model_from(model: torch.nn.Module, path: str | Path) -> str:
    """Load ``msn-pretrain init_from=PATH`` weights into an :class:`msn.models.msn.MSN`; return the kind loaded.

    A backbone (Hugging Face or timm) initialises the online and target backbones alike; head and
    prototypes stay fresh. An MSN checkpoint sets both encoders, the head and the prototypes.
    """
    kind, weights = read_init_weights(path)
    if kind == "backbone":
        expected = model.online.backbone.state_dict()
        check_compatible(expected, weights, f"init_from={path}")
        model.online.backbone.load_state_dict(weights)
        model.target.backbone.load_state_dict(weights)
    else:
        check_compatible(model.state_dict(), weights, f"init_from={path}")
        model.load_state_dict(weights)
    return kind
