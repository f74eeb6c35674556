"""The commands' console: msn's log records (``logging.getLogger("msn....")``) printed as the commands have always
printed them, a message per line, without level or time.

Library code only logs, so ``msn.train(...)`` in a notebook prints nothing unless the notebook configures logging
(the package's logger has a ``NullHandler``); a command installs :class:`ConsoleHandler` on the ``msn`` logger:
INFO on stdout, warnings and errors on stderr, written through ``tqdm.write`` so that a progress bar stays intact.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping


class ConsoleHandler(logging.Handler):
    """INFO records on stdout, WARNING and above on stderr; ``warning_prefixes`` puts a command's name before the
    warnings of one module (``{"msn.eval.evaluate": "msn-eval: "}``), as that command always printed them."""

    def __init__(self, warning_prefixes: Mapping[str, str] | None = None) -> None:
        super().__init__(logging.INFO)
        self.warning_prefixes = dict(warning_prefixes or {})

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            message = self.format(record)
            warning = record.levelno >= logging.WARNING
            if warning:
                message = self.warning_prefixes.get(record.name, "") + message
            stream = sys.stderr if warning else sys.stdout
            tqdm.write(message, file=stream)
            stream.flush()
        except Exception:  # logging must never take the command down
            self.handleError(record)


def console_logging(warning_prefixes: Mapping[str, str] | None = None) -> ConsoleHandler:
    """Print the ``msn`` logger's INFO and above on the console (replacing a handler an earlier call installed);
    the records do not also reach the root logger's handlers (Hydra's job logging would print them twice)."""
    logger = logging.getLogger("msn")
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    handler = ConsoleHandler(warning_prefixes)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler
