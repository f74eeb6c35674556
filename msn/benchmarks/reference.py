"""The original MSN training step, re-written plainly for timing only (``msn-bench step --reference``).

Written from the paper (Assran et al., 2022) and the structure the original code is known to have,
not from its source: a DeiT-style ViT whose attention forms the full softmax matrix, the projection
head run once per group of equal-size anchor views, one random patch permutation per batch drawn on
the host, sharpened + Sinkhorn targets with ME-MAX, AdamW over three parameter groups, encoder-only
gradient clipping, an EMA written as a Python loop over parameters, and the host reads of the loss
terms and the distinct-prototype count that the original makes every step. Nothing in the trainer
uses this module; it lets ``msn-bench`` time "the original step" on the same device in the same run.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from msn.config.arch import ViTArch
from msn.utils.device import autocast


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, H, N, N), materialised
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceEncoder(nn.Module):
    """ViT + projection head; :meth:`forward` takes a list of view batches and groups them by size."""

    def __init__(self, arch: ViTArch, patch_size: int, img_size: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        d = arch.embed_dim
        self.patch = patch_size
        self.proj = nn.Conv2d(3, d, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // patch_size) ** 2, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, arch.num_heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.fc = nn.Sequential(OrderedDict(
            fc1=nn.Linear(d, hidden_dim), bn1=nn.BatchNorm1d(hidden_dim), gelu1=nn.GELU(),
            fc2=nn.Linear(hidden_dim, hidden_dim), bn2=nn.BatchNorm1d(hidden_dim), gelu2=nn.GELU(),
            fc3=nn.Linear(hidden_dim, out_dim)))

    def _pos_embed(self, side: int) -> torch.Tensor:
        native = int(math.sqrt(self.pos_embed.shape[1] - 1))
        if side == native:
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=side / native, mode="bicubic")
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1)

    def _features(self, x: torch.Tensor, drop: float) -> torch.Tensor:
        side = x.shape[-1] // self.patch
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self._pos_embed(side)
        if drop > 0:  # one permutation for the whole batch, drawn on the host
            kept = torch.randperm(side * side)[: int(side * side * (1 - drop))] + 1
            x = x[:, torch.cat([torch.zeros(1, dtype=kept.dtype), kept]).to(x.device)]
        for block in self.blocks:
            x = block(x)
        return self.fc(self.norm(x)[:, 0])

    def forward(self, views: list[torch.Tensor], drop: float = 0.0) -> torch.Tensor:
        outputs, start = [], 0
        while start < len(views):  # runs of equal-size views: backbone and head once per run
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            outputs.append(self._features(torch.cat(views[start:end]), drop if start == 0 else 0.0))
            start = end
        return torch.cat(outputs)


def _msn_loss(anchors: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor, *, tau: float, T: float,
              iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE against sharpened, Sinkhorn-balanced targets plus ME-MAX; returns (loss, ce, me_max)."""
    protos = F.normalize(prototypes, dim=1)
    probs = (F.normalize(anchors, dim=1) @ protos.T / tau).softmax(dim=1)
    with torch.no_grad():
        t = (F.normalize(targets, dim=1) @ protos.T / tau).softmax(dim=1) ** (1.0 / T)
        t = t / t.sum(dim=1, keepdim=True)
        q = t.T  # (K, B)
        q = q / q.sum()
        for _ in range(iterations):
            q = q / q.sum(dim=1, keepdim=True) / q.shape[0]
            q = q / q.sum(dim=0, keepdim=True) / q.shape[1]
        t = (q * q.shape[1]).T
    ce = -(t.repeat(len(anchors) // len(targets), 1) * probs.log()).sum(dim=1).mean()
    mean = probs.mean(dim=0)
    me_max = math.log(len(mean)) + (mean * mean.log()).sum()
    return ce + me_max, ce, me_max


class ReferenceMSN:
    """The original's model, optimiser and step on one device (no process group)."""

    def __init__(self, arch: ViTArch, *, patch_size: int, img_size: int, hidden_dim: int, out_dim: int,
                 num_prototypes: int, device: torch.device) -> None:
        """Encoder (ViT + head, to ``out_dim``), its EMA target, (num_prototypes, out_dim) prototypes, AdamW."""
        self.encoder = ReferenceEncoder(arch, patch_size, img_size, hidden_dim, out_dim).to(device).train()
        self.target = copy.deepcopy(self.encoder)
        for p in self.target.parameters():
            p.requires_grad = False
        bound = out_dim**-0.5
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, out_dim, device=device).uniform_(-bound, bound))
        named = list(self.encoder.named_parameters())
        plain = [p for n, p in named if p.ndim > 1 and "bias" not in n and "bn" not in n]
        rest = [p for n, p in named if not (p.ndim > 1 and "bias" not in n and "bn" not in n)]
        self.optimizer = torch.optim.AdamW([{"params": plain}, {"params": rest, "weight_decay": 0.0},
                                            {"params": [self.prototypes], "weight_decay": 0.0}])

    def step(self, views: list[torch.Tensor], *, mask_ratio: float, lr: float, wd: float, momentum: float, T: float,
             tau: float, clip_grad: float, amp_dtype: torch.dtype | None) -> tuple[float, float, float, int]:
        """One step on ``[target, anchor, focal...]``; returns what the original logs (read on the host)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.param_groups[0]["weight_decay"] = wd
        self.optimizer.zero_grad()
        device = views[0].device
        with autocast(device, amp_dtype):
            anchors = self.encoder(views[1:], drop=mask_ratio)
            with torch.no_grad():
                targets = self.target(views[:1])
        loss, ce, me_max = _msn_loss(anchors.float(), targets.float(), self.prototypes, tau=tau, T=T)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), clip_grad)
        self.optimizer.step()
        with torch.no_grad():
            for online, target in zip(self.encoder.parameters(), self.target.parameters(), strict=True):
                target.mul_(momentum).add_((1.0 - momentum) * online)
        with torch.no_grad():
            assignments = F.normalize(targets.float(), dim=1) @ F.normalize(self.prototypes, dim=1).T
        distinct = len(set(assignments.argmax(dim=1).tolist()))
        return loss.item(), ce.item(), me_max.item(), distinct
