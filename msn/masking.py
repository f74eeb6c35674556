"""Random token dropping for the anchor views: keep-index tensors applied with one gather.

Dropping (rather than replacing tokens by a mask token) shrinks the sequence the transformer sees,
so compute and memory fall with the mask ratio ``r``; that is MSN's main efficiency argument.
"""

from __future__ import annotations

import torch


def num_kept(num_patches: int, ratio: float) -> int:
    """Patches kept when dropping a fraction ``ratio``: ``floor(N * (1 - r))`` (as the original)."""
    return int(num_patches * (1.0 - ratio))


def keep_indices(
    batch: int,
    num_patches: int,
    ratio: float,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    num_views: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Indices of the patch tokens to keep, in increasing order.

    Masks are keyed by position in the *global* batch, so they do not depend on how it is split over
    processes: the noise is drawn for all ``world_size * batch`` images of each view, and this rank
    takes rows ``rank, rank + W, ...``, which are exactly the global positions of its images
    (``EpochSampler`` gives rank r the positions ``r, r + W, ...`` of every global batch).

    Args:
        batch: images B on this process.
        num_patches: patch tokens per image N (CLS excluded).
        ratio: fraction of patches to drop, in [0, 1).
        per_sample: independent masks per image; False shares one mask over the batch (original).
        generator: random source (CPU generator), identical on every rank for a given step.
        num_views: V views of each image stacked view-major (the focal views).
        rank, world_size: this process's place in the data-parallel group.
    Returns:
        (V*B, floor(N * (1 - ratio))) int64 indices into the N patches, view-major.
    """
    if per_sample:
        noise = torch.rand(num_views, world_size * batch, num_patches, generator=generator)  # (V, W*B, N)
        noise = noise[:, rank::world_size].reshape(num_views * batch, num_patches)  # (V*B, N)
    else:
        noise = torch.rand(1, num_patches, generator=generator)
    keep = noise.argsort(dim=1)[:, : num_kept(num_patches, ratio)].sort(dim=1).values
    return keep.expand(num_views * batch, -1).to(device)


def gather_tokens(tokens: torch.Tensor, keep: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """Keep the prefix tokens (CLS) and the patch tokens listed in ``keep``.

    Args:
        tokens: (B, P + N, D) prefix tokens followed by patch tokens, position embedding added.
        keep: (B, K) indices into the N patch tokens.
        num_prefix: P, the number of prefix tokens that are always kept.
    Returns:
        (B, P + K, D) tokens.
    """
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    index = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # (B, K, D)
    return torch.cat([prefix, patches.gather(1, index)], dim=1)
