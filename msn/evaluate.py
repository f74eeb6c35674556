"""msn-eval: measure a backbone the way the paper does, on frozen target-encoder features.

    msn-eval PROTOCOL MODEL [--dataset digits|fashion_mnist|PATH] [--shots 1 2 5] [--fraction 0.01] [--splits 3] ...

Protocols: lowshot (k images per class / a label fraction, L2-penalised multinomial logistic
regression on centred, L2-normalised CLS features of a centre crop, --crop-pct), knn (cosine, k=20,
temperature-weighted votes), linear (a linear probe trained on cached features), finetune
(ViTMSNForImageClassification from an hf export). MODEL is a training checkpoint, a run directory,
an original MSN .pth.tar or a Hugging Face ViTMSN folder; the target encoder is used. The encoder
runs on a GPU when there is one (--device), in bf16 autocast there (--precision).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msn.config import DEFAULT_CROP_PCT, check_crop_pct, safe_name
from msn.errors import CheckpointError, ConfigError, ConversionError, DataError
from msn.loggers import import_wandb
from msn.rundir import check_model, is_hf_export

if TYPE_CHECKING:
    from msn.splits import Split

PROTOCOLS = ("lowshot", "knn", "linear", "finetune")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run one protocol; return the ``results.json`` content. (torch and the rest are imported here, once the
    arguments have passed their checks: ``--help`` and a refused argument answer in about a second.)"""
    import torch

    from msn.device import autocast_dtype, resolve_device
    from msn.features import extract_features, load_encoder
    from msn.protocols import (
        finetune,
        knn_accuracy,
        linear_probe,
        logistic_regression,
        sample_fraction,
        sample_per_class,
        summarise,
    )
    from msn.splits import class_coverage, coverage_warnings, load_splits, read_subset_file

    device = resolve_device(args.device, option="--device")
    precision = ("bf16" if device.type == "cuda" else "fp32") if args.precision == "auto" else args.precision
    amp_dtype = autocast_dtype(precision, device)
    encoder = load_encoder(args.model, device, args.crop_pct)
    train, test = load_splits(args.dataset)
    for line in coverage_warnings(train, test):
        print(f"msn-eval: {line}", file=sys.stderr)
    only_train, only_test = class_coverage(train, test)
    if args.protocol == "lowshot" and not args.subset_file:
        _check_shots(args.shots, train)
    results: dict[str, Any] = {}
    settings: dict[str, Any] = {"splits": args.splits, "feature": args.feature, "last_blocks": args.last_blocks,
                                "crop_pct": args.crop_pct, "device": device.type, "precision": precision}
    if args.protocol == "finetune":
        settings.update(epochs=args.epochs, lr=args.lr)
        accs = [finetune(encoder, train, test, args.epochs, args.lr, args.batch_size, s, amp_dtype)
                for s in range(args.splits)]
        results["100%"] = summarise(accs)
    else:
        cache = None if args.no_cache else Path(args.cache_dir)
        feats = [extract_features(encoder, s, cache, args.feature, args.last_blocks, args.batch_size,
                                  args.num_workers, amp_dtype) for s in (train, test)]
        x_train, x_test = feats
        y_train, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
        if args.protocol == "lowshot":
            settings.update(penalty=args.penalty, shots=args.shots, fraction=args.fraction)
            xtr, xte = x_train.numpy(), x_test.numpy()
            run = lambda idx: logistic_regression(xtr[idx], train.labels[idx], xte, test.labels, args.penalty)  # noqa: E731
            if args.subset_file:
                idx = read_subset_file(Path(args.subset_file), train)
                results[Path(args.subset_file).stem] = summarise([run(idx)])
            else:
                for k in args.shots:
                    results[str(k)] = summarise([run(sample_per_class(train.labels, k, s)) for s in range(args.splits)])
                if args.fraction:
                    key = f"{args.fraction * 100:g}%"
                    results[key] = summarise([run(sample_fraction(train.labels, args.fraction, s))
                                              for s in range(args.splits)])
        elif args.protocol == "knn":
            settings.update(k=args.k, temperature=args.temperature)
            results["100%"] = summarise([knn_accuracy(x_train, y_train, x_test, y_test, args.k, args.temperature)])
        else:
            settings.update(epochs=args.epochs, lr=args.lr)
            results["100%"] = summarise([linear_probe(x_train, y_train, x_test, y_test, args.epochs, args.lr, s)
                                         for s in range(args.splits)])
    return {"protocol": args.protocol, "model": str(args.model), "dataset": args.dataset,
            "train_images": len(train.labels), "test_images": len(test.labels), "settings": settings,
            "classes_without_test_images": only_train, "classes_without_training_images": only_test,
            "results": results}


