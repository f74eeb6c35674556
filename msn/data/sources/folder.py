"""``data=folder``: the images under a folder (ImageFolder layout or flat), found by a scan that follows symlinked
folders once, optionally restricted by a list file. Torch-free."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image

from msn.config import DataConfig
from msn.data.images import IMAGE_EXTENSIONS, load_rgb
from msn.data.registry import Source, register_source, require
from msn.errors import DataError


class ImageFolderDataset:
    """Images under ``root``: ImageFolder layout (``root/class/img.jpg``) or flat (``root/img.jpg``).

    Files are found recursively (extensions in :data:`IMAGE_EXTENSIONS`, any case) and sorted by their
    path relative to ``root``; symlinked folders are followed, but each real file counts once
    (:func:`scan_images`). Classes are the sorted top-level folders of ``root`` (as torchvision's
    ImageFolder, so a ``list_file`` subset and the full folder agree on class indices); an image directly
    under ``root`` has label -1 (unlabelled).

    What the scan left out (files that are not images by their extension, symlink loops, duplicate links)
    is in :attr:`notes`, one line each, for the caller to print once: left out silently, a symlink loop
    multiplied a dataset and a folder of GIFs looked like a smaller dataset, and nobody knew.

    Args:
        root: the image folder.
        list_file: optional text file with one image path per line, relative to ``root`` (its first
            whitespace-separated token is used, so ``path label`` lines work; blank lines and lines
            starting with ``#`` are skipped). The dataset then holds exactly the listed images.
        where: how :attr:`notes` name the folder (default ``data.root=ROOT``, the training option).
    """

    decodes_read_bytes = True  # self[index] is decode_rgb(read_bytes(index)): msn.data.images.stored_bytes

    def __init__(self, root: str | os.PathLike | None, list_file: str | os.PathLike | None = None, *,
                 where: str | None = None) -> None:
        self.root = check_data_root(root)
        self.classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        self.notes: list[str] = []  # what the scan skipped, one line each (none for a list_file)
        if list_file:
            relative = _read_list_file(self.root, Path(list_file))
        else:
            scan = scan_images(self.root)
            relative = scan.paths
            self.notes = scan.notes(where or f"data.root={root}")
        self.paths = [self.root / rel for rel in relative]
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.targets = [class_index.get(Path(rel).parts[0], -1) if len(Path(rel).parts) > 1 else -1
                        for rel in relative]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

    def read_bytes(self, index: int) -> bytes:
        """Image ``index``'s file as stored (undecoded): what a decoder elsewhere (``msn-bench data``'s stage
        timing) starts from."""
        return self.paths[index].read_bytes()

    def label(self, index: int) -> int:
        """Class index of image ``index`` (-1 for an image directly under ``root``)."""
        return self.targets[index]


def check_data_root(root: str | os.PathLike | None, *, where: str | None = None,
                    fix: str = "pass data.root=/path/to/images") -> Path:
    """``root`` as a Path when it is an existing folder, else a :class:`DataError` that names it as ``where``
    (default ``data.root=ROOT``) and ends with ``fix``."""
    if root is None or str(root) == "":
        raise DataError(f"{where or 'data.root'} is not set; {fix}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{where or f'data.root={root}'} does not exist; {fix}")
    if not path.is_dir():
        raise DataError(f"{where or f'data.root={root}'} is not a folder; {fix}")
    return path


@dataclass
class FolderScan:
    """What :func:`scan_images` found below a folder, and what it left out and why (examples as text)."""

    paths: list[str] = field(default_factory=list)  # images: POSIX paths relative to the root, sorted
    other_extensions: Counter[str] = field(default_factory=Counter)  # not images by their extension: ext -> count
    loops: list[str] = field(default_factory=list)  # "a/loop -> ..": folder links into their own ancestors
    duplicate_folders: list[str] = field(default_factory=list)  # folders already listed under another path
    duplicate_files: list[str] = field(default_factory=list)  # image paths to a file already listed
    unreadable: list[str] = field(default_factory=list)  # "secret: Permission denied"

    def notes(self, where: str) -> list[str]:
        """One line per kind of thing skipped, each starting with ``where`` (e.g. ``data.root=/x``); none
        when nothing was."""
        notes = []
        links = [_counted(self.loops, "symlink loop"), _counted(self.duplicate_folders, "duplicate folder"),
                 _counted(self.duplicate_files, "duplicate path to a file already listed",
                          "duplicate paths to files already listed")]
        links = [text for text in links if text]
        if links:
            joined = links[0] if len(links) == 1 else f"{', '.join(links[:-1])} and {links[-1]}"
            notes.append(f"{where}: skipped {joined}; each file counts once")
        skipped = sum(self.other_extensions.values())
        if skipped:
            counts = ", ".join(f"{n:,} {ext}" for ext, n in sorted(self.other_extensions.items(),
                                                                    key=lambda item: (-item[1], item[0])))
            noun = "file that is not an image by its" if skipped == 1 else "files that are not images by their"
            images = f"{len(self.paths):,} image{'' if len(self.paths) == 1 else 's'}"
            notes.append(f"{where}: {images}; skipped {skipped:,} {noun} extension ({counts}; images are "
                         f"{' '.join(IMAGE_EXTENSIONS)})")
        if self.unreadable:
            folders = _counted(self.unreadable, "folder that cannot be read", "folders that cannot be read")
            notes.append(f"{where}: skipped {folders}; check their permissions")
        return notes


def _counted(examples: list[str], singular: str, plural: str | None = None) -> str:
    """``"2 symlink loops (a/loop -> .., b/up -> ../..)"``: a count and its first examples ("" for none)."""
    if not examples:
        return ""
    shown = ", ".join(examples[:2]) + (", ..." if len(examples) > 2 else "")
    noun = singular if len(examples) == 1 else (plural or f"{singular}s")
    return f"{len(examples):,} {noun} ({shown})"


def scan_images(root: Path, *, where: str | None = None, fix: str = "pass data.root=/path/to/images"
                ) -> FolderScan:
    """Every image file below ``root`` (by extension, any case), each real file once, sorted by its path.

    Symlinked folders are followed (datasets are often assembled from links), but a folder is entered
    once: a link back into one of its own ancestors (``a/loop -> ..``) is a loop, skipped, and a second
    path to a folder already entered is a duplicate, skipped; a second path to an image already listed
    (a file link) is skipped too. Without this a single ``loop -> ..`` made ``os.walk(followlinks=True)``
    list every image dozens of times over, silently. Entries are visited in the order of their full
    relative paths, so the path kept for a real file is its first in sorted order (apart from paths
    through a loop). Identity is the real path (symlinks resolved), so hard links, which are separate
    files as far as the user can tell, still count separately. Broken links are listed (the loader
    reports them as undecodable, as before). No image at all is a :class:`DataError` that names the folder as
    ``where`` (default ``data.root=ROOT``) and ends with ``fix``.
    """
    scan = FolderScan()
    root_real = os.path.realpath(root)
    folders: dict[str, str] = {root_real: ""}  # real path -> the relative path it is listed under
    files: dict[str, str] = {}  # key of a file's real path (:func:`_real_key`) -> its listed relative path
    # Each frame: (its sorted entries, the folder's real path, the key prefix of its files, its relative path/)
    stack = [(_sorted_entries(root, "", scan), root_real, "", "")]
    if scan.unreadable:
        raise DataError(f"{where or f'data.root={root}'} cannot be read ({scan.unreadable[0]}); check its permissions")
    while stack:
        entries, real, key_prefix, rel = stack[-1]
        item = next(entries, None)
        if item is None:
            stack.pop()
            continue
        entry, is_dir = item
        path = rel + entry.name
        link = entry.is_symlink()
        if is_dir:
            target = os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
            first = folders.get(target)
            if first is None:
                folders[target] = path
                prefix = _real_key(target, root_real) + "/"
                stack.append((_sorted_entries(Path(entry.path), path, scan), target, prefix, path + "/"))
            elif first == "" or path.startswith(first + "/"):  # an ancestor of this very entry
                scan.loops.append(_link_text(entry, path))
            else:
                scan.duplicate_folders.append(f"{_link_text(entry, path)}: already listed as {first}")
            continue
        # A plain file under a folder reached without links has the key ``path`` itself: no new string for
        # the common case (millions of files), and no system call; a link's target is resolved.
        key = _real_key(os.path.realpath(entry.path), root_real) if link else (
            path if key_prefix == rel else key_prefix + entry.name)
        first = files.setdefault(key, path)
        is_image = entry.name.lower().endswith(IMAGE_EXTENSIONS)
        if first is not path:  # identity, not equality: a later path to a file already seen
            if is_image:
                scan.duplicate_files.append(f"{_link_text(entry, path)}: already listed as {first}")
        elif is_image:
            scan.paths.append(path)
        else:
            scan.other_extensions[os.path.splitext(entry.name)[1].lower() or "without extension"] += 1
    scan.paths.sort()  # already in this order (see above); sorting a sorted list costs one pass
    if not scan.paths:
        others = sum(scan.other_extensions.values())
        held = f"; it holds {others:,} other file{'' if others == 1 else 's'}" if others else ""
        raise DataError(f"{where or f'data.root={root}'} holds no images (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}{held}); {fix}")
    return scan


def _sorted_entries(folder: Path, rel: str, scan: FolderScan) -> Iterator[tuple[os.DirEntry, bool]]:
    """The entries of ``folder`` with whether each is a folder (links followed), sorted so that a depth-first
    walk meets the files in the sorted order of their full relative paths: a folder sorts as ``name/``
    (``a.b/x`` < ``a/x`` < ``a0/x``, as the full paths do). An unreadable folder is noted and has none."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as err:
        scan.unreadable.append(f"{rel or '.'}: {err.strerror or err}")
        return iter(())
    keyed = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:  # a link whose target cannot be examined: left to the loader, as a file
            is_dir = False
        keyed.append((entry.name + "/" if is_dir else entry.name, entry, is_dir))
    keyed.sort(key=lambda k: k[0])
    return ((entry, is_dir) for _, entry, is_dir in keyed)


