"""Online encoder, EMA target encoder and prototypes: the parts of MSN that hold parameters."""

from __future__ import annotations

import copy

import torch
from torch import nn

from msn.config import ConfigError, ModelConfig, model_arch
from msn.models.backbone import MaskedViT
from msn.models.heads import ProjectionHead, init_prototypes


class MSNEncoder(nn.Module):
    """ViT backbone followed by the projection head: (B, C, H, W) -> (B, out_dim)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = MaskedViT(model_arch(cfg), cfg.patch_size, cfg.img_size, cfg.drop_path_rate,
                                  cfg.weight_init)
        self.head = ProjectionHead(self.backbone.embed_dim, hidden_dim=cfg.head_hidden_dim, out_dim=cfg.head_output_dim,
                                   num_layers=cfg.head_layers, batchnorm=cfg.head_batchnorm,
                                   sync_batchnorm=cfg.sync_batchnorm, weight_init=cfg.weight_init)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(x, keep))


class MSN(nn.Module):
    """The online encoder (trained), its EMA copy (the target) and the prototypes.

    The target never receives gradients (``requires_grad=False``) and is changed only by
    :meth:`update_target`; evaluation and export use it.

    Args:
        cfg: the model config; ``cfg.head_per_resolution`` chooses how the head sees the anchor views
            (see :meth:`forward`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.online = MSNEncoder(cfg)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        # The target runs without gradients, so only the online backbone keeps activations to checkpoint.
        self.online.backbone.set_grad_checkpointing(bool(getattr(cfg, "grad_checkpointing", False)))
        self.prototypes = init_prototypes(cfg.num_prototypes, cfg.head_output_dim)
        self.head_per_resolution = bool(cfg.head_per_resolution)

    def forward(
        self,
        target_view: torch.Tensor,
        anchor_view: torch.Tensor,
        focal_views: torch.Tensor | None = None,
        anchor_keep: torch.Tensor | None = None,
        focal_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Representations of one batch of views.

        The backbone runs once per resolution (the anchor view, then the focal views). With
        ``head_per_resolution`` (the original code's behaviour) the head runs once per resolution too,
        so its BatchNorm normalises the anchors and the focal views with their own statistics;
        otherwise it runs once over all anchor views, mixing both groups' statistics.

        Args:
            target_view: (B, C, G, G) unmasked target view, fed to the target encoder.
            anchor_view: (B, C, G, G) anchor view.
            focal_views: (n*B, C, F, F) focal views stacked view-major, or None.
            anchor_keep, focal_keep: (B, K) / (n*B, K') patch indices to keep, or None (no masking).
        Returns:
            anchors (B*(1+n), out_dim) view-major, and targets (B, out_dim) without gradient.
        """
        with torch.no_grad():
            targets = self.target(target_view)
        features = [self.online.backbone(anchor_view, anchor_keep)]
        if focal_views is not None:
            features.append(self.online.backbone(focal_views, focal_keep))
        if self.head_per_resolution:
            anchors = torch.cat([self.online.head(f) for f in features])
        else:
            anchors = self.online.head(torch.cat(features))
        return anchors, targets

    def compile_encoders(self, backend: str = "inductor", mode: str | None = None, per_block: bool = False) -> None:
        """``torch.compile`` what :meth:`forward` calls: the online backbone and head, and the target encoder; with
        ``per_block`` each transformer block of both encoders instead (``strategy=fsdp``: FSDP gathers and frees a
        block's weights around it, so a block is the unit a graph can hold, as DINOv3 compiles).

        In place (``nn.Module.compile``), so parameter names and checkpoints stay as they are. Shapes are
        static: each view size (masked anchor, focal) gets its own graph rather than a dynamic one.
        An unknown ``backend`` is a :class:`ConfigError` (torch would fail only at the first call).
        """
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(f"compile_backend={backend!r} is not a torch.compile backend; choose one of "
                              + ", ".join(torch._dynamo.list_backends()))
        modules = ([*self.online.backbone.blocks, *self.target.backbone.blocks] if per_block else
                   [self.online.backbone, self.online.head, self.target])
        for module in modules:
            module.compile(backend=backend, mode=mode, dynamic=False)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA of the parameters: ``target = m * target + (1 - m) * online`` (one fused op)."""
        target = list(self.target.parameters())
        online = list(self.online.parameters())
        torch._foreach_lerp_(target, online, 1.0 - momentum)
