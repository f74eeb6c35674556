"""The errors a user's input can cause. Each command catches :class:`MSNError` once and answers with one
line (``msn-xxx: error: MESSAGE``) and exit code 1; anything else is a bug and keeps its traceback.

They live apart from the modules that raise them (which import torch) so that a command can catch them,
and show ``--help`` or refuse a bad argument, before it has paid the seconds that importing torch takes.
The subclasses stay ``ValueError``s, as they always were, so code that caught ``ValueError`` still does.
"""


class MSNError(Exception):
    """Base of every error that bad input causes; the message names the problem and the fix."""


class ConfigError(MSNError, ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


class DataError(MSNError, ValueError):
    """The data cannot be used as configured; the message names the file or key and the fix."""


class DataGone(DataError):
    """A file the run reads was removed or changed while it ran: not a bad sample to replace, a stop (the run
    continues from its last checkpoint once the data is back)."""


class WriteStopped(DataError):
    """A write was asked to stop (a signal) before it was complete: nothing was written, what it would have
    replaced is unchanged."""


class BadSample(DataError):
    """One sample cannot be used (replaced and counted by the loader); ``what`` names the kind, as the run's
    warning says it: ``undecodable image``, ``sample without an image member``, ..."""

    def __init__(self, message: str, what: str = "undecodable image") -> None:
        super().__init__(message)
        self.what = what


class CheckpointError(MSNError, ValueError):
    """A checkpoint is missing, unreadable or not an msn training checkpoint."""


class ConversionError(MSNError, ValueError):
    """A state dict does not have the keys or shapes the conversion expects."""


class VizError(MSNError, ValueError):
    """A picture cannot be made from the given input; the message names it and the fix."""


class NonFiniteError(MSNError, FloatingPointError):
    """Training produced a NaN or infinity; the message names the step and what to change."""


class JobError(MSNError, RuntimeError):
    """A multi-process job cannot go on (another process died or was cut off); the message says which rank saw
    it, where the last checkpoint is and how to continue."""


class RunCollapsed(MSNError, RuntimeError):
    """The run's representations collapsed (:mod:`msn.train.collapse`): it wrote ``last.pt`` and set its status
    to ``collapsed``; the message says what collapsed and the usual fixes."""
