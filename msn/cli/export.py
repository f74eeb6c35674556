"""msn-export: hand a pretrained backbone to Hugging Face, timm or the original MSN tools.

    msn-export SOURCE OUT [--format hf|timm|msn] [--encoder target|online] [--overwrite]

SOURCE is a training checkpoint, a run directory (its checkpoints/last.pt) or an original MSN
*.pth.tar. The default encoder is the EMA target, as the paper and the released weights use.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from msn.cli.errors import error_line, fail
from msn.cli.logs import console_logging
from msn.errors import MSNError
from msn.utils.rundir import source_file
from msn.weights.export import check_export_out


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``msn-export``."""
    parser = argparse.ArgumentParser(prog="msn-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="training checkpoint, run directory or original MSN .pth.tar")
    parser.add_argument("out", help="output folder (or .pth.tar file for --format msn)")
    parser.add_argument("--format", choices=("hf", "timm", "msn"), default="hf")
    parser.add_argument("--encoder", choices=("target", "online"), default=None,
                        help="target: the EMA encoder (default, as the paper); online: the trained one "
                             "(hf and timm; the msn format holds both)")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of an existing OUT")
    args = parser.parse_args(argv)
    if args.format == "msn" and args.encoder is not None:
        parser.error("--encoder does not apply to --format msn, which writes both encoders")
    args.encoder = args.encoder or "target"
    console_logging()
    try:
        source_file(args.source)  # a typo, or an OUT that would be refused, is answered before torch is imported
        check_export_out(args.out, args.format, args.overwrite, args.source)
        from msn.weights.export import export_hf, export_msn, export_timm
        from msn.weights.read import read_source

        source = read_source(args.source)
        out = Path(args.out)
        if args.format == "hf":
            written = export_hf(source, out, args.encoder, args.overwrite)
        elif args.format == "timm":
            written = export_timm(source, out, args.encoder, args.overwrite)
        else:
            written = export_msn(source, out, args.overwrite)
    except MSNError as e:
        line = error_line(e)
        return fail("msn-export", line + (_older_checkpoint_hint(args, argv) if "last.pt" in line else ""))
    except OSError as e:  # a full disk, say: atomic writes leave no partial file behind
        return fail("msn-export", f"cannot write to {args.out}: {e.strerror or e}")
    print(f"wrote {args.format} export of the {args.encoder if args.format != 'msn' else 'full'} model to {written}")
    return 0


def _older_checkpoint_hint(args: argparse.Namespace, argv: list[str] | None) -> str:
    """For a run directory whose ``last.pt`` is missing or unreadable: its newest readable checkpoint and the
    command that exports it. Never exported in its place: an older step than the user asked for is their call."""
    run = Path(args.source)
    if not (run / "checkpoints").is_dir():
        return ""
    from msn.weights.checkpoint import newest_checkpoint

    newest = newest_checkpoint(run / "checkpoints")
    if newest is None or newest[0].name == "last.pt":
        return ""
    path, step, _ = newest
    given = list(sys.argv[1:] if argv is None else argv)
    command = ["msn-export", *[str(path) if a == args.source else a for a in given]]
    return f"; its newest readable checkpoint is {path} (step {step}), to export it: {shlex.join(command)}"


if __name__ == "__main__":
    sys.exit(main())
