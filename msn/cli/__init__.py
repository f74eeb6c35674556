"""The command-line layer: each module parses its arguments, checks them before importing torch, calls the
library with explicit keyword arguments and answers an :class:`msn.errors.MSNError` with one line and exit
code 1. Hydra's glue (:mod:`.hydra`) lives here too. No other module imports this package."""
