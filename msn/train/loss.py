"""The MSN loss as small pure functions plus a thin module, returning its terms by name.

Notation: ``B`` images per process, ``V`` anchor views per image, ``D`` representation size,
``K`` prototypes. Anchors are stacked **view-major**: rows ``v*B ... v*B+B-1`` are view ``v``.

    p(x)      = softmax( cos(x, prototypes) / tau )                                  (K,)
    t         = sinkhorn( sharpen(p(target), T) )          (no gradient)             (K,)
    ce        = mean over the B*V anchors of  - sum_k t_k log p_k(anchor)
    p_mean    = mean over all anchors of all processes of p(anchor)                  (K,)
    me_max    = KL(p_mean || uniform) = log K - H(p_mean)          (loss.prior=uniform: MSN's ME-MAX)
    prior_kl  = KL(p_mean || rho),  rho_k ∝ k^(-prior_tau)          (loss.prior=power_law: PMSN)
    entropy   = mean over anchors of H(p(anchor))
    loss      = ce + me_max_weight * (me_max or prior_kl) + entropy_weight * entropy
                   + sum over loss.extra_terms of weight * term

:class:`LossOutput` holds each term by name (unweighted) and the diagnostics; the trainer logs whatever it holds
(``metrics.csv``, the console, wandb, ``msn-viz curves``), so a term added here or in ``loss.extra_terms``
(:mod:`msn.train.terms`) is a column without a name written anywhere else. PMSN: Assran et al., "The hidden uniform
cluster prior in self-supervised learning", ICLR 2023.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from msn.config import LossConfig
from msn.config.schema import PRIORS
from msn.errors import ConfigError
from msn.train.terms import LossInputs, WeightedTerm, build_extra_terms
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
    """``log K - H(mean_probs)`` = KL(mean_probs || uniform): 0 for a uniform mean prediction, ``log K`` for a
    one-hot. (K,) -> ()."""
    entropy = -(mean_probs * torch.log(mean_probs)).sum()
    return math.log(mean_probs.numel()) - entropy


def power_law_prior(num_prototypes: int, exponent: float, *, like: torch.Tensor) -> torch.Tensor:
    """PMSN's prior over the prototypes: ``rho_k ∝ k^(-exponent)`` for k = 1..K, normalised; (K,) with ``like``'s
    dtype and device. Exponent 0 is the uniform prior."""
    k = torch.arange(1, num_prototypes + 1, dtype=like.dtype, device=like.device)
    rho = k ** (-exponent)
    return rho / rho.sum()


def prior_kl(mean_probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``KL(mean_probs || prior) = sum_k p_k (log p_k - log rho_k)``: (K,), (K,) -> (). With the uniform prior it
    is :func:`me_max`, which is how PMSN generalises MSN's regulariser."""
    return (mean_probs * (torch.log(mean_probs) - torch.log(prior))).sum()


def mean_entropy(probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``H(p) = -sum_k p_k log p_k``: (N, K) -> ()."""
    return -(probs * log_probs).sum(dim=1).mean()


@dataclass
class LossOutput:
    """What the loss returns: the total, each term by name, and diagnostics (0-d tensors).

    Attributes:
        loss: ``sum_name weights[name] * terms[name]``, what the step differentiates.
        terms: each term's unweighted value (``ce``, ``me_max`` or ``prior_kl``, ``entropy``, the user's terms).
        weights: each term's factor in ``loss``.
        diagnostics: figures without gradient (``distinct_prototypes``: distinct argmax prototypes among the
            targets; ``max_target_prob``: the mean over targets of ``max_k t_k``).
        targets: (B, K) the sharpened (and balanced) targets, no gradient.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: torch.Tensor | None = None


