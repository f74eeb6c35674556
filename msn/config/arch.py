"""ViT shapes by name: the presets, and checking a shape given field by field.

Kept free of torch and timm so that the config check (:mod:`msn.config`) and every command's ``--help``
start in a second rather than the ten that importing torch, torchvision and timm takes on a small CPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTArch:
    """Width / depth / heads of a ViT preset (patch and image size are chosen separately)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


ARCHITECTURES: dict[str, ViTArch] = {
    "vit_pico": ViTArch(128, 4, 4),  # CPU preset for 32-px inputs
    "vit_tiny": ViTArch(192, 12, 3),
    "vit_small": ViTArch(384, 12, 6),
    "vit_base": ViTArch(768, 12, 12),
    "vit_large": ViTArch(1024, 24, 16),
    "vit_huge": ViTArch(1280, 32, 16),
}
WEIGHT_INITS = ("msn", "timm")


def resolve_arch(arch: str | None, embed_dim: int | None = None, depth: int | None = None,
                 num_heads: int | None = None, mlp_ratio: float | None = None) -> ViTArch:
    """A preset of :data:`ARCHITECTURES` with any of its fields replaced, or a ViT given field by field.

    ``resolve_arch("vit_small", depth=6)`` is a 6-block ViT-S; ``resolve_arch(None, 64, 2, 2)`` a ViT
    64 wide, 2 deep with 2 heads (MLP ratio 4). Raises ValueError naming what is missing or wrong.
    """
    if arch is not None and arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={arch!r} is unknown; choose one of {', '.join(ARCHITECTURES)}, "
                         "or null with model.embed_dim, model.depth and model.num_heads")
    base = ARCHITECTURES[arch] if arch is not None else None
    fields = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    for name, value in fields.items():
        if value is None and base is None:
            raise ValueError(f"model.{name} is required when model.arch is null")
        if value is not None and value <= 0:
            raise ValueError(f"model.{name}={value} must be a positive integer")
    spec = ViTArch(
        embed_dim if embed_dim is not None else base.embed_dim,  # type: ignore[union-attr]
        depth if depth is not None else base.depth,  # type: ignore[union-attr]
        num_heads if num_heads is not None else base.num_heads,  # type: ignore[union-attr]
        mlp_ratio if mlp_ratio is not None else (base.mlp_ratio if base is not None else 4.0),
    )
    if spec.embed_dim % spec.num_heads:
        raise ValueError(f"model.embed_dim={spec.embed_dim} is not divisible by model.num_heads={spec.num_heads}")
    if spec.mlp_ratio <= 0:
        raise ValueError(f"model.mlp_ratio={spec.mlp_ratio} must be > 0")
    return spec


def preset_name(spec: ViTArch) -> str | None:
    """The name of the preset with exactly these dimensions, if there is one."""
    return next((name for name, a in ARCHITECTURES.items() if a == spec), None)
