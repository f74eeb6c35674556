"""Reading weights in every format we speak (docs/design.md, "Weights on disk"), into our training keys.

Sources: a training checkpoint, a run directory (its ``checkpoints/last.pt``) or an original MSN ``*.pth.tar``
(:func:`read_source`, the whole model); a Hugging Face ViTMSN export (:func:`read_hf_folder`) and a timm export
(:func:`read_timm_export`), which hold a backbone. :func:`read_backbone` reads a backbone with its
preprocessing from any of them (``msn.load_backbone``, ``msn-eval``, ``msn-viz``); :func:`read_init_weights` and
:func:`init_model_from` start a run from one (``msn-pretrain init_from=``). Writing: :mod:`msn.weights.export`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from msn.config import ModelConfig, model_arch
from msn.config.arch import ARCHITECTURES, ViTArch
from msn.errors import CheckpointError, ConversionError
from msn.utils.rundir import TIMM_CONFIG, is_hf_export, last_checkpoint, source_file
from msn.weights.checkpoint import check_training_checkpoint, is_training_checkpoint, safe_load, with_shards
from msn.weights.convert import StateDict, check_compatible, from_original_msn, hf_to_backbone, split_encoder

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

@dataclass
class WeightSource:
    """A whole MSN model read from disk: a training-format state dict and what we know about how it was trained."""

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


def read_source(path: str | Path) -> WeightSource:
    """Load SOURCE: a run directory, a training checkpoint or an original MSN checkpoint."""
    path = source_file(path)
    raw = safe_load(path)
    if is_training_checkpoint(raw):
        raw = with_shards(raw, path)
        check_training_checkpoint(raw, path)
        config = OmegaConf.create(raw["config"])
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), config.model)  # fields added since: defaults
        return WeightSource(raw["model"], model_cfg, path, raw["step"], raw.get("epoch"), config)
    if isinstance(raw, dict) and "target_encoder" in raw:
        model = from_original_msn(raw)
        try:
            model_cfg = infer_model_config(model)
        except ConversionError as e:
            raise ConversionError(f"{path} is not an original MSN ViT checkpoint ({e})") from None
        except (KeyError, IndexError, AttributeError) as e:
            raise ConversionError(f"{path} is not an original MSN ViT checkpoint: its encoder has no {e}") from None
        return WeightSource(model, model_cfg, path, epoch=raw.get("epoch"))
    raise CheckpointError(f"{path} is neither an msn training checkpoint nor an original MSN checkpoint "
                          "(a dict with encoder, target_encoder and prototypes)")


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
class BackboneWeights:
    """A ViT backbone read from disk: its weights in timm keys, its dimensions and the preprocessing it was trained
    with (what ``msn.load_backbone`` builds a model from)."""

    backbone: StateDict
    arch: ViTArch
    patch_size: int
    img_size: int
    mean: list[float]
    std: list[float]
    path: Path  # the file the weights came from (the feature cache fingerprints it)


def _backbone_weights(backbone: StateDict, arch: ViTArch, mean: list[float], std: list[float], path: Path,
                      what: Path) -> BackboneWeights:
    """:class:`BackboneWeights` with the patch and image size read off the tensors; dimensions that do not fit
    are one :class:`ConversionError` naming ``what``."""
    sizes = infer_backbone(backbone)
    if arch.embed_dim % arch.num_heads:
        raise ConversionError(f"{what}: {arch.num_heads} attention heads do not divide the width {arch.embed_dim}")
    return BackboneWeights(backbone, arch, int(sizes["patch_size"]), int(sizes["img_size"]), list(mean), list(std),
                           path)


def read_hf_folder(path: Path) -> BackboneWeights:
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
    weights = path / "model.safetensors"
    return _backbone_weights(hf_to_backbone(read_safetensors(weights)), arch, mean, std, weights, path)


def is_timm_export(path: str | Path) -> bool:
    """Whether ``path`` is a timm export: a folder with ``timm_config.json``, or a ``.safetensors`` file."""
    path = Path(path)
    return (path.is_dir() and (path / TIMM_CONFIG).is_file()) or (path.is_file() and path.suffix == ".safetensors")


def read_timm_export(path: Path) -> BackboneWeights:
    """A timm export (``msn-export --format timm``): ``model.safetensors`` in timm's keys and ``timm_config.json``
    (its ``create_model`` arguments, whose ``pretrained_cfg_overlay`` holds the normalisation; ImageNet's when an
    older export lacks it). A lone ``.safetensors`` file works when its width and depth are a preset's (the number
    of heads does not show in the tensors)."""
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config_path = weights.parent / TIMM_CONFIG
    backbone = read_safetensors(weights)
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if config_path.is_file():
        try:
            kwargs = json.loads(config_path.read_text())["kwargs"]
            arch = ViTArch(int(kwargs["embed_dim"]), int(kwargs["depth"]), int(kwargs["num_heads"]),
                           float(kwargs.get("mlp_ratio", 4.0)))
            overlay = kwargs.get("pretrained_cfg_overlay") or {}
            mean = [float(x) for x in overlay.get("mean", mean)]
            std = [float(x) for x in overlay.get("std", std)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{config_path} is not a valid timm export config ({type(e).__name__}: {e})"
                                  ) from None
    else:
        arch = source_arch(OmegaConf.structured(ModelConfig(**infer_backbone(backbone))))
    return _backbone_weights(backbone, arch, mean, std, weights, path)


def read_backbone(path: str | Path, encoder: str = "target") -> BackboneWeights:
    """The backbone of anything we read: a Hugging Face export, a timm export, a run directory, a training
    checkpoint or an original MSN ``*.pth.tar`` (``encoder``: the EMA ``target``, as the paper evaluates, or the
    ``online`` one, for the last three). Each failure is one :class:`CheckpointError` or :class:`ConversionError`."""
    path = Path(path)
    if is_hf_export(path):
        return read_hf_folder(path)
    if is_timm_export(path):
        return read_timm_export(path)
    source = read_source(path)
    backbone, _ = split_encoder(source.model, f"{encoder}.")
    return _backbone_weights(backbone, source_arch(source.model_cfg), *source.mean_std(), source.path, path)


def read_init_weights(path: str | Path) -> tuple[str, StateDict]:
    """Weights to start pretraining from, in training-state-dict keys, and the kind of source.

    Returns ``("msn", online.* + target.* + prototypes)`` for an original MSN or msn training checkpoint,
    or ``("backbone", timm backbone keys)`` for a Hugging Face ViTMSN folder or a timm safetensors file.
    """
    path = Path(path)
    if is_hf_export(path):
        return "backbone", read_hf_folder(path).backbone
    if is_timm_export(path):  # the tensors alone: the run's config says what they must fit
        return "backbone", read_safetensors(path / "model.safetensors" if path.is_dir() else path)
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
