"""``data=custom``: train on a dataset class of your own, named in the config as Hydra names user code.

``data.dataset`` is a ``_target_`` node: the import path of a map-style dataset class (or a function returning
one) and its keyword arguments. Its items are PIL images, or tuples whose first element is one (``(image,
label)``, as torchvision's datasets return them); labels are ignored. Everything a built-in source gets applies:
multi-crop views, exact resume, the processes' disjoint shares, ``msn-bench data --source custom``, and items
that cannot be read (an ``OSError``, ``ValueError`` or :class:`~msn.errors.DataError` from ``__getitem__``) are
replaced and counted like undecodable files. For example, with ``mypkg/plankton.py``::

    class Plankton:
        def __init__(self, root: str) -> None:
            self.files = sorted(Path(root).glob("*.png"))
        def __len__(self) -> int:
            return len(self.files)
        def __getitem__(self, i: int) -> Image.Image:
            return Image.open(self.files[i]).convert("RGB")

``msn-pretrain data=custom 'data.dataset={_target_:mypkg.plankton.Plankton,root:/data/plankton}'``. Torch-free
(the dataset's own module is imported when the source is checked).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from msn.config import DataConfig
from msn.data.images import to_8bit
from msn.data.registry import Source, register_source
from msn.errors import ConfigError, DataError
from msn.utils.registry import import_object

_ITEM_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what reading a bad file raises
_EXAMPLE = "'data.dataset={_target_:mypkg.module.MyDataset,root:/data/images}'"


def _node(cfg: DataConfig | DictConfig) -> dict[str, Any]:
    """``data.dataset`` as a plain dict with a ``_target_``, or a :class:`ConfigError` naming the fix."""
    node = cfg.dataset
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or not node.get("_target_"):
        raise ConfigError(f"data=custom needs data.dataset._target_, the import path of your dataset class; pass "
                          f"{_EXAMPLE} (its other keys are the class's keyword arguments)")
    return node


class CustomImages:
    """A user's map-style dataset as a base dataset: each item's image (a tuple's first element) as PIL RGB.

    Args:
        dataset: the user's dataset (``len()``, ``dataset[i]``).
        target: its ``_target_``, for messages.
    """

    def __init__(self, dataset: Any, target: str) -> None:
        self.dataset, self.target = dataset, target

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, index: int) -> str:
        """What messages call item ``index``: the dataset's own name for it, its file (torchvision's ``samples``),
        or ``TARGET item N``."""
        own = getattr(self.dataset, "name", None)
        if callable(own):
            return str(own(index))
        samples = getattr(self.dataset, "samples", None)  # torchvision's ImageFolder: [(path, class), ...]
        if isinstance(samples, list) and index < len(samples) and isinstance(samples[index], tuple):
            return str(samples[index][0])
        return f"{self.target} item {index}"

    def __getitem__(self, index: int) -> Image.Image:
        try:
            item = self.dataset[index]
        except DataError:
            raise
        except _ITEM_ERRORS as e:
            raise DataError(f"cannot read {self.name(index)}: {type(e).__name__}: {e}") from e
        image = image_of(item)
        if image is None:
            raise DataError(f"{self.name(index)} is {_kind(item)}; {_WANTED}")
        return to_8bit(image).convert("RGB")


_WANTED = ("msn needs a PIL image (or a tuple whose first element is one) from __getitem__; return "
           "PIL.Image.fromarray(array) for an array")


def image_of(item: Any) -> Image.Image | None:
    """The PIL image an item holds (itself, or a tuple's first element), or None when it holds none."""
    image = item[0] if isinstance(item, (tuple, list)) and item else item
    return image if isinstance(image, Image.Image) else None


def _kind(item: Any) -> str:
    inner = f" of {type(item[0]).__name__}" if isinstance(item, (tuple, list)) and item else ""
    return f"a {type(item).__name__}{inner}"


@register_source
class CustomSource(Source):
    """``data=custom``: the dataset ``data.dataset`` names (a Hydra ``_target_`` node), as :class:`CustomImages`."""

    name = "custom"
    summary = "your own map-style dataset class: data.dataset={_target_:mypkg.MyDataset,...its keyword arguments}"
    reads_dataset_node = True

    def check(self, cfg: DataConfig | DictConfig) -> None:
        target = _node(cfg)["_target_"]
        try:
            found = import_object(str(target))
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"data.dataset._target_={target}: cannot import it ({type(e).__name__}: {e}); check "
                              "the path, and that your package is importable (installed, or on PYTHONPATH)") from None
        if not callable(found):
            raise ConfigError(f"data.dataset._target_={target} is a {type(found).__name__}, not a dataset class")

    def build(self, cfg: DataConfig | DictConfig) -> CustomImages:
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        node = _node(cfg)
        try:
            dataset = instantiate(node, _convert_="all")
        except InstantiationException as e:
            raise ConfigError(f"data.dataset: {str(e).splitlines()[0]}") from None
        try:
            size = len(dataset)
        except TypeError:
            raise ConfigError(f"data.dataset._target_={node['_target_']} made a {type(dataset).__name__} without a "
                              "length; msn needs a map-style dataset (__len__ and __getitem__)") from None
        if size == 0:
            raise DataError(f"data.dataset._target_={node['_target_']} holds no items")
        try:  # a dataset of the wrong kind is one line now, not one bad item per image later
            first = dataset[0]
        except Exception:  # an unreadable first item is the loader's to replace and count
            first = None
        if first is not None and image_of(first) is None:
            raise ConfigError(f"data.dataset._target_={node['_target_']}: item 0 is {_kind(first)}; {_WANTED}")
        return CustomImages(dataset, str(node["_target_"]))

    def where(self, cfg: DataConfig | DictConfig) -> str:
        node = _node(cfg)
        args = ", ".join(f"{k}={v}" for k, v in node.items() if k != "_target_")
        return f"{node['_target_']}({args})"
