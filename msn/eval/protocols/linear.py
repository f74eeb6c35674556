"""``linear``: a linear probe trained on frozen, standardised features."""

from __future__ import annotations

from typing import TYPE_CHECKING

from msn.eval.registry import EvalTask, Results, register_protocol

if TYPE_CHECKING:
    import torch


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                 epochs: int = 100, lr: float = 1e-3, seed: int = 0) -> float:
    """A linear layer trained with AdamW (full batch) on standardised frozen features; accuracy in %.

    The layer's initial weights are drawn from ``seed`` (the caller's global random stream is left as it was).
    """
    import torch
    import torch.nn.functional as F

    from msn.utils.seeding import seeded_global_rng

    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    classes = int(max(y_train.max(), y_test.max())) + 1
    with seeded_global_rng(seed):
        layer = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        loss = F.cross_entropy(layer(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * float((layer(x_test).argmax(1) == y_test).float().mean())


@register_protocol("linear", monitor={})
def linear(task: EvalTask, *, epochs: int = 100, lr: float = 1e-3) -> Results:
    """A linear probe (AdamW, full batch, ``epochs`` at ``lr``) on the frozen features, one per split (the split's
    seed draws the layer's initial weights). Setting: "100%"."""
    import torch

    y_train, y_test = torch.from_numpy(task.train.labels), torch.from_numpy(task.test.labels)
    x_train, x_test = task.features(task.train), task.features(task.test)
    probes = f"{task.splits} linear probe{'s' if task.splits > 1 else ''}, {epochs} epochs on {len(y_train)} images"
    return {"100%": task.setting("100%", probes, lambda: [
        linear_probe(x_train, y_train, x_test, y_test, epochs=epochs, lr=lr, seed=s) for s in range(task.splits)])}
