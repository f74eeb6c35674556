"""timm VisionTransformer with MSN's masked forward and Hugging-Face-compatible position embeddings.

We subclass timm's ViT (so its state dict keeps timm's names and its attention runs through
``F.scaled_dot_product_attention``) and change two things only:

* inputs of any size divisible by the patch size: the position embedding is resized with
  bicubic interpolation **without** antialias, exactly as ``transformers``' ViT/ViTMSN
  ``interpolate_pos_encoding`` does (timm's own resampling antialiases, which would make an exported
  model behave differently at 96 px);
* optional token dropping after the position embedding (:mod:`msn.masking`).

Initialisation follows the original MSN code by default (``weight_init="msn"``); ``"timm"`` keeps timm's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from msn.masking import gather_tokens


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


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Resize a square position-embedding grid to ``grid`` the way Hugging Face ViT does.

    Args:
        pos_embed: (1, P + n*n, D) embeddings of the P prefix tokens and the native n x n grid.
        grid: target (rows, cols) of patches.
        num_prefix: P, prefix tokens whose embeddings are kept as they are.
    Returns:
        (1, P + rows*cols, D); the input itself when the grid is already the native one.
    """
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    side = int(round(patches.shape[1] ** 0.5))
    if grid == (side, side):
        return pos_embed
    dim = patches.shape[-1]
    patches = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, n, n)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)  # (1, rows*cols, D)
    return torch.cat([prefix, patches], dim=1)


class MaskedViT(VisionTransformer):
    """A timm ViT whose forward accepts any multiple of the patch size and optional keep-indices.

    Args:
        arch: preset name in :data:`ARCHITECTURES`, or the dimensions themselves (:func:`resolve_arch`).
        patch_size: patch side in pixels.
        img_size: native image side; the position-embedding grid is ``img_size / patch_size``.
        drop_path_rate: stochastic depth rate (0 in MSN).
        weight_init: ``msn`` (the original code's: see :meth:`init_msn_weights`) or ``timm`` (timm's own).
    """

    def __init__(self, arch: str | ViTArch, patch_size: int, img_size: int, drop_path_rate: float = 0.0,
                 weight_init: str = "msn") -> None:
        spec = ARCHITECTURES[arch] if isinstance(arch, str) else arch
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init={weight_init!r} is unknown; choose one of {', '.join(WEIGHT_INITS)}")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=spec.mlp_ratio,
            qkv_bias=True,
            num_classes=0,
            global_pool="token",
            drop_path_rate=drop_path_rate,
        )
        self.spec = spec
        self.arch = preset_name(spec) or f"vit_{spec.embed_dim}x{spec.depth}"  # a readable name for logs
        self.patch_embed.strict_img_size = False  # any size divisible by the patch (checked below)
        if weight_init == "msn":
            self.init_msn_weights()

    @torch.no_grad()
    def init_msn_weights(self) -> None:
        """Re-initialise what the original MSN ViT initialises differently from timm.

        Both use truncated N(0, 0.02) for linear weights and the position embedding, zero biases and
        unit LayerNorms. The original also draws the CLS token from N(0, 0.02) (timm: N(0, 1e-6)) and
        the patch projection from Kaiming-normal, fan-in, ReLU gain, ``std = sqrt(2 / (C * p * p))``
        (timm: PyTorch's Conv2d default), with a zero bias.
        """
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.kaiming_normal_(self.patch_embed.proj.weight, mode="fan_in", nonlinearity="relu")
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Tokens after the final norm.

        Args:
            x: (B, C, H, W) images, H and W multiples of the patch size.
            keep: optional (B, K) indices of the patch tokens to keep (CLS is always kept).
        Returns:
            (B, 1 + N, D) tokens, or (B, 1 + K, D) with ``keep``.
        """
        patch = self.patch_embed.patch_size
        if x.shape[-2] % patch[0] or x.shape[-1] % patch[1]:
            raise ValueError(f"input {tuple(x.shape[-2:])} px is not a multiple of the patch size {patch}")
        grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = self.pos_drop(x + interpolate_pos_embed(self.pos_embed, grid, self.num_prefix_tokens))
        if keep is not None:
            x = gather_tokens(x, keep, self.num_prefix_tokens)  # (B, 1 + K, D)
        x = self.norm_pre(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """CLS token after the final norm: (B, C, H, W) -> (B, D)."""
        return self.forward_head(self.forward_features(x, keep))
