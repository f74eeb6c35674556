"""MSN projection head and prototypes."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from msn.utils import distributed


class ProjectionHead(nn.Sequential):
    """``num_layers`` linear layers; every one but the last is followed by BatchNorm and GELU.

    MSN: Linear(D->2048) -> BN -> GELU -> Linear(2048->2048) -> BN -> GELU -> Linear(2048->256).
    Submodules are named ``fc1, bn1, act1, ..., fcL`` like the original code's ``fc.*`` keys.

    Args:
        in_dim: backbone width D.
        hidden_dim: width of the hidden layers.
        out_dim: representation size compared with the prototypes.
        num_layers: linear layers (>= 1).
        batchnorm: put BatchNorm1d after the hidden linear layers.
        sync_batchnorm: in a multi-process run, normalise with the statistics of the global batch
            (:class:`GlobalBatchNorm1d`); in one process this is plain BatchNorm1d either way.
        weight_init: ``msn``: linear weights from truncated N(0, 0.02) and zero biases, as the original
            code initialises its head; ``timm``: PyTorch's default Linear initialisation.
    """

    def __init__(self, in_dim: int, *, hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3,
                 batchnorm: bool = True, sync_batchnorm: bool = True, weight_init: str = "msn") -> None:
        """(B, in_dim) -> (B, out_dim) through ``num_layers`` linear layers (arguments in the class docstring)."""
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(1, num_layers + 1):
            layers[f"fc{i}"] = nn.Linear(dims[i - 1], dims[i])
            if i < num_layers:
                if batchnorm:
                    layers[f"bn{i}"] = GlobalBatchNorm1d(dims[i]) if sync_batchnorm else nn.BatchNorm1d(dims[i])
                layers[f"act{i}"] = nn.GELU()
        super().__init__(layers)
        if weight_init == "msn":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span every process's batch (SyncBatchNorm for any backend).

    ``torch.nn.SyncBatchNorm`` runs on CUDA only; this runs on gloo (CPU) and NCCL alike. Its cost
    is two all-reduces of ~C numbers forward and two backward per layer (scripts/bench_sync_bn.py).
    With the global count ``n = sum_r B_r``:

        mean = sum_r sum_i x_ri / n,   var = sum_r sum_i (x_ri - mean)^2 / n,
        y = (x - mean) / sqrt(var + eps) * weight + bias

    Both sums go through a differentiable all-reduce, so gradients flow through the global
    statistics exactly as one process holding the whole batch would compute them. Running stats
    use the unbiased ``var * n / (n - 1)``. Keys and buffers are BatchNorm1d's, so checkpoints match.
    In eval mode, or in a single process, this is BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B, C)."""
        if not (self.training and distributed.is_dist()):
            return super().forward(x)
        given = x.dtype  # bf16 under autocast (and bf16 weights under strategy=fsdp): the statistics are kept in fp32
        wide = torch.promote_types(given, torch.float32)
        x = x.to(wide)
        count = x.new_tensor([float(x.shape[0])])
        totals = distributed.all_reduce_sum(torch.cat([x.sum(dim=0), count]))  # (C + 1,)
        n = totals[-1].detach()
        mean = totals[:-1] / n
        var = distributed.all_reduce_sum(((x - mean) ** 2).sum(dim=0)) / n  # two passes: no cancellation
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * n / (n - 1).clamp(min=1.0)).to(self.running_var.dtype), m)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        y = y * self.weight.to(wide) + self.bias.to(wide) if self.affine else y
        return y.to(given)


def init_prototypes(num_prototypes: int, dim: int) -> nn.Parameter:
    """(K, D) learnable prototypes drawn from U(-1/sqrt(D), 1/sqrt(D)), as in the original."""
    bound = dim**-0.5
    return nn.Parameter(torch.empty(num_prototypes, dim).uniform_(-bound, bound))
