"""Evaluation protocols on frozen features: low-shot logistic regression, k-NN, linear probe, fine-tuning."""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from msn.eval.features import Encoder, TransformedImages, eval_transform
from msn.eval.splits import Split
from msn.utils.device import autocast
from msn.utils.rundir import is_hf_export
from msn.utils.seeding import seeded_global_rng
from msn.weights.formats import export_hf, read_source


def centre_and_normalise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Subtract the training mean, then L2-normalise every row (the paper's low-shot preprocessing)."""
    mean = train.mean(axis=0, keepdims=True)
    out = []
    for x in (train, *others):
        x = x - mean
        out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return out


def sample_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` images of every class (fewer if a class has fewer), chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), size=min(k, int((labels == c).sum())), replace=False)
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def sample_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of the images (at least one per class), chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(picks))


def logistic_regression(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                        penalty: float | None) -> float:
    """Test accuracy (%) of multinomial L2 logistic regression; ``penalty`` is sklearn's C.

    ``penalty=None`` picks C by cross-validation on the training shots only (when every class has at
    least two; else C = 1).
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    x_train, x_test = centre_and_normalise(x_train, x_test)
    counts = np.bincount(y_train)[np.unique(y_train)]
    if penalty is None and counts.min() >= 2:
        clf = LogisticRegressionCV(Cs=np.logspace(-2, 3, 6).tolist(), cv=int(min(3, counts.min())), max_iter=1000)
    else:
        clf = LogisticRegression(C=1.0 if penalty is None else penalty, max_iter=1000)
    with warnings.catch_warnings():  # sklearn 1.9 announces a change of LogisticRegressionCV's attributes
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x_train, y_train)
    return 100.0 * float((clf.predict(x_test) == y_test).mean())


def knn_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor, *,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Cosine k-NN with votes weighted by ``exp(similarity / temperature)``; accuracy in %."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    classes = int(max(y_train.max(), y_test.max())) + 1
    correct = 0
    for start in range(0, len(test), 1024):
        sim = test[start:start + 1024] @ train.T  # (b, N)
        top, idx = sim.topk(min(k, train.shape[0]), dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, y_train[idx], (top / temperature).exp())
        correct += int((votes.argmax(dim=1) == y_test[start:start + 1024]).sum())
    return 100.0 * correct / len(test)


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                 epochs: int = 100, lr: float = 1e-3, seed: int = 0) -> float:
    """A linear layer trained with AdamW (full batch) on standardised frozen features; accuracy in %.

    The layer's initial weights are drawn from ``seed`` (the caller's global random stream is left as it was).
    """
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


def finetune(encoder: Encoder, train: Split, test: Split, *, epochs: int, lr: float, batch_size: int,
             seed: int, amp_dtype: torch.dtype | None = None) -> float:
    """Fine-tune ``ViTMSNForImageClassification`` from an ``hf`` export of the encoder; test accuracy in %.

    Runs on the encoder's device, under ``amp_dtype`` autocast when given.
    """
    from transformers import ViTMSNForImageClassification

    with tempfile.TemporaryDirectory() as tmp:
        folder = encoder.path
        if not is_hf_export(folder):
            folder = export_hf(read_source(encoder.path), Path(tmp) / "hf")
        with seeded_global_rng(seed):  # the new classifier head's initial weights
            model = ViTMSNForImageClassification.from_pretrained(folder, num_labels=int(train.labels.max()) + 1)
    device = next(encoder.backbone.parameters()).device
    model.to(device)
    transform = eval_transform(encoder)
    labels = torch.from_numpy(train.labels).to(device)
    loader = DataLoader(TransformedImages(train.images, transform), batch_size=batch_size)
    images = torch.cat(list(loader)).to(device)  # small evaluation sets: keep the preprocessed images in memory
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="finetune", file=sys.stderr, leave=False, disable=None):  # terminal only
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            batch = batch.to(device)
            with autocast(device, amp_dtype):
                loss = model(pixel_values=images[batch], labels=labels[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test_loader = DataLoader(TransformedImages(test.images, transform), batch_size=batch_size)
    with torch.no_grad(), autocast(device, amp_dtype):
        predictions = torch.cat([model(pixel_values=x.to(device)).logits.argmax(1).cpu() for x in test_loader])
    return 100.0 * float((predictions.numpy() == test.labels).mean())


def summarise(accuracies: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "splits": accuracies}
