"""Random token dropping for the anchor views: keep-index tensors applied with one gather.

Dropping (rather than replacing tokens by a mask token) shrinks the sequence the transformer sees,
so compute and memory fall with the mask ratio ``r``; that is MSN's main efficiency argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msn.utils.seeding import stream_generator


def num_kept(num_patches: int, ratio: float) -> int:
    """Patches kept when dropping a fraction ``ratio``: ``floor(N * (1 - r))`` (as the original)."""
    return int(num_patches * (1.0 - ratio))


def keep_indices(
    batch: int,
    num_patches: int,
    ratio: float,
    *,
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
    keep = keep.expand(num_views * batch, -1).contiguous()
    if torch.device(device).type == "cuda":  # pinned + non_blocking: the copy does not wait for the GPU
        return keep.pin_memory().to(device, non_blocking=True)
    return keep.to(device)


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


@dataclass(frozen=True)
class ViewMasks:
    """Keep-indices of one step's anchor views (None: that group is not masked).

    ``anchor_keep`` is (B, K) for the anchor view, ``focal_keep`` (n*B, K') for the focal views stacked
    view-major; both index the patch tokens of their views (CLS excluded).
    """

    anchor_keep: torch.Tensor | None = None
    focal_keep: torch.Tensor | None = None


@dataclass(frozen=True)
class MaskGenerator:
    """Makes every step's :class:`ViewMasks` as a pure function of (seed, step, position in the global batch).

    Args:
        ratio: fraction of patches dropped, in [0, 1); 0 makes no masks.
        per_sample: a mask per image; False: one mask for the whole batch (the original code).
        mask_focal: mask the focal views too (the original masks the anchor view only).
        patch_size: patch side in pixels, to count the patches of a view.
        seed: the run's seed.
    """

    ratio: float
    per_sample: bool
    mask_focal: bool
    patch_size: int
    seed: int

    def generator(self, step: int) -> torch.Generator:
        """A CPU generator, identical on every rank, seeded by (seed, step)."""
        return stream_generator(self.seed, "masks", step)

    def __call__(self, step: int, batch: int, *, anchor_size: int, focal_size: int | None = None, num_focal: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu") -> ViewMasks:
        """Masks of step ``step`` for this rank's ``batch`` images with anchor / focal views of the given sides.

        Each rank takes its own rows of the global batch's masks (:func:`keep_indices`), so ranks get
        different masks, and W processes x batch B mask exactly as one process x batch W*B.
        """
        if self.ratio <= 0:
            return ViewMasks()
        gen = self.generator(step)
        anchor = keep_indices(batch, (anchor_size // self.patch_size) ** 2, self.ratio, per_sample=self.per_sample,
                              generator=gen, device=device, rank=rank, world_size=world_size)
        focal = None
        if self.mask_focal and num_focal and focal_size is not None:
            focal = keep_indices(batch, (focal_size // self.patch_size) ** 2, self.ratio, per_sample=self.per_sample,
                                 generator=gen, device=device, num_views=num_focal, rank=rank, world_size=world_size)
        return ViewMasks(anchor, focal)