def msn_loss(anchors: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor,
             cfg: LossConfig | DictConfig | None = None, *, T: float | None = None,
             extra_terms: Mapping[str, WeightedTerm] | None = None) -> LossOutput:
    """MSN (or PMSN) loss of view-major anchors against target views (formula in the module docstring).

    Args:
        anchors: (B*V, D) anchor representations, view-major.
        targets: (B, D) target-view representations; detached here (the target gets no gradient).
        prototypes: (K, D) learnable prototypes.
        cfg: the ``loss.*`` settings (:class:`~msn.config.LossConfig`: tau, sharpen_T, sinkhorn,
            sinkhorn_iterations, me_max_weight, entropy_weight, prior, prior_tau); the defaults when None.
        T: the sharpening temperature of this step (a schedule), else ``cfg.sharpen_T``.
        extra_terms: built user terms (:func:`msn.train.terms.build_extra_terms`), added by name.
    """
    cfg = cfg if cfg is not None else LossConfig()
    T = cfg.sharpen_T if T is None else T
    batch = targets.shape[0]
    if anchors.shape[0] % batch:
        raise ValueError(f"anchors ({anchors.shape[0]} rows) is not a multiple of targets ({batch} rows)")
    num_views = anchors.shape[0] // batch

    log_probs = prototype_logits(anchors, prototypes, cfg.tau).log_softmax(dim=1)  # (B*V, K)
    probs = log_probs.exp()
    with torch.no_grad():
        t = sharpen(prototype_probabilities(targets.detach(), prototypes.detach(), cfg.tau), T)
        if cfg.sinkhorn:
            t = sinkhorn(t, cfg.sinkhorn_iterations)

    ce = cross_entropy(t.repeat(num_views, 1), log_probs)  # view-major repeat matches anchor order
    zero = ce.new_zeros(())
    mean_probs = distributed.all_reduce_mean(probs.mean(dim=0)) if cfg.me_max_weight else None
    if cfg.prior == "power_law":
        prior = power_law_prior(probs.shape[1], cfg.prior_tau, like=probs)
        regulariser = ("prior_kl", prior_kl(mean_probs, prior) if mean_probs is not None else zero)
    else:
        regulariser = ("me_max", me_max(mean_probs) if mean_probs is not None else zero)
    terms = {"ce": ce, regulariser[0]: regulariser[1],
             "entropy": mean_entropy(probs, log_probs) if cfg.entropy_weight else zero}
    weights = {"ce": 1.0, regulariser[0]: float(cfg.me_max_weight), "entropy": float(cfg.entropy_weight)}
    if extra_terms:
        inputs = LossInputs(anchors, targets.detach(), prototypes, log_probs, probs, t, float(cfg.tau), float(T))
        for name, term in extra_terms.items():
            terms[name], weights[name] = term.fn(inputs), term.weight
    loss = ce
    for name, value in terms.items():
        if name != "ce":
            loss = loss + weights[name] * value
    with torch.no_grad():
        # Distinct argmax prototypes, counted on the device (``unique()`` would wait for it every step).
        distinct = t.new_zeros(t.shape[1]).index_fill_(0, t.argmax(dim=1), 1.0).sum()
        diagnostics = {"distinct_prototypes": distinct, "max_target_prob": t.max(dim=1).values.mean()}
    return LossOutput(loss, terms, weights, diagnostics, t)


class MSNLoss(nn.Module):
    """The loss of the ``loss.*`` settings, its user terms built once; ``T`` may be given per call (schedules).

    Args:
        cfg: :class:`~msn.config.LossConfig` (or the composed ``loss`` node); the defaults when None. Its
            ``extra_terms`` are built here (:func:`msn.train.terms.build_extra_terms`).
    """

    def __init__(self, cfg: LossConfig | DictConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else LossConfig()
        if self.cfg.prior not in PRIORS:
            raise ConfigError(f"loss.prior={self.cfg.prior!r} is not allowed; choose one of {', '.join(PRIORS)}")
        self.extra_terms = build_extra_terms(getattr(self.cfg, "extra_terms", None))
        clash = set(self.extra_terms) & {*self.term_names[:3], *self.diagnostic_names}
        if clash:
            raise ConfigError(f"loss.extra_terms: {', '.join(sorted(clash))} is a term of the MSN loss itself; name "
                              "yours otherwise")

    @property
    def term_names(self) -> list[str]:
        """The names of the terms :meth:`forward` returns, in order (the metrics columns after ``loss``)."""
        regulariser = "prior_kl" if self.cfg.prior == "power_law" else "me_max"
        return ["ce", regulariser, "entropy", *self.extra_terms]

    @property
    def diagnostic_names(self) -> list[str]:
        """The names of the diagnostics :meth:`forward` returns."""
        return ["distinct_prototypes", "max_target_prob"]

    def forward(self, anchors: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor,
                T: float | None = None) -> LossOutput:
        """:func:`msn_loss` with these settings and terms: (B*V, D), (B, D), (K, D) -> :class:`LossOutput`."""
        return msn_loss(anchors, targets, prototypes, self.cfg, T=T, extra_terms=self.extra_terms)
