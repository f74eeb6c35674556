"""msn-viz: pictures of what a run feeds its model and what the model learns.

    msn-viz views RUN_DIR | OVERRIDES...   --out FILE.png [--step N] [--count N] [--cell PX]
    msn-viz attention MODEL                --out FILE.png [--images FILE ...] [--dataset D] [--count N] [--cell PX]
                                           [--crop-pct F]
    msn-viz curves RUN_DIR|SWEEP_DIR ...   --out FILE.png [--size W H]
    msn-viz prototypes RUN_OR_CHECKPOINT   --out FILE.png [--dataset D] [--limit N] [--show N] [--per-prototype N]
                                           [--crop-pct F]

views: the target, anchor (dropped patches grey, as the legend under the grid says) and focal views of the
  first --count images of the batch the trainer draws at --step, made by the trainer's own data and mask code,
  for a run directory (its config.yaml) or a config given as msn-pretrain overrides (e.g. experiment=cpu_smoke).
attention: the last block's CLS-to-patch attention of the target encoder, averaged and per head, over the
  images (files given with --images, else the first --count test images of --dataset), under a title that
  names the block and beside a colour bar. MODEL: a run directory, a training checkpoint, an original MSN
  .pth.tar, a Hugging Face ViTMSN or a timm export.
curves: every column of metrics.csv against the step, a panel each: the loss and each of its terms (ce,
  me_max, entropy, terms of your own), lr, wd, momentum, distinct prototypes, images/s, monitor accuracy, the
  encoder's gradient norm, ...; a sweep directory overlays its runs, labelled by their overrides.
prototypes: how many images of --dataset each prototype is the target's argmax for (sorted; the share
  never used), and the images nearest to the most used prototypes. Needs the prototypes: a run directory
  or training checkpoint, not an export. --dataset defaults to the run's own digits or fashion_mnist; a run
  trained on data=folder (or any other data) needs --dataset.
D is digits, fashion_mnist, or a folder as for msn-eval --dataset; --crop-pct F is msn-eval's evaluation
crop (default 0.875; 1 shows the encoder the whole image).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from msn.cli.errors import fail
from msn.cli.logs import console_logging
from msn.config import DEFAULT_CROP_PCT, check_crop_pct
from msn.errors import MSNError, VizError
from msn.plots import check_png_path
from msn.utils.arguments import check_numbers, check_writable
from msn.utils.rundir import TIMM_CONFIG, check_model, is_hf_export

KINDS = ("views", "attention", "curves", "prototypes")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msn-viz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    views = kinds.add_parser("views", help="the trainer's crops and masks at a step",
                             description="The trainer's views and anchor masks at --step (process 0).")
    views.add_argument("source", nargs="+", metavar="SOURCE", help="a run directory, or msn-pretrain overrides")
    views.add_argument("--step", type=int, default=0, help="training step (default 0)")
    views.add_argument("--count", type=int, default=4, help="images of the batch, one row each (default 4)")
    views.add_argument("--cell", type=int, default=None,
                       help="px per view (default: the smallest multiple of data.global_size >= 96)")
    attention = kinds.add_parser("attention", help="the target encoder's CLS attention, per head and averaged",
                                 description="The last block's CLS-to-patch attention of the target encoder.")
    attention.add_argument("source", metavar="MODEL", help="run directory, checkpoint, .pth.tar or hf export")
    attention.add_argument("--images", nargs="+", default=[], help="image files (default: --dataset's test images)")
    attention.add_argument("--dataset", default="digits", help="digits, fashion_mnist or a folder (default digits)")
    attention.add_argument("--count", type=int, default=4, help="images from --dataset (default 4)")
    attention.add_argument("--cell", type=int, default=96, help="px per picture (default 96)")
    curves = kinds.add_parser("curves", help="metrics.csv against the step, runs overlaid",
                              description="A run's (or a sweep's runs') logged metrics against the step.")
    curves.add_argument("source", nargs="+", metavar="RUN", help="run directories and/or sweep directories")
    curves.add_argument("--size", type=int, nargs=2, default=[1500, 1000], metavar=("W", "H"),
                        help="picture size in px (default 1500 1000)")
    protos = kinds.add_parser("prototypes", help="prototype use over a dataset, and their nearest images",
                              description="Prototype use over --dataset and the nearest images of the most used.")
    protos.add_argument("source", metavar="RUN", help="run directory or training checkpoint")
    protos.add_argument("--dataset", default=None,
                        help="digits, fashion_mnist or a folder (default: the run's own, when digits or fashion_mnist)")
    protos.add_argument("--limit", type=int, default=2000, help="training-split images assigned (default 2000)")
    protos.add_argument("--show", type=int, default=4, help="prototypes whose nearest images are shown (default 4)")
    protos.add_argument("--per-prototype", type=int, default=6, help="images per shown prototype (default 6)")
    protos.add_argument("--size", type=int, nargs=2, default=[1400, 700], metavar=("W", "H"),
                        help="picture size in px (default 1400 700)")
    for sub in (attention, protos):
        sub.add_argument("--crop-pct", type=float, default=DEFAULT_CROP_PCT,
                         help="the centre share of each image the encoder sees, as msn-eval's (default 0.875; "
                              "1: the whole image)")
    for sub in (views, attention, curves, protos):
        sub.add_argument("--out", required=True, help="the PNG file to write")
    return parser


def _views(args: argparse.Namespace):
    from msn.config import load_run_config
    from msn.plots.views import default_cell, views_figure
    from msn.train.views import trainer_views, world_size_of
    from msn.utils.compose import compose_config

    first = Path(args.source[0])
    if first.is_dir():
        if len(args.source) > 1:
            raise VizError(f"views: give a run directory or overrides, not both ({' '.join(args.source[1:])})")
        cfg, world = load_run_config(first), world_size_of(first)
    elif "=" in args.source[0]:
        from msn.train.builder import local_process
        from msn.train.fitting import fit_composed

        cfg, world = compose_config(args.source, run_dir="."), 1
        fit_composed(cfg, local_process(cfg))  # the views a run of these overrides would train on
    else:
        raise VizError(f"views: {first} is neither a run directory nor an override (key=value)")
    tv = trainer_views(cfg, args.step, args.count, world)
    cell = args.cell or default_cell(cfg.data.global_size)
    return views_figure(tv.views, tv.dropped, mean=list(cfg.data.mean), std=list(cfg.data.std), cell=cell)


def _attention(args: argparse.Namespace):
    from msn.eval.features import load_encoder
    from msn.eval.splits import load_splits
    from msn.plots.attention import attention_figure, cls_attention, load_images

    encoder = load_encoder(args.source, crop_pct=args.crop_pct)
    if args.images:
        missing = [p for p in args.images if not Path(p).is_file()]
        if missing:
            raise VizError(f"--images: {missing[0]} does not exist")
        images = load_images(encoder, [Path(p) for p in args.images])
    else:
        _, test = load_splits(args.dataset)
        images = load_images(encoder, dataset_images=[test.images[i] for i in range(min(args.count, len(test.labels)))])
    blocks = len(encoder.backbone.blocks)
    export = is_hf_export(args.source) or (Path(args.source) / TIMM_CONFIG).is_file()  # holds one encoder
    return attention_figure(images, cls_attention(encoder.backbone, images), encoder.mean, encoder.std, args.cell,
                            block=blocks, blocks=blocks, encoder="exported encoder" if export else "target encoder")


def _curves(args: argparse.Namespace):
    from msn.plots.curves import curves_figure, find_runs

    for source in args.source:
        if not Path(source).is_dir():
            raise VizError(f"{source} is not a folder; give run directories or sweep directories")
    return curves_figure(find_runs([Path(s) for s in args.source]), *args.size)


def _prototypes(args: argparse.Namespace):
    import numpy as np
    from torch.utils.data import Subset

    from msn.eval.splits import load_splits
    from msn.plots.prototypes import load_model, prototype_use, prototypes_figure

    model, encoder, trained_on = load_model(Path(args.source), args.crop_pct)
    dataset = args.dataset
    if dataset is None:
        dataset = trained_on
        if dataset not in ("digits", "fashion_mnist"):  # e.g. data=folder: unlabelled images, no split to assign
            trained = f"data={dataset}" if dataset else "data that its checkpoint does not name"
            raise VizError(f"prototypes needs --dataset for a run trained on {trained}: pass --dataset digits, "
                           "fashion_mnist or a folder with train/ and val/ class folders (ImageFolder layout)")
    train, _ = load_splits(dataset)
    n = len(train.labels)
    chosen = np.unique(np.linspace(0, n - 1, min(args.limit, n)).round().astype(int))  # spread over the split
    images = Subset(train.images, chosen.tolist())
    use = prototype_use(model, encoder, images)
    return prototypes_figure(use, images, encoder, show=args.show, per_prototype=args.per_prototype,
                             width=args.size[0], height=args.size[1])


KIND_FUNCTIONS = {"views": _views, "attention": _attention, "curves": _curves, "prototypes": _prototypes}


# Each numeric option and the values it allows (msn.utils.arguments.check_number); --crop-pct as msn-eval's.
NUMBERS = {"--step": ">= 0", "--count": ">= 1", "--limit": ">= 1", "--show": ">= 1", "--per-prototype": ">= 1",
           "--cell": ">= 8", "--size": ">= 100"}


def _check(args: argparse.Namespace) -> None:
    """Refuse bad numbers, a non-PNG or unwritable output and a MODEL that names nothing, before any work."""
    check_png_path(args.out)
    check_numbers(args, NUMBERS)
    if hasattr(args, "crop_pct"):
        try:
            check_crop_pct(args.crop_pct, "--crop-pct")
        except ValueError as e:
            raise VizError(str(e)) from None
    check_writable(Path(args.out).parent, args.out, "pass --out FILE.png in a folder you can write to")
    if args.kind in ("attention", "prototypes"):
        check_model(args.source)  # a typo is answered before torch is imported


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``msn-viz``."""
    args = _parser().parse_args(argv)
    console_logging()
    try:
        _check(args)
        picture = KIND_FUNCTIONS[args.kind](args)
        from msn.plots.common import save_png

        try:
            path = save_png(picture, args.out)
        except OSError as e:  # a full disk, or a folder that turned read-only since the check
            raise VizError(f"cannot write {args.out}: {e.strerror or e}; pass --out FILE.png in a folder you can "
                           "write to") from None
    except (MSNError, HydraException, OmegaConfBaseException) as e:  # bad input, or an override Hydra cannot compose
        return fail("msn-viz", e)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
