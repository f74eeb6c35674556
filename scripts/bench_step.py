"""Time full MSN training steps on random views: the same as ``msn-bench step`` (kept for older notes).

    python scripts/bench_step.py experiment=msn_vits16 data.batch_size=8 --steps 5
"""

import sys

from msn.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["step", *sys.argv[1:]]))
