"""The networks: the ViT backbone with token dropping (:mod:`.backbone`), the projection head and
prototypes (:mod:`.heads`), the online + EMA target module (:mod:`.msn`) and the patch masks
(:mod:`.masking`). Models never import :mod:`msn.data`, nor data the models."""

from typing import Any


def __getattr__(name: str) -> Any:  # ``from msn.models import MSN`` without importing torch up front
    if name == "MSN":
        from msn.models.msn import MSN

        return MSN
    if name == "MaskedViT":
        from msn.models.backbone import MaskedViT

        return MaskedViT
    raise AttributeError(f"module 'msn.models' has no attribute {name!r}")
