"""``knn``: cosine k-nearest-neighbour classification of the test split by the whole training split."""

from __future__ import annotations

from typing import TYPE_CHECKING

from msn.eval.registry import EvalTask, Results, register_protocol

if TYPE_CHECKING:
    import torch


def knn_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor, *,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Cosine k-NN with votes weighted by ``exp(similarity / temperature)``; accuracy in %.

    Shapes: (N, D), (N,), (M, D), (M,).
    """
    import torch
    import torch.nn.functional as F

    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    classes = int(max(y_train.max(), y_test.max())) + 1
    correct = 0
    for start in range(0, len(test), 1024):
        sim = test[start:start + 1024] @ train.T  # (b, N)
        top, idx = sim.topk(min(k, train.shape[0]), dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, y_train[idx], (top / temperature).exp())
        correct += int((votes.argmax(dim=1) == y_test[start:start + 1024]).sum())
    return 100.0 * correct / len(test)


@register_protocol("knn", monitor={})
def knn(task: EvalTask, *, k: int = 20, temperature: float = 0.07) -> Results:
    """Cosine k-NN on the full training labels: ``k`` neighbours, votes weighted by exp(similarity /
    ``temperature``). Setting: "100%"."""
    import torch

    y_train, y_test = torch.from_numpy(task.train.labels), torch.from_numpy(task.test.labels)
    x_train, x_test = task.features(task.train), task.features(task.test)
    return {"100%": task.setting("100%", f"{k}-NN of {len(y_test)} test images among {len(y_train)}", lambda: [
        knn_accuracy(x_train, y_train, x_test, y_test, k=k, temperature=temperature)])}
