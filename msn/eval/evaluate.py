"""Evaluation of a frozen encoder by one registered protocol (:mod:`msn.eval.registry`), as ``msn-eval`` runs it
(the command adapts its arguments to :func:`evaluate`'s), with the report's file name, its console table and its
section of a model card."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from msn.config import DEFAULT_CROP_PCT
from msn.errors import ConfigError, MSNError
from msn.utils.files import atomic_write_text
from msn.utils.rundir import run_dir_of, safe_name

if TYPE_CHECKING:
    from msn.eval.splits import Split

T = TypeVar("T")
log = logging.getLogger(__name__)


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
             train_subset: int | None = None, **options: Any) -> dict[str, Any]:
    """Run one protocol on the frozen target encoder of ``model``; return the report that ``msn-eval`` writes as
    JSON: its settings, the images used, and per setting the mean, std and each split's top-1 accuracy in %.

    ``protocol``: a registered name (:func:`msn.eval.registry.protocol_names`: ``lowshot``, ``knn``, ``linear``,
    ``finetune``, plugins) or the import path of a protocol function; ``options``: its own options (``shots=``,
    ``k=``, ...; one it does not take is a :class:`ConfigError`). ``model``: anything :func:`msn.load_backbone`
    reads. Repetition ``s`` of ``splits`` draws with seed ``s``. ``cache_dir``: where features are cached (None:
    recompute). ``train_subset``: use only that many training images, stratified, drawn with seed 0
    (:func:`msn.eval.splits.subsample_split`; None: all). torch and the rest are imported here, so that a command's
    ``--help`` and refused arguments stay fast. An :class:`MSNError` raised in a DataLoader worker (an unreadable
    image) comes out as that error, one line.

    Each stage is logged at INFO on ``msn.eval.evaluate`` (``msn-eval`` prints it on stdout): the encoder, the
    images, each split's features (count, time, rate) and each setting's fits (time, accuracy).
    """
    check_train_subset(train_subset, options)
    from msn.eval.features import extract_features, load_encoder
    from msn.eval.registry import EvalTask, get_protocol
    from msn.eval.splits import class_coverage, coverage_warnings, load_splits, subsample_split
    from msn.utils.device import autocast_dtype, resolve_device

    chosen = get_protocol(protocol)
    chosen_options = chosen.resolve(options)
    torch_device = resolve_device(device, option="--device")
    precision = ("bf16" if torch_device.type == "cuda" else "fp32") if precision == "auto" else precision
    amp_dtype = autocast_dtype(precision, torch_device)
    encoder = load_encoder(model, torch_device, crop_pct)
    depth = len(encoder.backbone.blocks)
    if last_blocks > depth:
        raise ConfigError(f"--last-blocks {last_blocks}: the encoder has {depth} blocks; use --last-blocks up to "
                          f"{depth}")
    log.info(f"encoder: {model} ({encoder.backbone.arch}, {depth} blocks, {encoder.image_size} px) on "
             f"{torch_device.type} in {precision}")
    train, test = load_splits(dataset)
    available = len(train.labels)
    if train_subset is not None:
        train = subsample_split(train, train_subset)
    used = f"{len(train.labels)} of the {available}" if train_subset is not None else f"{available}"
    log.info(f"{dataset}: {used} training images, {len(test.labels)} test images, {len(train.classes)} classes")
    for line in coverage_warnings(train, test):
        log.warning(line)
    only_train, only_test = class_coverage(train, test)
    cache = None if cache_dir is None else Path(cache_dir)

    def extract(split: Split):  # -> (N, D) torch.Tensor
        role = "train" if split is train else "test" if split is test else split.ident
        return extract_features(encoder, split, cache, feature=feature, last_blocks=last_blocks,
                                batch_size=batch_size, num_workers=num_workers, amp_dtype=amp_dtype,
                                progress=log.info, name=f"the {role} split")

    task = EvalTask(encoder, train, test, splits=splits, amp_dtype=amp_dtype, batch_size=batch_size, extract=extract,
                    progress=log.info)
    results = chosen.run(task, chosen_options)
    settings: dict[str, Any] = {"splits": splits, "feature": feature, "last_blocks": last_blocks,
                                "crop_pct": crop_pct, "device": torch_device.type, "precision": precision,
                                "train_subset": train_subset,
                                **{k: list(v) if isinstance(v, tuple) else v for k, v in chosen_options.items()}}
    return {"protocol": chosen.name, "model": str(model), "dataset": dataset,
            "train_images": len(train.labels), "test_images": len(test.labels), "settings": settings,
            "classes_without_test_images": only_train, "classes_without_training_images": only_test,
            "results": results}


def check_train_subset(train_subset: int | None, options: dict[str, Any]) -> None:
    """Refuse ``train_subset`` (``--train-subset``) below 1, or given with a ``subset_file`` (both would choose the
    training images); whether it fits the split is checked when the split is loaded."""
    if train_subset is None:
        return
    if isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1:
        raise ConfigError(f"--train-subset {train_subset} must be a whole number >= 1 (training images to use)")
    if options.get("subset_file"):
        raise ConfigError("--train-subset and --subset-file both choose the training images; give one of them")


def default_output(model: Path, protocol: str, dataset: str, train_subset: int | None = None) -> Path:
    """``eval_PROTOCOL_DATASET.json`` in the model's own folder: the run directory of a checkpoint or run, the
    export folder, or the folder holding an original ``.pth.tar`` (where the sweep summary looks for it); a
    ``train_subset`` run gets ``eval_PROTOCOL_DATASET-subsetN.json``, so it never replaces the full split's."""
    folder = run_dir_of(model) or model.parent
    name = dataset if dataset in ("digits", "fashion_mnist") else safe_name(Path(dataset).name or "dataset")
    return folder / f"eval_{protocol}_{name}{f'-subset{train_subset}' if train_subset else ''}.json"


