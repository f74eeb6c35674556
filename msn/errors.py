"""The errors a user's input can cause. Each command answers them with one line and exit code 1.

They live apart from the modules that raise them (which import torch) so that a command can catch them,
and show ``--help`` or refuse a bad argument, before it has paid the seconds that importing torch takes.
"""


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file or key and the fix."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not an msn training checkpoint."""


class ConversionError(ValueError):
    """A state dict does not have the keys or shapes the conversion expects."""


class VizError(ValueError):
    """A picture cannot be made from the given input; the message names it and the fix."""
