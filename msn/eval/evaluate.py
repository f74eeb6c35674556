"""Evaluation of a frozen encoder by one protocol, as ``msn-eval`` runs it (the command adapts its arguments
to :func:`evaluate`'s), with the report's file name, its console table and its section of a model card."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from msn.config import DEFAULT_CROP_PCT
from msn.errors import ConfigError, DataError, MSNError
from msn.utils.files import atomic_write_text
from msn.utils.rundir import run_dir_of, safe_name

if TYPE_CHECKING:
    from msn.eval.splits import Split

PROTOCOLS = ("lowshot", "knn", "linear", "finetune")
T = TypeVar("T")


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def worker_error(error: MSNError) -> MSNError:
    """``error`` as it was raised in a DataLoader worker: torch re-raises a worker's exception as one of the
    same type whose message is the worker's whole traceback; this is a new one holding the first line of the
    original message. Any other error is returned as it is."""
    text = str(error)
    if _WORKER_TRACEBACK not in text:
        return error
    name = re.escape(type(error).__qualname__)
    found = re.findall(rf"^(?:[\w.]+\.)?{name}: (.*)$", text.split(_WORKER_TRACEBACK, 1)[1], re.MULTILINE)
    return type(error)(found[-1] if found else text.splitlines()[0])


def _worker_errors_as_one_line(function: Callable[..., T]) -> Callable[..., T]:
    """``function``, with an :class:`MSNError` from a DataLoader worker re-raised as :func:`worker_error`."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except MSNError as e:
            unwrapped = worker_error(e)
            if unwrapped is e:
                raise
            raise unwrapped from None
    return wrapper


@_worker_errors_as_one_line
def evaluate(protocol: str, model: str | Path, *, dataset: str = "digits", device: str = "auto",
             precision: str = "auto", crop_pct: float = DEFAULT_CROP_PCT, splits: int = 3, feature: str = "cls",
             last_blocks: int = 1, batch_size: int = 128, num_workers: int = 0, cache_dir: Path | None = None,
             shots: Sequence[int] = (1, 2, 5), fraction: float = 0.01, subset_file: str | Path | None = None,
             penalty: float | None = None, k: int = 20, temperature: float = 0.07, epochs: int = 100,
             lr: float = 1e-3) -> dict[str, Any]:
    """Run one protocol (:data:`PROTOCOLS`) on the frozen target encoder of ``model``; return the report that
    ``msn-eval`` writes as JSON: its settings, the images used, and per setting the mean, std and each split's
    top-1 accuracy in %.

    ``protocol``: ``lowshot`` (logistic regression on ``shots`` images per class and a ``fraction`` of the
    labels, or on ``subset_file``'s images; ``penalty`` is sklearn's C, cross-validated when None), ``knn``
    (``k`` neighbours, vote ``temperature``), ``linear`` or ``finetune`` (``epochs`` at ``lr``). Split ``s``
    of ``splits`` draws with seed ``s``. ``cache_dir``: where features are cached (None: recompute).
    torch and the rest are imported here, so that a command's ``--help`` and refused arguments stay fast.
    An :class:`MSNError` raised in a DataLoader worker (an unreadable image) comes out as that error, one line.
    """
    import torch

    from msn.eval.features import extract_features, load_encoder
    from msn.eval.protocols import (
        finetune,
        knn_accuracy,
        linear_probe,
        logistic_regression,
        sample_fraction,
        sample_per_class,
        summarise,
    )
    from msn.eval.splits import class_coverage, coverage_warnings, load_splits, read_subset_file
    from msn.utils.device import autocast_dtype, resolve_device

    torch_device = resolve_device(device, option="--device")
    precision = ("bf16" if torch_device.type == "cuda" else "fp32") if precision == "auto" else precision
    amp_dtype = autocast_dtype(precision, torch_device)
    encoder = load_encoder(model, torch_device, crop_pct)
    depth = len(encoder.backbone.blocks)
    if protocol != "finetune" and last_blocks > depth:
        raise ConfigError(f"--last-blocks {last_blocks}: the encoder has {depth} blocks; use --last-blocks up to "
                          f"{depth}")
    train, test = load_splits(dataset)
    for line in coverage_warnings(train, test):
        print(f"msn-eval: {line}", file=sys.stderr)
    only_train, only_test = class_coverage(train, test)
    if protocol == "lowshot" and not subset_file:
        _check_shots(shots, train)
    results: dict[str, Any] = {}
    settings: dict[str, Any] = {"splits": splits, "feature": feature, "last_blocks": last_blocks,
                                "crop_pct": crop_pct, "device": torch_device.type, "precision": precision}
    if protocol == "finetune":
        settings.update(epochs=epochs, lr=lr)
        accs = [finetune(encoder, train, test, epochs=epochs, lr=lr, batch_size=batch_size, seed=s, amp_dtype=amp_dtype)
                for s in range(splits)]
        results["100%"] = summarise(accs)
    else:
        cache = None if cache_dir is None else Path(cache_dir)
        feats = [extract_features(encoder, s, cache, feature=feature, last_blocks=last_blocks, batch_size=batch_size,
                                  num_workers=num_workers, amp_dtype=amp_dtype) for s in (train, test)]
        x_train, x_test = feats
        y_train, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
        if protocol == "lowshot":
            settings.update(penalty=penalty, shots=list(shots), fraction=fraction)
            xtr, xte = x_train.numpy(), x_test.numpy()
            run = lambda idx: logistic_regression(xtr[idx], train.labels[idx], xte, test.labels, penalty)  # noqa: E731
            if subset_file:
                idx = read_subset_file(Path(subset_file), train)
                results[Path(subset_file).stem] = summarise([run(idx)])
            else:
                for n in shots:
                    results[str(n)] = summarise([run(sample_per_class(train.labels, n, s)) for s in range(splits)])
                if fraction:
                    key = f"{fraction * 100:g}%"
                    results[key] = summarise([run(sample_fraction(train.labels, fraction, s))
                                              for s in range(splits)])
                    per_class = {max(1, round(fraction * n)) for n in np.unique(train.labels, return_counts=True)[1]}
                    if len(per_class) == 1 and (same := per_class.pop()) in shots:
                        # e.g. digits: 1 % of ~126 images a class is 1 image, so this row repeats the "1" row
                        results[key]["note"] = (f"{key} of the labels is {same} image{'s' if same > 1 else ''} per "
                                                f"class here: the same setting as the '{same}' row")
        elif protocol == "knn":
            settings.update(k=k, temperature=temperature)
            results["100%"] = summarise([knn_accuracy(x_train, y_train, x_test, y_test, k=k, temperature=temperature)])
        else:
            settings.update(epochs=epochs, lr=lr)
            results["100%"] = summarise([linear_probe(x_train, y_train, x_test, y_test, epochs=epochs, lr=lr, seed=s)
                                         for s in range(splits)])
    return {"protocol": protocol, "model": str(model), "dataset": dataset,
            "train_images": len(train.labels), "test_images": len(test.labels), "settings": settings,
            "classes_without_test_images": only_train, "classes_without_training_images": only_test,
            "results": results}


