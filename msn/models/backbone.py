"""timm VisionTransformer with MSN's masked forward and Hugging-Face-compatible position embeddings.

We subclass timm's ViT (so its state dict keeps timm's names and its attention runs through
``F.scaled_dot_product_attention``) and change two things only:

* inputs of any size divisible by the patch size: the position embedding is resized with
  bicubic interpolation **without** antialias, exactly as ``transformers``' ViT/ViTMSN
  ``interpolate_pos_encoding`` does (timm's own resampling antialiases, which would make an exported
  model behave differently at 96 px);
* optional token dropping after the position embedding (:mod:`msn.models.masking`).

Initialisation follows the original MSN code by default (``weight_init="msn"``); ``"timm"`` keeps timm's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from msn.config.arch import ARCHITECTURES, WEIGHT_INITS, ViTArch, preset_name
from msn.models.masking import gather_tokens


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
        arch: preset name in :data:`ARCHITECTURES`, or the dimensions themselves (:func:`msn.config.arch.resolve_arch`).
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
