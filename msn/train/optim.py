"""AdamW with MSN's parameter groups; lr and weight decay are set from the schedules every step."""

from __future__ import annotations

import torch

from msn.config import OptimConfig
from msn.models.msn import MSN


def param_groups(model: MSN) -> list[dict]:
    """Split trainable parameters into a decayed group and an undecayed one.

    Weight decay applies to the weight matrices (and the >1-D cls token / position embedding, as in the
    original); biases, norm / BN parameters (all 1-D) and the prototypes are never decayed.
    """
    decay, no_decay = [], []
    for name, p in model.online.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    no_decay.append(model.prototypes)
    return [
        {"params": decay, "apply_wd": True, "name": "decay"},
        {"params": no_decay, "apply_wd": False, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: MSN, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; lr / wd are placeholders until :func:`set_lr_wd`.

    ``fused=True`` runs the whole update as one kernel per dtype/device (the same arithmetic; used on GPUs).
    """
    return torch.optim.AdamW(param_groups(model), lr=cfg.start_lr, betas=tuple(cfg.betas), weight_decay=0.0,
                             fused=fused or None)


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Set this step's lr on every group and its weight decay on the decayed group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd if group["apply_wd"] else 0.0


@torch.no_grad()
def rescale_adam_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor, factor: float) -> None:
    """Make Adam's moments of ``param`` those of gradients ``factor`` times as large.

    ``exp_avg *= factor`` and ``exp_avg_sq *= factor**2``: the next updates are then the ones a run whose
    gradients had always been on the new scale would take (up to eps). Used when a resume changes the
    number of processes over which the prototypes' gradient is summed.
    """
    state = optimizer.state.get(param, {})
    if "exp_avg" in state:
        state["exp_avg"].mul_(factor)
        state["exp_avg_sq"].mul_(factor**2)
