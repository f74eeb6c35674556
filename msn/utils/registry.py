"""Registries of named parts a user can add to: training sources (``data.name``), evaluation protocols
(``msn-eval PROTOCOL``, ``monitor.protocol``). Torch-free.

A name is one of the registered names, or the import path of an object (``mypkg.protocols.fewshot`` or
``mypkg.protocols:fewshot``), as Hydra's ``_target_`` names user code. Code registers its parts when it is
imported: the built-ins when a registry is first read, and plugins named by the ``MSN_PLUGINS`` environment
variable (module names, separated by commas) or installed under the ``msn.plugins`` entry-point group, so that a
command line can use a plugin's short names::

    MSN_PLUGINS=mypkg.msn_parts msn-eval fewshot outputs/default
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from msn.errors import ConfigError

T = TypeVar("T")
PLUGINS_ENV = "MSN_PLUGINS"
ENTRY_POINT_GROUP = "msn.plugins"
_plugins_loaded = False


def load_plugins() -> None:
    """Import the modules of ``$MSN_PLUGINS`` and of the ``msn.plugins`` entry points, once per process."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").replace(" ", ",").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"{PLUGINS_ENV}={os.environ[PLUGINS_ENV]}: cannot import {name} ({e}); check the "
                              "module name and PYTHONPATH") from None
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as e:  # a broken installed plugin: one line naming it, in every command
            package = entry.dist.name if entry.dist else "a package"
            raise ConfigError(f"the installed plugin {entry.value} ({ENTRY_POINT_GROUP} entry point {entry.name} of "
                              f"{package}) cannot be imported ({type(e).__name__}: {e}); fix or uninstall that "
                              "package") from None


def import_object(path: str) -> Any:
    """The object an import path names: ``package.module.name`` or ``package.module:name``. Raises ImportError
    or AttributeError as importing would."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ImportError(f"{path!r} is not an import path (module.name)")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Named entries of one kind, filled by :meth:`register` when the modules that define them are imported.

    Args:
        kind: what an entry is, for messages (``"data source"``).
        option: the option that names one, for messages (``"data.name"``).
        builtins: the module whose import registers the built-in entries (imported on first use).
    """

    def __init__(self, kind: str, option: str, builtins: str) -> None:
        self.kind, self.option, self.builtins = kind, option, builtins
        self._entries: dict[str, T] = {}
        self._builtins_loaded = False

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``. A later registration of a name replaces the earlier one, so a plugin or a
        user's module may override a built-in: the built-ins are registered first, whenever the first other entry
        is."""
        if not name or not isinstance(name, str) or "." in name or ":" in name:
            raise ValueError(f"a {self.kind} name must be a non-empty string without '.' or ':'; got {name!r}")
        self._load_builtins()
        self._entries[name] = entry
        return entry

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True  # first: the built-in modules register while they are imported
            importlib.import_module(self.builtins)

    def _load(self) -> None:
        self._load_builtins()
        load_plugins()

    def names(self) -> list[str]:
        """The registered names, sorted (built-ins and plugins included)."""
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def get(self, name: str, resolve: Callable[[Any], T] | None = None) -> T:
        """The entry registered as ``name``; an import path is imported and passed through ``resolve`` (which
        turns what it names into an entry, raising TypeError when it cannot). Anything else is one
        :class:`ConfigError` that lists the registered names."""
        self._load()
        if name in self._entries:
            return self._entries[name]
        text = str(name)
        if "." in text or ":" in text:
            try:
                obj = import_object(text)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{self.option}={text}: cannot import it ({type(e).__name__}: {e}); check the "
                                  "module path, and that its package is importable (PYTHONPATH)") from None
            try:
                return resolve(obj) if resolve is not None else obj
            except TypeError as e:
                raise ConfigError(f"{self.option}={text}: {e}") from None
        raise ConfigError(f"{self.option}={text!r} is not a registered {self.kind}; choose one of "
                          f"{', '.join(self.names())}, or give the import path of your own (mypkg.module.name)")
