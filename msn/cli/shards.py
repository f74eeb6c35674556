"""msn-shards: write WebDataset shards from a folder of images, for data=webdataset.

    msn-shards SRC OUT [--per-shard N] [--shuffle-seed S] [--overwrite] [--skip-bad]

SRC is a folder of images (ImageFolder layout, SRC/CLASS/IMAGE, or flat), searched recursively. OUT gets
OUT/shard-000000.tar, ... of N samples each: the image's own bytes (JPEG, PNG and WebP as they are, other
formats re-encoded as PNG), and the class index as NNNNNNNNN.cls when the image lies in a class folder
(OUT/classes.txt names them), and OUT/shards.json, the record of the complete set (counts and fingerprints)
that data=webdataset checks. Prints the data.shards value to train from them.

The set is written beside OUT's earlier one and replaces it only once complete: a refused, failed or
interrupted (SIGTERM, Ctrl-C) write leaves OUT as it was. OUT must be new, empty or hold a set msn-shards
wrote (replaced with --overwrite).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from msn.cli.errors import fail
from msn.cli.logs import console_logging
from msn.errors import DataError, MSNError, WriteStopped
from msn.utils.arguments import check_number, check_writable


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``msn-shards``."""
    parser = argparse.ArgumentParser(prog="msn-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of images (ImageFolder layout or flat)")
    parser.add_argument("out", help="folder for the shards")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--shuffle-seed", type=int, default=None,
                        help="write the images in an order shuffled by this seed (default: sorted by path)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a set msn-shards wrote in OUT (once the new one is complete)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out files that cannot be read as images (listed in OUT/shards.json) instead of "
                             "stopping at the first")
    args = parser.parse_args(argv)
    console_logging()
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        check_number("--per-shard", args.per_shard, ">= 1")
        src = Path(args.src).expanduser()
        if not src.is_dir():
            raise DataError(f"SRC {args.src} {'is not a folder' if src.exists() else 'does not exist'}; give "
                            "msn-shards a folder of images")
        check_writable(args.out, args.out, "give an OUT you can write to")
        from msn.data.shard_writer import write_shards  # torch (msn.data): the arguments passed their checks

        written = write_shards(args.src, args.out, per_shard=args.per_shard, shuffle_seed=args.shuffle_seed,
                               overwrite=args.overwrite, skip_bad=args.skip_bad,
                               stopping=lambda: signal.Signals(received[0]).name if received else None)
    except MSNError as e:
        code = fail("msn-shards", e)
        return 128 + received[0] if received and isinstance(e, WriteStopped) else code
    except OSError as e:
        return fail("msn-shards", f"cannot write to {args.out}: {e.strerror or e}; {args.out} is unchanged")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if written.skipped:
        noun = "file that is not a readable image" if len(written.skipped) == 1 else \
            "files that are not readable images"
        print(f"left out {len(written.skipped)} {noun} ({'; '.join(written.skipped[:3])}"
              f"{'; ...' if len(written.skipped) > 3 else ''}); listed in {args.out}/shards.json")
    print(f"wrote {written.samples} images in {len(written.files)} shards to {args.out} (recorded in "
          f"{args.out}/shards.json); train on them with:")
    print(f"  msn-pretrain data=webdataset {shlex.quote(f'data.shards={chr(34)}{written.pattern}{chr(34)}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
