"""msn-eval: measure a backbone the way the paper does, on frozen target-encoder features.

    msn-eval PROTOCOL MODEL [--dataset digits|fashion_mnist|PATH] [--shots 1 2 5] [--fraction 0.01] [--splits 3] ...
    msn-eval rankme MODEL [--dataset DIR|digits|fashion_mnist] [--images 1024]

Protocols: lowshot (k images per class / a label fraction, L2-penalised multinomial logistic
regression on centred, L2-normalised CLS features of a centre crop, --crop-pct), knn (cosine, k=20,
temperature-weighted votes), linear (a linear probe trained on cached features), finetune
(ViTMSNForImageClassification holding the encoder), rankme (label-free: the effective rank of the
backbone's and the projection head's embeddings of a fixed sample of --images images, by default of the training
data of the run MODEL belongs to; any folder of images, or a labelled set's training split, with --dataset), and any
protocol a plugin registers (MSN_PLUGINS=module)
or a protocol function's import path (mypkg.protocols.fewshot); --option KEY=VALUE sets a protocol's own
option. MODEL is a training checkpoint, a run directory, an original MSN .pth.tar, a Hugging Face ViTMSN
folder (msn-export's, or any saved ViTMSNModel) or a timm export; the target encoder is used. The encoder runs on
a GPU when there is one (--device), in bf16 autocast there (--precision). --train-subset N uses N training
images (stratified, seed 0) where the whole split's features would take too long.

Progress goes to stdout, a line per stage, also into a file: the encoder, the images, each split's features
(count, time, images/s; every 30 s while they run) and each setting's fits (time, accuracy); then the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from msn.cli.errors import fail
from msn.cli.logs import console_logging
from msn.config import DEFAULT_CROP_PCT, check_crop_pct
from msn.errors import CheckpointError, ConfigError, MSNError
from msn.eval.evaluate import check_train_subset, default_output, evaluate, format_table, update_model_card
from msn.eval.registry import get_protocol, protocol_names
from msn.eval.splits import check_eval_dataset
from msn.train.loggers import import_wandb
from msn.utils.arguments import check_numbers, check_writable
from msn.utils.files import atomic_write_text
from msn.utils.rundir import check_model, is_hf_export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msn-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", metavar="PROTOCOL",
                   help=f"{', '.join([*protocol_names(), RANKME])}, or a protocol function's import path "
                        "(mypkg.module.name)")
    p.add_argument("model", help="training checkpoint, run directory, original MSN .pth.tar, Hugging Face ViTMSN "
                                 "folder (msn-export's) or timm export folder")
    p.add_argument("--dataset", default=None,
                   help="digits (the default); fashion_mnist (its official test split, from Debian's "
                        "dataset-fashion-mnist package; a folder holding the four idx files works too); or a folder "
                        "with train/ and val/ (ImageFolder). rankme: by default the training data of MODEL's run; "
                        "any folder of images")
    p.add_argument("--images", type=int, default=None,
                   help="rankme: the size of its fixed sample of images (default 1024; seed 0)")
    # The protocols' own options default to None here: the protocol's signature holds the default, and an option
    # given to a protocol that does not take it is refused, not ignored.
    p.add_argument("--shots", type=int, nargs="+", default=None, help="lowshot: images per class (default 1 2 5)")
    p.add_argument("--fraction", type=float, default=None, help="lowshot: label fraction (default 0.01; 0 to skip)")
    p.add_argument("--splits", type=int, default=3, help="fixed random splits (seeds 0..n-1)")
    p.add_argument("--subset-file", help="lowshot: train on exactly these images (one path a line; digits: index)")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="use only N images of the training split (stratified by class, seed 0; default: all): "
                        "its features cost minutes on a CPU for e.g. Fashion-MNIST's 60,000")
    p.add_argument("--penalty", type=float, default=None, help="lowshot: sklearn C; default: cross-validated")
    p.add_argument("--feature", choices=("cls", "cls_prenorm"), default="cls",
                   help="CLS after (default) or before the final norm")
    p.add_argument("--last-blocks", type=int, default=1, help="concatenate the CLS of the last n blocks")
    p.add_argument("--crop-pct", type=float, default=DEFAULT_CROP_PCT,
                   help="the centre share of each image the encoder sees: resize to size/crop_pct, crop size "
                        "(default 0.875, the paper's 256 -> 224; 1 keeps the whole image, e.g. for 28-px datasets)")
    p.add_argument("--k", type=int, default=None, help="knn: neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=None, help="knn: vote temperature (default 0.07)")
    p.add_argument("--epochs", type=int, default=None, help="linear / finetune: epochs (default 100)")
    p.add_argument("--lr", type=float, default=None, help="linear / finetune: learning rate (default 1e-3)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the protocol's own (a YAML value: --option normalise=false), repeatable")
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


PROTOCOL_OPTIONS = ("shots", "fraction", "subset_file", "penalty", "k", "temperature", "epochs", "lr")  # their flags


def protocol_options(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol options given on the command line: the built-in protocols' flags that were given, and each
    ``--option KEY=VALUE`` (its value read as YAML: ``3``, ``0.5``, ``[1, 2]``, ``false``, ``text``)."""
    options = {name: getattr(args, name) for name in PROTOCOL_OPTIONS if getattr(args, name) is not None}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item}: give KEY=VALUE, e.g. --option k=10")
        try:
            options[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--option {item}: the value is not readable ({str(e).splitlines()[0]})") from None
    return options


def evaluate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`msn.eval.evaluate.evaluate`'s keyword arguments from msn-eval's parsed arguments."""
    return dict(dataset=args.dataset or "digits", device=args.device, precision=args.precision, crop_pct=args.crop_pct,
                splits=args.splits, feature=args.feature, last_blocks=args.last_blocks, batch_size=args.batch_size,
                num_workers=args.num_workers, cache_dir=None if args.no_cache else Path(args.cache_dir),
                train_subset=args.train_subset, **protocol_options(args))


# Each numeric option and the values it allows (msn.utils.arguments.check_number), checked before any work.
NUMBERS = {"--shots": ">= 1", "--fraction": "[0, 1)", "--splits": ">= 1", "--penalty": "> 0", "--last-blocks": ">= 1",
           "--k": ">= 1", "--temperature": "> 0", "--epochs": ">= 1", "--lr": "> 0", "--batch-size": ">= 1",
           "--num-workers": ">= 0", "--train-subset": ">= 1", "--images": ">= 2"}
RANKME = "rankme"  # label-free (msn.eval.rankme): no labelled protocol's options
LABELLED_ONLY = ("--splits", "--feature", "--last-blocks", "--train-subset", "--subset-file", "--num-workers",
                 "--cache-dir", "--no-cache")  # options that mean nothing to rankme (refused with it, not ignored)


def check_rankme_args(args: argparse.Namespace) -> Path:
    """``msn-eval rankme``: refuse the labelled protocols' options (given, not ignored), a MODEL that names nothing
    and an output that exists; return the results file (``eval_rankme_DATASET.json``, DATASET ``train`` for the
    run's own training data)."""
    given = [name for name in PROTOCOL_OPTIONS if getattr(args, name) is not None] + (["option"] if args.option else [])
    defaults = build_parser().parse_args([args.protocol, args.model])
    names = [flag.lstrip("-").replace("-", "_") for flag in LABELLED_ONLY]
    given += [name for name in names if getattr(args, name) != getattr(defaults, name)]
    if given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise ConfigError(f"msn-eval rankme takes no {flags} (it needs no labels: --dataset, --images, --crop-pct, "
                          "--batch-size, --device, --precision)")
    try:
        check_crop_pct(args.crop_pct, "--crop-pct")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.dataset is not None and args.dataset not in ("digits", "fashion_mnist") \
            and not Path(args.dataset).expanduser().is_dir():
        raise ConfigError(f"--dataset {args.dataset} is not a folder; give a folder of images, digits or fashion_mnist")
    dataset = args.dataset if args.dataset is not None else "train"
    output = Path(args.output) if args.output else default_output(Path(args.model), RANKME, dataset)
    if output.exists() and not args.overwrite:
        raise CheckpointError(f"{output} exists; pass --overwrite to replace it, or --output PATH")
    check_model(args.model)
    check_writable(output.parent, output, "pass --output PATH in a folder you can write to")
    return output


def check_args(args: argparse.Namespace) -> Path:
    """Refuse bad numbers, a protocol that is not known or an option it does not take, an output that exists
    (without --overwrite) or could not be written, and a MODEL that names nothing, before torch is imported;
    returns the results file."""
    check_numbers(args, NUMBERS)
    if args.protocol == RANKME:
        return check_rankme_args(args)
    if args.images is not None:
        raise ConfigError(f"--images is rankme's option; msn-eval {args.protocol} evaluates whole splits")
    args.dataset = args.dataset or "digits"
    get_protocol(args.protocol).resolve(protocol_options(args), f"msn-eval {args.protocol}: the option")
    check_train_subset(args.train_subset, protocol_options(args))
    check_eval_dataset(args.dataset, "--dataset")
    try:
        check_crop_pct(args.crop_pct, "--crop-pct")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    name = get_protocol(args.protocol).name
    output = Path(args.output) if args.output else default_output(Path(args.model), name, args.dataset,
                                                                   args.train_subset)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give the file the results go to, e.g. {output}/results.json")
    if output.exists() and not args.overwrite:
        raise CheckpointError(f"{output} exists; pass --overwrite to replace it, or --output PATH")
    check_model(args.model)  # a typo is answered before torch is imported
    check_writable(output.parent, output, "pass --output PATH in a folder you can write to")
    if not args.no_cache:
        check_writable(args.cache_dir, args.cache_dir, "pass --cache-dir DIR you can write to, or --no-cache")
    if args.update_card:
        card = Path(args.model) / "README.md"
        check_writable(card.parent, card, "leave out --update-card, or make the folder writable")
    return output


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``msn-eval``."""
    try:
        parser = build_parser()  # lists the registered protocols: a plugin that cannot be imported is one line
    except MSNError as e:
        return fail("msn-eval", e)
    args = parser.parse_args(argv)
    if args.update_card and not is_hf_export(args.model):
        parser.error("--update-card needs MODEL to be an hf export folder (msn-export --format hf)")
    console_logging({"msn.eval.evaluate": "msn-eval: ", "msn.eval.rankme": "msn-eval: "})  # stages and warnings
    try:
        output = check_args(args)
        wandb = import_wandb("--wandb") if args.wandb else None  # before the work, not after it
        if args.protocol == RANKME:
            from msn.eval.rankme import DEFAULT_IMAGES, rankme_report

            report = rankme_report(args.model, dataset=args.dataset, images=args.images or DEFAULT_IMAGES,
                                   device=args.device, precision=args.precision, crop_pct=args.crop_pct,
                                   batch_size=args.batch_size)
        else:
            report = evaluate(args.protocol, args.model, **evaluate_kwargs(args))
    except MSNError as e:
        return fail("msn-eval", e)
    print(format_table(report))
    target = output
    try:
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")
        if args.update_card:
            target = Path(args.model) / "README.md"
            update_model_card(Path(args.model), report)
    except OSError as e:  # a full disk, or a folder that turned read-only since the check
        return fail("msn-eval", f"cannot write {target}: {e.strerror or e}; the results are in the table above")
    if wandb is not None:
        run = wandb.init(project="msn", job_type="eval", mode="offline", config=report["settings"])
        run.log({f"eval/{report['protocol']}/{k}": r["mean"] for k, r in report["results"].items()})
        run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
