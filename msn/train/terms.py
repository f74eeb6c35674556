"""Loss terms of your own, added to the MSN loss by name (``loss.extra_terms``), as dinov2's loss dictionary and
Hydra's ``_target_`` do it. Torch-free at import: a command checks the terms before it imports torch.

Each entry of ``loss.extra_terms`` names a term and a Hydra ``_target_`` node; ``weight`` (default 1) is its
factor in the total loss, the node's other keys are its keyword arguments. The target is a function called with
the step's :class:`LossInputs` (and those keywords), or a class constructed with those keywords whose instances
are then called with the inputs. It returns a 0-d tensor; its value is logged under the term's name (a column of
``metrics.csv``, a line of wandb, a panel of ``msn-viz curves``), unweighted. A term has no parameters of its own
(they would not be trained). For example, ``mypkg/terms.py``::

    def prototype_spread(inputs: LossInputs) -> torch.Tensor:
        '''Mean cosine similarity between distinct prototypes: lower is more spread out.'''
        p = torch.nn.functional.normalize(inputs.prototypes, dim=1)
        sim = p @ p.T
        k = len(p)
        return (sim.sum() - sim.diagonal().sum()) / (k * (k - 1))

and in an experiment file (or ``'+loss.extra_terms.spread={_target_:mypkg.terms.prototype_spread,weight:0.1}'``)::

    loss:
      extra_terms:
        spread: {_target_: mypkg.terms.prototype_spread, weight: 0.1}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from msn.errors import ConfigError
from msn.utils.registry import import_object
from msn.utils.rundir import METRICS_FIXED_COLUMNS

if TYPE_CHECKING:
    import torch


@dataclass
class LossInputs:
    """What every loss term sees, for this process's batch (``B`` images, ``V`` anchor views, ``K`` prototypes).

    Attributes:
        anchors: (B*V, D) anchor representations, view-major (rows ``v*B .. v*B+B-1`` are view ``v``).
        targets: (B, D) target representations (no gradient).
        prototypes: (K, D) the prototypes (they get the term's gradient).
        anchor_log_probs: (B*V, K) ``log softmax(cos(anchor, prototypes) / tau)``.
        anchor_probs: (B*V, K) its exponential.
        target_probs: (B, K) the sharpened (and Sinkhorn-balanced) targets, no gradient.
        tau: the similarity temperature; ``T``: this step's sharpening temperature.
    """

    anchors: torch.Tensor
    targets: torch.Tensor
    prototypes: torch.Tensor
    anchor_log_probs: torch.Tensor
    anchor_probs: torch.Tensor
    target_probs: torch.Tensor
    tau: float
    T: float

    @property
    def num_views(self) -> int:
        """Anchor views per image (``V``)."""
        return self.anchors.shape[0] // self.targets.shape[0]


Term = Callable[[LossInputs], "torch.Tensor"]


@dataclass(frozen=True)
class WeightedTerm:
    """A user's term and its factor in the total loss."""

    weight: float
    fn: Term


def _entries(nodes: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``loss.extra_terms`` as plain dicts, each checked to be a node with a ``_target_`` and a finite weight."""
    from omegaconf import DictConfig, OmegaConf

    if nodes is None:
        return {}
    if isinstance(nodes, DictConfig):
        nodes = OmegaConf.to_container(nodes, resolve=True)
    if not isinstance(nodes, Mapping):
        raise ConfigError(f"loss.extra_terms must map term names to _target_ nodes; got {type(nodes).__name__}")
    entries = {}
    for name, node in nodes.items():
        if name in METRICS_FIXED_COLUMNS:
            raise ConfigError(f"loss.extra_terms.{name}: {name} is a column of every run's metrics.csv; name the term "
                              "otherwise")
        if not isinstance(node, Mapping) or not node.get("_target_"):
            raise ConfigError(f"loss.extra_terms.{name} needs a _target_, the import path of the term; e.g. "
                              f"'+loss.extra_terms.{name}={{_target_:mypkg.terms.my_term,weight:0.1}}'")
        weight = node.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ConfigError(f"loss.extra_terms.{name}.weight={weight!r} must be a finite number")
        entries[str(name)] = dict(node)
    return entries


def check_extra_terms(nodes: Mapping[str, Any] | None) -> None:
    """Refuse ``loss.extra_terms`` that cannot be built: a node without ``_target_``, a bad weight, a name that is
    already a metrics column, a target that cannot be imported or is not callable. Imports the terms' modules."""
    for name, node in _entries(nodes).items():
        try:
            target = import_object(str(node["_target_"]))
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"loss.extra_terms.{name}._target_={node['_target_']}: cannot import it "
                              f"({type(e).__name__}: {e}); check the path and PYTHONPATH") from None
        if not callable(target):
            raise ConfigError(f"loss.extra_terms.{name}._target_={node['_target_']} is not a function or class")


def build_extra_terms(nodes: Mapping[str, Any] | None) -> dict[str, WeightedTerm]:
    """``loss.extra_terms`` built: name -> :class:`WeightedTerm`. A function target becomes a partial with the
    node's keywords; a class target is constructed with them."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    check_extra_terms(nodes)
    terms = {}
    for name, node in _entries(nodes).items():
        weight = float(node.pop("weight", 1.0))
        partial = not isinstance(import_object(str(node["_target_"])), type)
        try:
            fn = instantiate(node, _partial_=partial, _convert_="all")
        except InstantiationException as e:
            raise ConfigError(f"loss.extra_terms.{name}: {str(e).splitlines()[0]}") from None
        if not callable(fn):
            raise ConfigError(f"loss.extra_terms.{name}: {node['_target_']} made a {type(fn).__name__}, which cannot "
                              "be called with the loss inputs")
        terms[name] = WeightedTerm(weight, fn)
    return terms
