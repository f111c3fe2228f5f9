"""CNN classifier for the plain CAM baseline (Zhou et al., CVPR 2016) on a timm CNN trunk.

The trunk's last feature map ``F`` (``(B, C, h, w)``, timm ``forward_features``; for
``tf_efficientnet_lite0`` the 1280-channel ``conv_head`` output at stride 32, or 16 with
``output_stride: 16``) is pooled (``head: gap``, default, or ``gmp``) and fed
to a bias-free linear classifier ``W`` (``(K, C)``, a 1x1 convolution), so the logits are
``W pool(F)`` and the class activation maps are ``CAM_c = ReLU(w_c^T F(i, j))`` per pixel.

``freeze: true`` keeps the trunk fixed (no gradients, BatchNorm in eval mode even while
the module trains): only ``W`` learns (a linear probe of the pretrained features).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.backbones import create_backbone

#: ``head`` values of :class:`CNNCAM`.
CNN_HEADS = ("gap", "gmp")


class CNNCAM(nn.Module):
    """timm CNN trunk + pooling + bias-free linear classifier.

    Args:
        p: ``train_cls`` params: ``backbone{name, pretrained, overrides}`` (``overrides`` are
            extra timm kwargs), ``head`` (``gap`` | ``gmp``, default ``gap``), ``freeze``
            (bool, default false), ``output_stride`` (timm's, e.g. 16: the last stage dilated;
            null = the network's own).
        num_classes: foreground classes.
    Raises:
        ValueError: unknown ``head``.
    """

    def __init__(self, p: dict, num_classes: int):
        super().__init__()
        self.head_type = p.get("head") or "gap"
        if self.head_type not in CNN_HEADS:
            raise ValueError(f"train_cls.head of a CNN CAM must be gap or gmp, got {self.head_type!r}")
        bb = p["backbone"]
        kw = dict(bb.get("overrides") or {})
        if p.get("output_stride"):
            kw["output_stride"] = int(p["output_stride"])
        self.backbone = create_backbone(bb["name"], bb.get("pretrained"), num_classes=0,
                                        global_pool="", **kw)
        self.freeze = bool(p.get("freeze", False))
        if self.freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.classifier = nn.Linear(self.backbone.num_features, num_classes, bias=False)

    @property
    def input_stride(self) -> int:
        """Pixels per feature-map cell (32 for EfficientNet, 16 with ``output_stride: 16``)."""
        return int(self.backbone.feature_info[-1]["reduction"])

    def train(self, mode: bool = True) -> "CNNCAM":
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the trunk's last feature map ``(B, C, h, w)``."""
        if self.freeze:
            with torch.no_grad():
                return self.backbone.forward_features(x)
        return self.backbone.forward_features(x)

    def pool(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, C)``: mean (``gap``) or max (``gmp``) over positions."""
        return f.mean((2, 3)) if self.head_type == "gap" else f.amax((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        return self.classifier(self.pool(self.features(x)))

    def cams(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``ReLU(w_c^T F)`` per position: ``(B, k, h, w)`` for ``classes`` (all if None)."""
        w = self.classifier.weight if classes is None else self.classifier.weight[classes]
        return F.relu(torch.einsum("kc,bchw->bkhw", w, self.features(x)))
