"""Training sources by name: what ``data.name`` can be, and everything the trainer asks of one.

A source is a small class registered with :func:`register_source`. It says how to build its base dataset
(index -> PIL RGB image) from the ``data`` config, what to check before anything heavy runs (a missing folder
or shard is one line, before a run directory exists and before torch is imported), where its images come from
(``msn-bench data``'s report and the identity a resume compares), and nothing else: the multi-crop views, exact
resume, bad-image replacement and the processes' shares are the same for every source
(:class:`~msn.data.loader.MultiCropDataset`, :class:`~msn.data.loader.EpochSampler`).

The built-in sources live one module each in :mod:`msn.data.sources`; a new one is a module there and a YAML file
in ``msn/configs/data/``. A dataset class of your own needs neither: ``data=custom`` with
``data.dataset={_target_:mypkg.MyDataset,...}`` (:mod:`msn.data.sources.custom`). Torch-free.
"""

from __future__ import annotations

from typing import Any, Protocol

from omegaconf import DictConfig

from msn.config import DataConfig
from msn.errors import ConfigError
from msn.utils.registry import Registry


class ImageDataset(Protocol):
    """What the multi-crop pipeline needs from a base dataset: a length and ``dataset[i]`` -> PIL RGB image.

    Raising :class:`~msn.errors.DataError` for an image that cannot be read makes the loader replace it and
    count it (``data.max_bad_files``). An optional ``name(i)`` says what the messages call image ``i``.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class Source:
    """A training source (``data.name``). Subclass it, set :attr:`name`, implement :meth:`build`, and decorate
    the class with :func:`register_source`; override :meth:`check` and :meth:`where` as the data needs.

    Every method takes the ``data`` config node (:class:`~msn.config.DataConfig`, or the composed DictConfig).
    """

    name: str = ""
    summary: str = ""  # one line for listings and --help
    reads_dataset_node: bool = False  # whether the source reads data.dataset (else a set one is refused, not ignored)

    def check(self, cfg: DataConfig | DictConfig) -> None:
        """Refuse a config this source cannot read, cheaply (no decoding, no torch): raise
        :class:`~msn.errors.ConfigError` or :class:`~msn.errors.DataError` naming the key and the fix."""

    def build(self, cfg: DataConfig | DictConfig) -> ImageDataset:
        """The base dataset: ``len()`` images, ``dataset[i]`` a PIL RGB image."""
        raise NotImplementedError

    def where(self, cfg: DataConfig | DictConfig) -> str:
        """The data the source reads, in words: its folder, shard pattern or dataset (``msn-bench data`` prints it;
        a resume says when it changed)."""
        return self.name

    def identity(self, cfg: DataConfig | DictConfig) -> dict[str, Any]:
        """What a resume compares beyond the image count: ``source`` (a new location of the same images is only
        said) and anything whose change makes it another run (``list_file``)."""
        return {"source": self.where(cfg)}


_SOURCES: Registry[type[Source]] = Registry("data source", "data.name", builtins="msn.data.sources")


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: register a :class:`Source` subclass under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise TypeError(f"register_source takes a subclass of msn.data.Source; got {cls!r}")
    _SOURCES.register(cls.name, cls)
    return cls


def _as_source(obj: Any) -> type[Source]:
    if isinstance(obj, type) and issubclass(obj, Source):
        return obj
    raise TypeError(f"{obj!r} is not a subclass of msn.data.Source (for a dataset class of your own use data=custom "
                    "with data.dataset={_target_:...})")


def get_source(name: str) -> Source:
    """The source ``data.name`` names: a registered name or the import path of a :class:`Source` subclass."""
    return _SOURCES.get(str(name), _as_source)()


def source_names() -> list[str]:
    """The registered sources' names."""
    return _SOURCES.names()


def check_source(cfg: DataConfig | DictConfig) -> None:
    """The cheap checks of ``cfg.name``'s source (an unknown name is a :class:`ConfigError` listing the sources;
    ``data.dataset`` given to a source that does not read it, one naming ``data=custom``)."""
    source = get_source(cfg.name)
    if getattr(cfg, "dataset", None) is not None and not source.reads_dataset_node:
        raise ConfigError(f"data.dataset is set, but data={cfg.name} reads its own images and would ignore it; pass "
                          "data=custom to train on your dataset class")
    source.check(cfg)


def build_dataset(cfg: DataConfig | DictConfig) -> ImageDataset:
    """The base dataset that ``cfg.name`` selects, checked first (:func:`check_source`)."""
    check_source(cfg)
    return get_source(cfg.name).build(cfg)


def describe_source(cfg: DataConfig | DictConfig) -> str:
    """:meth:`Source.where` of ``cfg.name``'s source."""
    return get_source(cfg.name).where(cfg)


def data_identity(cfg: DataConfig | DictConfig, num_images: int, epoch_len: int,
                  fingerprint: str | None = None) -> dict[str, Any]:
    """What a run trains on, as a resume compares it: the kind of source, :meth:`Source.identity`, the number of
    images and the epoch length, and the dataset's ``fingerprint`` when it has one (shards: their samples and
    order, :mod:`msn.data.shard_set`)."""
    identity = {"kind": str(cfg.name), **get_source(cfg.name).identity(cfg), "images": int(num_images),
                "samples_per_epoch": int(epoch_len)}
    if fingerprint is not None:
        identity["fingerprint"] = str(fingerprint)
    return identity


def require(cfg: DataConfig | DictConfig, key: str, example: str) -> Any:
    """``cfg.<key>``, or a :class:`ConfigError` saying that ``data=<name>`` needs it (``example``: how to pass it)."""
    value = getattr(cfg, key, None)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"data.{key} is required for data={cfg.name}: pass {example}")
    return value
