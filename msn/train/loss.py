"""The MSN loss as small pure functions plus a thin module.

Notation: ``B`` images per process, ``V`` anchor views per image, ``D`` representation size,
``K`` prototypes. Anchors are stacked **view-major**: rows ``v*B ... v*B+B-1`` are view ``v``.

    p(x)      = softmax( cos(x, prototypes) / tau )                                  (K,)
    t         = sinkhorn( sharpen(p(target), T) )          (no gradient)             (K,)
    CE        = mean over the B*V anchors of  - sum_k t_k log p_k(anchor)
    ME-MAX    = log K - H( mean over all anchors of all processes of p(anchor) )
    entropy   = mean over anchors of H(p(anchor))
    loss      = CE + lambda_me_max * ME-MAX + lambda_ent * entropy
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msn.utils import distributed


def prototype_logits(x: torch.Tensor, prototypes: torch.Tensor, tau: float) -> torch.Tensor:
    """Cosine similarity to every prototype divided by ``tau``: (N, D), (K, D) -> (N, K)."""
    return F.normalize(x, dim=1) @ F.normalize(prototypes, dim=1).T / tau


def prototype_probabilities(x: torch.Tensor, prototypes: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax(cos(x, prototypes) / tau)``: (N, D), (K, D) -> (N, K)."""
    return prototype_logits(x, prototypes, tau).softmax(dim=1)


def sharpen(p: torch.Tensor, T: float) -> torch.Tensor:
    """``p ** (1/T)`` renormalised over the last dim; keeps the argmax for any ``T > 0``."""
    p = p ** (1.0 / T)
    return p / p.sum(dim=-1, keepdim=True)


@torch.no_grad()
def sinkhorn(p: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of an assignment matrix across all processes.

    Alternately rescales so that every prototype receives a total mass of ``1/K`` and every
    sample ``1/B_global`` (``B_global`` = B x world size); the prototype sums are all-reduced so the
    balance holds over the global batch. Returns rows that sum to 1.

    Args:
        p: (B, K) non-negative assignment weights of this process's samples.
        iterations: number of (prototype, sample) normalisation rounds.
    Returns:
        (B, K) balanced assignments.
    """
    q = p.clone()
    num_samples = q.shape[0] * distributed.world_size()
    num_prototypes = q.shape[1]
    q /= distributed.all_reduce_sum_(q.sum())
    for _ in range(iterations):
        q /= distributed.all_reduce_sum_(q.sum(dim=0, keepdim=True))  # per-prototype mass -> 1
        q /= num_prototypes  #                                            -> 1/K
        q /= q.sum(dim=1, keepdim=True)  #                                 per-sample mass -> 1
        q /= num_samples  #                                                -> 1/B_global
    return q * num_samples


def cross_entropy(targets: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_k t_k log p_k``: (N, K), (N, K) -> ()."""
    return -(targets * log_probs).sum(dim=1).mean()


def me_max(mean_probs: torch.Tensor) -> torch.Tensor:
    """``log K - H(mean_probs)``: 0 for a uniform mean prediction, ``log K`` for a one-hot. (K,) -> ()."""
    entropy = -(mean_probs * torch.log(mean_probs)).sum()
    return math.log(mean_probs.numel()) - entropy


def mean_entropy(probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``H(p) = -sum_k p_k log p_k``: (N, K) -> ()."""
    return -(probs * log_probs).sum(dim=1).mean()


@dataclass
class MSNLossOutput:
    """Total loss, its parts and monitoring figures (all 0-d tensors)."""

    loss: torch.Tensor
    ce: torch.Tensor
    me_max: torch.Tensor
    entropy: torch.Tensor
    targets: torch.Tensor  # (B, K) sharpened (and balanced) targets, no gradient
    distinct_prototypes: torch.Tensor  # number of distinct argmax prototypes among the targets
    max_target_prob: torch.Tensor  # mean over targets of max_k t_k


def msn_loss(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    tau: float = 0.1,
    T: float = 0.25,
    use_sinkhorn: bool = True,
    sinkhorn_iterations: int = 3,
    me_max_weight: float = 1.0,
    entropy_weight: float = 0.0,
) -> MSNLossOutput:
    """MSN loss of view-major anchors against target views (formula in the module docstring).

    Args:
        anchors: (B*V, D) anchor representations, view-major.
        targets: (B, D) target-view representations; detached here (the target gets no gradient).
        prototypes: (K, D) learnable prototypes.
        tau: similarity temperature.
        T: sharpening temperature of the targets.
        use_sinkhorn: balance the sharpened targets with Sinkhorn-Knopp over the global batch.
        sinkhorn_iterations: Sinkhorn rounds.
        me_max_weight: weight of the ME-MAX regulariser (0 turns it off).
        entropy_weight: weight of the mean anchor entropy (0 turns it off).
    """
    batch = targets.shape[0]
    if anchors.shape[0] % batch:
        raise ValueError(f"anchors ({anchors.shape[0]} rows) is not a multiple of targets ({batch} rows)")
    num_views = anchors.shape[0] // batch

    log_probs = prototype_logits(anchors, prototypes, tau).log_softmax(dim=1)  # (B*V, K)
    probs = log_probs.exp()
    with torch.no_grad():
        t = sharpen(prototype_probabilities(targets.detach(), prototypes.detach(), tau), T)
        if use_sinkhorn:
            t = sinkhorn(t, sinkhorn_iterations)

    ce = cross_entropy(t.repeat(num_views, 1), log_probs)  # view-major repeat matches anchor order
    zero = ce.new_zeros(())
    reg = me_max(distributed.all_reduce_mean(probs.mean(dim=0))) if me_max_weight else zero
    ent = mean_entropy(probs, log_probs) if entropy_weight else zero
    loss = ce + me_max_weight * reg + entropy_weight * ent
    with torch.no_grad():
        # Distinct argmax prototypes, counted on the device (``unique()`` would wait for it every step).
        distinct = t.new_zeros(t.shape[1]).index_fill_(0, t.argmax(dim=1), 1.0).sum()
        max_prob = t.max(dim=1).values.mean()
    return MSNLossOutput(loss, ce, reg, ent, t, distinct, max_prob)


class MSNLoss(nn.Module):
    """Module wrapper holding the loss hyper-parameters; ``T`` may be given per call (schedules)."""

    def __init__(
        self,
        *,
        tau: float = 0.1,
        T: float = 0.25,
        use_sinkhorn: bool = True,
        sinkhorn_iterations: int = 3,
        me_max_weight: float = 1.0,
        entropy_weight: float = 0.0,
    ) -> None:
        """Hold the keyword arguments of :func:`msn_loss` (``T`` is the default sharpening temperature)."""
        super().__init__()
        self.tau, self.T = tau, T
        self.use_sinkhorn, self.sinkhorn_iterations = use_sinkhorn, sinkhorn_iterations
        self.me_max_weight, self.entropy_weight = me_max_weight, entropy_weight

    def forward(
        self, anchors: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor, T: float | None = None
    ) -> MSNLossOutput:
        return msn_loss(
            anchors,
            targets,
            prototypes,
            tau=self.tau,
            T=self.T if T is None else T,
            use_sinkhorn=self.use_sinkhorn,
            sinkhorn_iterations=self.sinkhorn_iterations,
            me_max_weight=self.me_max_weight,
            entropy_weight=self.entropy_weight,
        )
