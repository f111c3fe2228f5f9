"""Plain CAM baseline on a ViT (Zhou et al., CVPR 2016, "transplanted" to a transformer as in
ACR Table 5): a bias-free linear classifier on pooled patch tokens; CAM_c = ReLU(w_c^T F)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.vit import patch_grid, patch_tokens
from .base import Method, ViTClassifier, multilabel_loss


class CAM(Method):
    name = "cam"
    seed_keys = ("cams",)

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        p = {**p, "head": p.get("head", "gmp")}
        return ViTClassifier(p, num_classes)

    def loss(self, model, x, y, p, generator):
        l = multilabel_loss(model(x), y)
        return l, {"cls": l.item()}

    @torch.no_grad()
    def maps(self, model, x, fg, p):
        """CAM ``ReLU(W F)`` for the classes ``fg``: ``{"cams": (k, h, w)}`` at token resolution."""
        _, f = patch_tokens(model.vit, x)                  # (1, n, D)
        w = model.classifier.weight[fg]                    # (k, D)
        cam = F.relu(torch.einsum("kd,nd->kn", w, f[0]))
        h, wd = patch_grid(model.vit, x.shape[-2], x.shape[-1])
        return {"cams": cam.reshape(len(fg), h, wd)}
