"""timm VisionTransformer with MSN's masked forward and Hugging-Face-compatible position embeddings.

We subclass timm's ViT (so its state dict keeps timm's names and its attention runs through
``F.scaled_dot_product_attention``) and change two things only:

* inputs of any size divisible by the patch size: the position embedding is resized with
  bicubic interpolation **without** antialias, exactly as ``transformers``' ViT/ViTMSN
  ``interpolate_pos_encoding`` does (timm's own resampling antialiases, which would make an exported
  model behave differently at 96 px);
* optional token dropping after the position embedding (:mod:`msn.masking`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

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
        arch: preset name in :data:`ARCHITECTURES`.
        patch_size: patch side in pixels.
        img_size: native image side; the position-embedding grid is ``img_size / patch_size``.
        drop_path_rate: stochastic depth rate (0 in MSN).
    """

    def __init__(self, arch: str, patch_size: int, img_size: int, drop_path_rate: float = 0.0) -> None:
        spec = ARCHITECTURES[arch]
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
        self.arch = arch
        self.patch_embed.strict_img_size = False  # any size divisible by the patch (checked below)

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
