"""A loss term of the user's own: how alike the prototypes are (mean cosine similarity of distinct ones)."""

from __future__ import annotations

import torch

from msn.train.terms import LossInputs


def prototype_similarity(inputs: LossInputs) -> torch.Tensor:
    p = torch.nn.functional.normalize(inputs.prototypes, dim=1)
    k = p.shape[0]
    return ((p @ p.T).sum() - k) / (k * (k - 1))
