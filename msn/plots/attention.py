"""msn-viz attention: where the target encoder's CLS token looks, per head and averaged (``msn-viz`` saves the grid
under a title that names the block and the encoder, beside a colour bar: :func:`attention_figure`).

The last block's self-attention of the CLS token over the patch tokens, ``softmax(q_cls . k / sqrt(d))``,
computed from that block's own projections (timm's attention runs through a fused kernel that does not
return its weights), for images after the evaluation preprocessing (resize, centre crop).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from msn.data.images import load_rgb
from msn.eval.features import Encoder, eval_transform
from msn.models.backbone import MaskedViT
from msn.plots.common import framed_figure, mosaic, to_display, upscale

TITLE_PX, COLORBAR_PX = 30, 64  # the strips above the grid (the title) and beside it (the colour bar)
COLORMAP = "inferno"


@torch.no_grad()
def cls_attention(backbone: MaskedViT, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (B, heads, S/p, S/p) CLS-to-patch attention of the last block.

    Each map sums to 1 over the patches together with the CLS token's attention to itself (left out).
    """
    block = backbone.blocks[-1]
    captured: list[torch.Tensor] = []
    hook = block.norm1.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        backbone.forward_features(images)
    finally:
        hook.remove()
    x = captured[-1]  # (B, T, D): the last block's attention input
    attn = block.attn
    b, t, d = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d/H)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = (q[:, :, :1] @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # (B, H, 1, T)
    patches = weights[:, :, 0, backbone.num_prefix_tokens:]  # (B, H, N)
    grid = images.shape[-1] // backbone.patch_embed.patch_size[0]
    return patches.reshape(b, heads, grid, grid)


def load_images(encoder: Encoder, paths: Sequence[Path] = (),
                dataset_images: Sequence[Image.Image] = ()) -> torch.Tensor:
    """Image files (or already loaded images) through the encoder's evaluation preprocessing: (B, 3, S, S)."""
    transform = eval_transform(encoder)
    pictures = [load_rgb(Path(p)) for p in paths] + list(dataset_images)
    return torch.stack([transform(p) for p in pictures])


def heat(image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 image and a (g, g) map -> the map upsampled, scaled to [0, 1], as a colour overlay."""
    from matplotlib import colormaps

    size = image.shape[0]
    w = torch.from_numpy(weights).float()[None, None]
    w = F.interpolate(w, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    w = (w - w.min()) / max(w.max() - w.min(), 1e-12)
    colour = colormaps[COLORMAP](w)[..., :3] * 255.0  # (S, S, 3)
    return np.round(0.45 * image + 0.55 * colour).astype(np.uint8)


def attention_picture(images: torch.Tensor, maps: torch.Tensor, mean: list[float], std: list[float],
                      cell: int) -> Image.Image:
    """One row per image: the image | the mean over heads | head 1 ... head H, each ``cell`` px square."""
    shown = to_display(images, mean, std)
    rows = []
    for i in range(len(images)):
        per_head = maps[i].cpu().numpy()  # (H, g, g)
        row = [upscale(shown[i], cell), upscale(heat(shown[i], per_head.mean(axis=0)), cell)]
        row += [upscale(heat(shown[i], m), cell) for m in per_head]
        rows.append(row)
    labels = ["image", "mean"] + [f"head {h}" for h in range(1, maps.shape[1] + 1)]
    return mosaic(rows, cell, labels)


def attention_figure(images: torch.Tensor, maps: torch.Tensor, mean: list[float], std: list[float], cell: int, *,
                     block: int, blocks: int, encoder: str = "target encoder"):  # -> matplotlib Figure
    """:func:`attention_picture`'s grid, pixel for pixel, under a title (which block of which encoder; what the
    maps are) and beside a colour bar of the overlay's colours (each map is scaled from its own minimum to its
    maximum): ``(2 + H) * cell + COLORBAR_PX`` x ``TITLE_PX + rows * cell`` px."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    grid = attention_picture(images, maps, mean, std, cell)
    fig = framed_figure(grid, top=TITLE_PX, right=COLORBAR_PX)
    width, height = fig.bbox.width, fig.bbox.height
    title = fig.suptitle(f"{encoder}, block {block} of {blocks}: CLS-to-patch attention\nmean over {maps.shape[1]} "
                         "heads, then each head; each map from its min to its max", fontsize=7, y=1 - 2 / height,
                         va="top")
    renderer = fig.canvas.get_renderer()
    while title.get_window_extent(renderer).width > width - 4 and title.get_fontsize() > 4:  # a narrow grid
        title.set_fontsize(title.get_fontsize() - 0.5)
    margin = 8 / height  # room for the tick labels at the bar's ends
    bar = fig.add_axes((grid.width / width + 8 / width, margin, 10 / width, grid.height / height - 2 * margin),
                       label="<colorbar>")  # the label matplotlib gives the colour bars it places itself
    colorbar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=COLORMAP), cax=bar, ticks=[0, 1])
    colorbar.ax.set_yticklabels(["min", "max"], fontsize=6)
    colorbar.set_label("attention", fontsize=6, labelpad=1)
    return fig
