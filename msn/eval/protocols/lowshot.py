"""``lowshot``: the paper's low-shot evaluation, L2-penalised multinomial logistic regression on centred,
L2-normalised frozen features of k images per class, or of a fraction of the labels, over fixed random splits."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from msn.errors import DataError
from msn.eval.registry import EvalTask, Results, register_protocol


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


def check_shots(shots: Sequence[int], labels: np.ndarray, classes: Sequence[str]) -> None:
    """Refuse more shots than the smallest class has training images (the table would claim them)."""
    counts = {classes[c]: int(n) for c, n in zip(*np.unique(labels, return_counts=True), strict=True)}
    fewest = min(counts, key=counts.get)
    if max(shots) > counts[fewest]:
        raise DataError(f"--shots {max(shots)}: class {fewest} has only {counts[fewest]} training images; use "
                        f"--shots up to {counts[fewest]}")


@register_protocol("lowshot", monitor={"shots": [5], "fraction": 0.0, "penalty": 1.0, "allow_fewer": True})
def lowshot(task: EvalTask, *, shots: Sequence[int] = (1, 2, 5), fraction: float = 0.01,
            penalty: float | None = None, subset_file: str | None = None, allow_fewer: bool = False) -> Results:
    """Low-shot logistic regression: ``shots`` images per class and a ``fraction`` of the labels (0: skipped), or
    exactly the images a ``subset_file`` lists (the original MSN format: a path a line; digits: an index);
    ``penalty`` is sklearn's C (None: cross-validated on the training shots). A class with fewer training images
    than the shots is refused (the table would claim shots it did not use), or with ``allow_fewer`` (the training
    monitor's setting) gives the images it has. Settings: "1", "2", "5", "1%"."""
    from msn.eval.splits import read_subset_file

    train, test = task.train, task.test
    if not subset_file and not allow_fewer:
        check_shots(shots, train.labels, train.classes)
    xtr, xte = task.features(train).numpy(), task.features(test).numpy()

    def run(idx: np.ndarray) -> float:
        return logistic_regression(xtr[idx], train.labels[idx], xte, test.labels, penalty)

    fits = f"{task.splits} logistic regression{'s' if task.splits > 1 else ''}"
    if subset_file:
        idx = read_subset_file(Path(subset_file), train)
        return {Path(subset_file).stem: task.setting(Path(subset_file).stem, f"a logistic regression on the "
                                                     f"{len(idx)} images of {subset_file}", lambda: [run(idx)])}
    results: Results = {
        str(n): task.setting(str(n), f"{fits} on {n} image{'s' if n > 1 else ''} per class",
                             lambda n=n: [run(sample_per_class(train.labels, n, s)) for s in range(task.splits)])
        for n in shots}
    if fraction:
        key = f"{fraction * 100:g}%"
        results[key] = task.setting(key, f"{fits} on {key} of the {len(train.labels)} training labels",
                                    lambda: [run(sample_fraction(train.labels, fraction, s))
                                             for s in range(task.splits)])
        per_class = {max(1, round(fraction * n)) for n in np.unique(train.labels, return_counts=True)[1]}
        if len(per_class) == 1 and (same := per_class.pop()) in shots:
            # e.g. digits: 1 % of ~126 images a class is 1 image, so this row repeats the "1" row
            results[key]["note"] = (f"{key} of the labels is {same} image{'s' if same > 1 else ''} per class here: "
                                    f"the same setting as the '{same}' row")
    return results
