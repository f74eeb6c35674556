"""MSN: Masked Siamese Networks pretraining for Vision Transformers (Assran et al., 2022).

The functions a Python user calls (each loads on first use, so ``import msn`` stays light)::

    import msn

    backbone, transform = msn.load_backbone("outputs/default")         # a run, checkpoint, HF / timm export, .pth.tar
    features = msn.extract_features(backbone, images)                  # (N, D) CLS features of PIL images or a loader
    msn.train(["experiment=cpu_smoke"])                                # pretrain, as msn-pretrain would
    vit = msn.create_backbone("vit_small", patch_size=16)              # a fresh backbone

Extension points: :func:`msn.data.register_source` (training sources), ``data=custom`` (your own dataset class),
``loss.extra_terms`` (your own loss terms, :mod:`msn.train.terms`), :func:`msn.eval.register_protocol`
(evaluation protocols). Library code logs through ``logging.getLogger("msn....")`` and prints nothing itself.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from msn.utils.lazy import lazy_names

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())  # silent unless the application configures logging

_API = {"load_backbone": "msn.api", "extract_features": "msn.api", "create_backbone": "msn.api",
        "compose_config": "msn.utils.compose", "register_source": "msn.data.registry",
        "register_protocol": "msn.eval.registry"}
__all__ = ["__version__", "train", *sorted(_API)]
_names, __dir__ = lazy_names(__name__, _API)


def __getattr__(name: str) -> Any:
    if name == "train":  # the msn.train package, which is callable: msn.train(...) is msn.train.loop.train
        return importlib.import_module("msn.train")
    return _names(name)
