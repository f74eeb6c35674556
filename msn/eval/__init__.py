"""Evaluation of a frozen encoder: features (:mod:`.features`), labelled splits (:mod:`.splits`), the protocols
by name (:mod:`.registry`; the built-ins in :mod:`.protocols`: low-shot logistic regression, k-NN, linear probe,
fine-tuning), one protocol run as ``msn-eval`` runs it (:mod:`.evaluate`) and the monitor the trainer runs every
few steps (:mod:`.monitor`).

The names below load on first use (``import msn.eval`` imports neither torch nor the protocols).
"""

from __future__ import annotations

from msn.utils.lazy import lazy_names

_HOMES = {"EvalTask": "msn.eval.registry", "Protocol": "msn.eval.registry", "register_protocol": "msn.eval.registry",
          "get_protocol": "msn.eval.registry", "protocol_names": "msn.eval.registry", "summarise": "msn.eval.registry",
          "evaluate": "msn.eval.evaluate"}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