def _real_key(real: str, root_real: str) -> str:
    """A real path as a key: relative to the root's real path when inside it (so that it equals the listed
    path of a file reached without links), else absolute (a leading ``/``: never equal to a relative one)."""
    base = root_real if root_real.endswith(os.sep) else root_real + os.sep  # data.root=/ is "/" already
    return real[len(base):].replace(os.sep, "/") if real.startswith(base) else real


def _link_text(entry: os.DirEntry, path: str) -> str:
    """``a/loop -> ..`` for a symlink (its target as written), ``path`` for anything else."""
    if entry.is_symlink():
        try:
            return f"{path} -> {os.readlink(entry.path)}"
        except OSError:
            pass
    return path


def _read_list_file(root: Path, list_file: Path) -> list[str]:
    """The sorted, de-duplicated image paths that ``list_file`` names; every one must exist under ``root``."""
    if not list_file.is_file():
        raise DataError(f"data.list_file={list_file} does not exist; pass a text file of image paths "
                        "relative to data.root, or data.list_file=null")
    listed: dict[str, int] = {}  # path -> line number, for the error message
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        tokens = line.split()
        if tokens and not tokens[0].startswith("#"):
            listed.setdefault(tokens[0], number)
    if not listed:
        raise DataError(f"data.list_file={list_file} lists no image paths")
    missing = [(number, rel) for rel, number in listed.items() if not (root / rel).is_file()]
    if missing:
        number, rel = missing[0]
        raise DataError(f"data.list_file={list_file} line {number} names {rel}, which does not exist under "
                        f"data.root={root} ({len(missing)} of {len(listed)} listed files are missing)")
    return sorted(listed)


@register_source
class FolderSource(Source):
    """``data=folder``: ``data.root`` (required) and ``data.list_file`` (optional) of :class:`ImageFolderDataset`."""

    name = "folder"
    summary = "a folder of images (ImageFolder layout or flat): data.root=DIR [data.list_file=FILE]"

    def check(self, cfg: DataConfig | DictConfig) -> None:
        check_data_root(require(cfg, "root", "data.root=/path/to/images"))

    def build(self, cfg: DataConfig | DictConfig) -> ImageFolderDataset:
        return ImageFolderDataset(cfg.root, cfg.list_file)

    def where(self, cfg: DataConfig | DictConfig) -> str:
        return str(cfg.root)

    def identity(self, cfg: DataConfig | DictConfig) -> dict[str, str]:
        # the real folder, so that a path given another way (relative, through a link) is the same source
        identity = {"source": str(Path(str(cfg.root)).expanduser().resolve())}
        if cfg.list_file:
            identity["list_file"] = str(cfg.list_file)
        return identity
