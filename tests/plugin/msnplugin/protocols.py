"""An evaluation protocol of the user's own: nearest class mean of the frozen features."""

from __future__ import annotations

import torch

from msn.eval import EvalTask, register_protocol, summarise


@register_protocol("nearest_mean", monitor={"normalise": True})
def nearest_mean(task: EvalTask, *, normalise: bool = True) -> dict:
    """Accuracy (%) of the nearest class mean of the training features, cosine (normalise) or Euclidean."""
    x_train, x_test = task.features(task.train), task.features(task.test)
    if normalise:
        x_train, x_test = (torch.nn.functional.normalize(x, dim=1) for x in (x_train, x_test))
    labels = torch.from_numpy(task.train.labels)
    classes = labels.unique()
    means = torch.stack([x_train[labels == c].mean(dim=0) for c in classes])
    predicted = classes[torch.cdist(x_test, means).argmin(dim=1)]
    accuracy = 100.0 * float((predicted.numpy() == task.test.labels).mean())
    return {"100%": summarise([accuracy])}
