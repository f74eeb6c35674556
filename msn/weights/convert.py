"""Pure ``state_dict -> state_dict`` conversions between our checkpoints and the formats we speak.

Formats (docs/design.md, "Weights on disk"):

* **ours / timm**: the backbone is timm's VisionTransformer, so its keys *are* timm's (``cls_token``,
  ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``);
  a training checkpoint holds ``online.{backbone,head}.*``, ``target.{backbone,head}.*`` and ``prototypes``.
* **Hugging Face ViTMSN**: ``embeddings.*``, ``encoder.layer.N.*`` with the fused qkv split into
  ``query`` / ``key`` / ``value``, final ``layernorm``; no prefix, no head.
* **original MSN** (``*.pth.tar``): ``encoder`` / ``target_encoder`` dicts whose keys carry the DDP
  ``module.`` prefix, the DeiT (= timm) backbone names and the projection head under ``fc.*``;
  ``prototypes``; ``epoch``.

Every conversion names every key and checks every shape: an unexpected or missing key is an error.
"""

from __future__ import annotations

import re

import torch

from msn.errors import ConversionError

StateDict = dict[str, torch.Tensor]

# timm block suffix -> HF layer suffix (weights and biases alike); qkv is handled separately.
_BLOCK_TO_HF = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP_TO_HF = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_QKV = ("query", "key", "value")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def backbone_to_hf(sd: StateDict) -> StateDict:
    """timm ViT backbone -> Hugging Face ViTMSNModel keys; splits ``attn.qkv`` (3D, D) into q, k, v (D, D)."""
    out: StateDict = {}
    for key, value in sd.items():
        if key in _TOP_TO_HF:
            out[_TOP_TO_HF[key]] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m is None:
            raise ConversionError(f"unexpected backbone key {key!r} (shape {tuple(value.shape)})")
        layer, name, kind = m.groups()
        prefix = f"encoder.layer.{layer}."
        if name == "attn.qkv":
            if value.shape[0] % 3:
                raise ConversionError(f"{key} has shape {tuple(value.shape)}; expected 3*D rows")
            for part, chunk in zip(_QKV, value.chunk(3, dim=0), strict=True):  # timm fuses in q, k, v order
                out[f"{prefix}attention.attention.{part}.{kind}"] = chunk.contiguous()
        elif name in _BLOCK_TO_HF:
            out[f"{prefix}{_BLOCK_TO_HF[name]}.{kind}"] = value
        else:
            raise ConversionError(f"unexpected backbone key {key!r} (shape {tuple(value.shape)})")
    return out


def hf_to_backbone(sd: StateDict) -> StateDict:
    """Hugging Face ViTMSN keys (optionally under ``vit.``) -> timm ViT backbone; fuses q, k, v."""
    top = {v: k for k, v in _TOP_TO_HF.items()}
    block = {v: k for k, v in _BLOCK_TO_HF.items()}
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        key = key.removeprefix("vit.")
        if key.startswith("classifier."):
            continue  # a fine-tuned ViTMSNForImageClassification: the backbone is all we take
        if key in top:
            out[top[key]] = value
            continue
        m = _HF_LAYER_KEY.match(key)
        if m is None:
            raise ConversionError(f"unexpected Hugging Face key {key!r} (shape {tuple(value.shape)})")
        layer, name, kind = m.groups()
        if name.startswith("attention.attention."):
            qkv.setdefault((layer, kind), {})[name.rsplit(".", 1)[1]] = value
        elif name in block:
            out[f"blocks.{layer}.{block[name]}.{kind}"] = value
        else:
            raise ConversionError(f"unexpected Hugging Face key {key!r} (shape {tuple(value.shape)})")
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ConversionError(f"layer {layer}: attention {kind} has {sorted(parts)}; expected query, key, value")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


def split_encoder(sd: StateDict, prefix: str) -> tuple[StateDict, StateDict]:
    """``{prefix}backbone.*`` and ``{prefix}head.*`` of a training state dict, prefixes removed."""
    backbone = {k[len(prefix) + 9:]: v for k, v in sd.items() if k.startswith(prefix + "backbone.")}
    head = {k[len(prefix) + 5:]: v for k, v in sd.items() if k.startswith(prefix + "head.")}
    if not backbone:
        raise ConversionError(f"no {prefix}backbone.* keys: not an msn training state dict")
    return backbone, head


def _head_to_original(head: StateDict) -> StateDict:
    return {f"fc.{k}": v for k, v in head.items()}


def to_original_msn(model_sd: StateDict, epoch: int) -> dict:
    """Training state dict (``online.*``, ``target.*``, ``prototypes``) -> original MSN checkpoint dict."""
    out: dict = {"epoch": epoch, "prototypes": model_sd["prototypes"]}
    for ours, theirs in (("online.", "encoder"), ("target.", "target_encoder")):
        backbone, head = split_encoder(model_sd, ours)
        out[theirs] = {f"module.{k}": v for k, v in {**backbone, **_head_to_original(head)}.items()}
    return out


def from_original_msn(ckpt: dict) -> StateDict:
    """Original MSN checkpoint -> training state dict (``online.*``, ``target.*``, ``prototypes``).

    Keys without the ``module.`` prefix (a single-GPU save) are accepted too.
    """
    missing = [k for k in ("encoder", "target_encoder", "prototypes") if k not in ckpt]
    if missing:
        raise ConversionError(f"not an original MSN checkpoint: missing {', '.join(missing)}")
    if not (isinstance(ckpt["prototypes"], torch.Tensor) and ckpt["prototypes"].ndim == 2):
        raise ConversionError("not an original MSN checkpoint: prototypes is not a (K, D) tensor")
    for part in ("encoder", "target_encoder"):
        if not (isinstance(ckpt[part], dict) and all(isinstance(v, torch.Tensor) for v in ckpt[part].values())):
            raise ConversionError(f"not an original MSN checkpoint: {part} is not a state dict of tensors")
    out: StateDict = {"prototypes": ckpt["prototypes"]}
    for theirs, ours in (("encoder", "online."), ("target_encoder", "target.")):
        for key, value in ckpt[theirs].items():
            key = key.removeprefix("module.")
            out[ours + (f"head.{key[3:]}" if key.startswith("fc.") else f"backbone.{key}")] = value
    return out


def check_compatible(expected: StateDict, given: StateDict, what: str) -> None:
    """Raise a :class:`ConversionError` that lists every missing, unexpected or mis-shaped key."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
              for k in sorted(set(expected) & set(given)) if expected[k].shape != given[k].shape]
    if missing or unexpected or shapes:
        parts = []  # one line: the first few differences of each kind, then how many more
        for name, items in (("different shapes", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                parts.append(f"{name} ({len(items)}): " + ", ".join(items[:4]) + (", ..." if len(items) > 4 else ""))
        raise ConversionError(f"{what} does not match the configured architecture: " + "; ".join(parts))