def default_output(model: Path, protocol: str, dataset: str) -> Path:
    """``eval_PROTOCOL_DATASET.json`` in the model's own folder: the run directory of a checkpoint or run, the
    export folder, or the folder holding an original ``.pth.tar`` (where the sweep summary looks for it)."""
    if model.is_dir():
        folder = model
    elif model.parent.name == "checkpoints":
        folder = model.parent.parent
    else:
        folder = model.parent
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
        lines.append(f"{name:>10}  {r['mean']:6.2f} +- {r['std']:5.2f}  ({len(r['splits'])} splits)")
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
    card.write_text(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msn-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument("model", help="training checkpoint, run directory, original MSN .pth.tar or HF ViTMSN folder")
    p.add_argument("--dataset", default="digits",
                   help="digits; fashion_mnist (its official test split, from Debian's dataset-fashion-mnist package; "
                        "a folder holding the four idx files works too); or a folder with train/ and val/ "
                        "(ImageFolder)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5], help="lowshot: images per class")
    p.add_argument("--fraction", type=float, default=0.01, help="lowshot: label fraction (0 to skip)")
    p.add_argument("--splits", type=int, default=3, help="fixed random splits (seeds 0..n-1)")
    p.add_argument("--subset-file", help="lowshot: train on exactly these images (one path a line; digits: index)")
    p.add_argument("--penalty", type=float, default=None, help="lowshot: sklearn C; default: cross-validated")
    p.add_argument("--feature", choices=("cls", "cls_prenorm"), default="cls",
                   help="CLS after (default) or before the final norm")
    p.add_argument("--last-blocks", type=int, default=1, help="concatenate the CLS of the last n blocks")
    p.add_argument("--crop-pct", type=float, default=DEFAULT_CROP_PCT,
                   help="the centre share of each image the encoder sees: resize to size/crop_pct, crop size "
                        "(default 0.875, the paper's 256 -> 224; 1 keeps the whole image, e.g. for 28-px datasets)")
    p.add_argument("--k", type=int, default=20, help="knn: neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="knn: vote temperature")
    p.add_argument("--epochs", type=int, default=100, help="linear / finetune: epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="linear / finetune: learning rate")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers that decode and preprocess")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the encoder runs (auto: CUDA when present)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "msn" / "features"))
    p.add_argument("--no-cache", action="store_true", help="always recompute features")
    p.add_argument("--output", default=None,
                   help="where the results JSON goes (default: MODEL's run or model folder, "
                        "eval_PROTOCOL_DATASET.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--update-card", action="store_true", help="write the results into an hf export's README.md")
    p.add_argument("--wandb", action="store_true", help="also log the results to wandb (offline)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``msn-eval``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.splits < 1 or args.last_blocks < 1 or args.k < 1 or not 0 <= args.fraction < 1 or any(
            k < 1 for k in args.shots):
        parser.error("--splits, --last-blocks, --k and --shots must be >= 1 and --fraction in [0, 1)")
    try:
        check_crop_pct(args.crop_pct, "--crop-pct")
    except ValueError as e:
        parser.error(str(e))
    if args.update_card and not is_hf_export(args.model):
        parser.error("--update-card needs MODEL to be an hf export folder (msn-export --format hf)")
    try:
        wandb = import_wandb("--wandb") if args.wandb else None  # before the work, not after it
        output = Path(args.output) if args.output else default_output(Path(args.model), args.protocol, args.dataset)
        if output.exists() and not args.overwrite:
            raise CheckpointError(f"{output} exists; pass --overwrite to replace it, or --output PATH")
        check_model(args.model)  # a typo is answered before torch is imported
        report = evaluate(args)
    except (CheckpointError, ConversionError, DataError, ConfigError) as e:
        print(f"msn-eval: error: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    if args.update_card:
        update_model_card(Path(args.model), report)
    if wandb is not None:
        run = wandb.init(project="msn", job_type="eval", mode="offline", config=report["settings"])
        run.log({f"eval/{report['protocol']}/{k}": r["mean"] for k, r in report["results"].items()})
        run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
