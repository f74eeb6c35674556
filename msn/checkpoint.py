"""Deprecated: checkpoint files moved to :mod:`msn.weights.checkpoint`. This alias goes in the next release."""

import warnings

from msn.weights.checkpoint import (
    check_training_checkpoint,
    is_training_checkpoint,
    load_checkpoint,
    periodic_name,
    prune_periodic,
    remove_stale_temporaries,
    rng_state,
    safe_load,
    save_checkpoint,
    set_rng_state,
)

__all__ = ["check_training_checkpoint", "is_training_checkpoint", "load_checkpoint", "periodic_name",
           "prune_periodic", "remove_stale_temporaries", "rng_state", "safe_load", "save_checkpoint", "set_rng_state"]
warnings.warn(f"importing from {__name__} is deprecated; import from msn.weights.checkpoint", FutureWarning,
              stacklevel=2)
