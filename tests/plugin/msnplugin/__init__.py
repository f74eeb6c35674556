"""A researcher's own package that extends msn without a line of msn changed (tests/test_extending.py): a dataset
class (trained with data=custom) and a registered source, a loss term (loss.extra_terms) and an evaluation
protocol. ``MSN_PLUGINS=msnplugin`` registers the source and the protocol for the command line."""

from msnplugin import datasets, protocols, terms  # noqa: F401
