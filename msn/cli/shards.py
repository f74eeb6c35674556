"""msn-shards: write WebDataset shards from a folder of images, for data=webdataset.

    msn-shards SRC OUT [--per-shard N] [--shuffle-seed S] [--overwrite]

SRC is a folder of images (ImageFolder layout, SRC/CLASS/IMAGE, or flat), searched recursively. OUT gets
OUT/shard-000000.tar, ... of N samples each: the image's own bytes (JPEG, PNG and WebP as they are, other
formats re-encoded as PNG), and the class index as NNNNNNNNN.cls when the image lies in a class folder
(OUT/classes.txt names them). Prints the data.shards value to train from them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from msn.cli.errors import fail
from msn.cli.logs import console_logging
from msn.errors import DataError, MSNError
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
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    args = parser.parse_args(argv)
    console_logging()
    try:
        check_number("--per-shard", args.per_shard, ">= 1")
        if not Path(args.src).is_dir():
            raise DataError(f"SRC {args.src} is not a folder of images")
        check_writable(args.out, args.out, "give an OUT you can write to")
        from msn.data.shard_writer import write_shards  # webdataset: the arguments passed their checks

        written = write_shards(args.src, args.out, per_shard=args.per_shard, shuffle_seed=args.shuffle_seed,
                               overwrite=args.overwrite)
    except MSNError as e:
        return fail("msn-shards", e)
    except OSError as e:
        return fail("msn-shards", f"cannot write to {args.out}: {e.strerror or e}")
    print(f"wrote {written.samples} images in {len(written.files)} shards to {args.out}; train on them with:")
    print(f"  msn-pretrain data=webdataset {shlex.quote(f'data.shards={chr(34)}{written.pattern}{chr(34)}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
