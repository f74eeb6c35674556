"""MSN projection head and prototypes."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


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
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3,
                 batchnorm: bool = True) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(1, num_layers + 1):
            layers[f"fc{i}"] = nn.Linear(dims[i - 1], dims[i])
            if i < num_layers:
                if batchnorm:
                    layers[f"bn{i}"] = nn.BatchNorm1d(dims[i])
                layers[f"act{i}"] = nn.GELU()
        super().__init__(layers)


def init_prototypes(num_prototypes: int, dim: int) -> nn.Parameter:
    """(K, D) learnable prototypes drawn from U(-1/sqrt(D), 1/sqrt(D)), as in the original."""
    bound = dim**-0.5
    return nn.Parameter(torch.empty(num_prototypes, dim).uniform_(-bound, bound))
