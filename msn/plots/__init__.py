"""Pictures of a run (behind msn-viz): the views the trainer makes, attention maps, curves, prototype use.

Each module builds one kind of picture from library calls (the trainer's own data and mask code, the
evaluation's encoder loader), so a picture cannot drift from what training does. Image mosaics are
composed pixel by pixel with numpy and written with PIL (exact sizes, testable pixels); charts use
matplotlib with a fixed figure size.
"""

from __future__ import annotations

import os
from pathlib import Path

from msn.errors import VizError


def check_png_path(out: str | os.PathLike) -> Path:
    """``out`` as a Path when it names a .png file, else a :class:`VizError` saying so."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise VizError(f"--out {out}: msn-viz writes PNG files; give a path ending in .png")
    return path