def format_table(report: dict[str, Any]) -> str:
    """The console's table of a report: each setting's mean +- std over its splits (rankme: each embedding's
    effective rank, out of at most min(images, width))."""
    if report["protocol"] == "rankme":
        images = report["settings"]["images"]
        lines = [f"rankme on {report['dataset']}, {images} images ({report['model']})",
                 f"{'embedding':>16}  effective rank (of at most)"]
        lines += [f"{name:>16}  {r['mean']:8.2f}  ({min(images, r['dims'])})" for name, r in report["results"].items()]
        return "\n".join(lines)
    lines = [f"{report['protocol']} on {report['dataset']} ({report['model']})", f"{'setting':>10}  accuracy (%)"]
    for name, r in report["results"].items():
        note = f"  ({r['note']})" if r.get("note") else ""
        lines.append(f"{name:>10}  {r['mean']:6.2f} +- {r['std']:5.2f}  ({len(r['splits'])} splits){note}")
    return "\n".join(lines)


def update_model_card(folder: Path, report: dict[str, Any]) -> None:
    """Add (or replace) this protocol's results in an ``hf`` export's README.md."""
    card = folder / "README.md"
    text = card.read_text() if card.is_file() else ""
    subset = (report.get("settings") or {}).get("train_subset")
    marker = f"## Evaluation: {report['protocol']} on {report['dataset']}" + (
        f" (a stratified subset of {subset} training images)" if subset else "")
    if f"{marker}\n" in text:  # the whole heading line: a subset's heading starts like the full split's
        start = text.index(f"{marker}\n")
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end + 1:] if end != -1 else "")
    rows = "\n".join(f"| {k} | {r['mean']:.2f} +- {r['std']:.2f} | {len(r['splits'])} |"
                     for k, r in report["results"].items())
    text = text.rstrip() + f"\n\n{marker}\n\n| setting | top-1 (%) | splits |\n|---|---|---|\n{rows}\n"
    atomic_write_text(card, text)