def default_output(model: Path, protocol: str, dataset: str) -> Path:
    """``eval_PROTOCOL_DATASET.json`` in the model's own folder: the run directory of a checkpoint or run, the
    export folder, or the folder holding an original ``.pth.tar`` (where the sweep summary looks for it)."""
    folder = run_dir_of(model) or model.parent
    name = dataset if dataset in ("digits", "fashion_mnist") else safe_name(Path(dataset).name or "dataset")
    return folder / f"eval_{protocol}_{name}.json"


def _check_shots(shots: list[int], train: Split) -> None:
    """Refuse more shots than the smallest class has training images (the table would claim them)."""
    counts = {train.classes[c]: int(n) for c, n in zip(*np.unique(train.labels, return_counts=True), strict=True)}
    fewest = min(counts, key=counts.get)
    if max(shots) > counts[fewest]:
        raise DataError(f"--shots {max(shots)}: class {fewest} has only {counts[fewest]} training images; use "
                        f"--shots up to {counts[fewest]}")


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['protocol']} on {report['dataset']} ({report['model']})", f"{'setting':>10}  accuracy (%)"]
    for name, r in report["results"].items():
        note = f"  ({r['note']})" if r.get("note") else ""
        lines.append(f"{name:>10}  {r['mean']:6.2f} +- {r['std']:5.2f}  ({len(r['splits'])} splits){note}")
    return "\n".join(lines)


def update_model_card(folder: Path, report: dict[str, Any]) -> None:
    """Add (or replace) this protocol's results in an ``hf`` export's README.md."""
    card = folder / "README.md"
    text = card.read_text() if card.is_file() else ""
    marker = f"## Evaluation: {report['protocol']} on {report['dataset']}"
    if marker in text:
        start = text.index(marker)
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end + 1:] if end != -1 else "")
    rows = "\n".join(f"| {k} | {r['mean']:.2f} +- {r['std']:.2f} | {len(r['splits'])} |"
                     for k, r in report["results"].items())
    text = text.rstrip() + f"\n\n{marker}\n\n| setting | top-1 (%) | splits |\n|---|---|---|\n{rows}\n"
    atomic_write_text(card, text)
