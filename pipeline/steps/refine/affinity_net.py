"""PSA AffinityNet: per-pixel affinity features at output stride 8.

Ahn & Kwak, CVPR 2018 ("PSA"; official code jiwoon-ahn/psa ``network/resnet38_aff.py``), step
3 of the PSA modules (map in :mod:`pipeline.steps.refine.affinity_train`; settings in
``docs/methods/psa.md``): a timm backbone at output stride 8, 1x1 convs on the last three
feature maps, concatenated, 1x1 conv -> ``feature_dim`` channels (:class:`AffinityNet`);
:func:`build_affinity_net` from params, :func:`load_affinity_net` from a
:func:`pipeline.steps.refine.affinity_train.train_affinity_net` checkpoint.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.backbones import create_backbone, input_normalisation
from pipeline.steps.refine.affinity_labels import STRIDE
from pipeline.io.settings import TrainAffinity


class AffinityNet(nn.Module):
    """PSA AffinityNet on a timm backbone.

    ``create_backbone(backbone, pretrained, features_only=True, output_stride=8)``; the last
    three feature maps are each reduced by a bias-free 1x1 conv + ELU to
    ``feature_dim * (1, 2, 4) / 7`` channels (PSA: 64, 128, 256 of 448), resized to the
    stride-8 grid if needed, concatenated, and mixed by a bias-free 1x1 conv + ELU to
    ``feature_dim`` channels (official PSA ``resnet38_aff``: f8_3, f8_4, f8_5, f9; same
    initialisation: Kaiming normal, Xavier uniform with gain 4 for the last conv).

    Args:
        backbone: timm model name supporting ``features_only`` and ``output_stride``
            (``resnet50``; CPU profiles ``resnet18`` / ``resnet10t``).
        pretrained: see :func:`pipeline.models.backbones.create_backbone`.
        feature_dim: affinity feature channels ``D`` (PSA: 448), >= 3.
        freeze_bn: keep BatchNorm layers in eval mode with frozen affine parameters during
            training (official PSA code; use with pretrained backbones).
        **timm_kwargs: passed to timm.

    ``forward(x (B, 3, H, W)) -> (B, D, ceil(H/8), ceil(W/8))`` float.

    Raises:
        ValueError: ``feature_dim < 3``.
        pipeline.models.backbones.WeightsError: pretrained weights unavailable.
    """

    def __init__(self, backbone: str = "resnet50", pretrained: str | None = None,
                 feature_dim: int = 448, freeze_bn: bool = False, **timm_kwargs: Any):
        super().__init__()
        feature_dim = int(feature_dim)
        if feature_dim < 3:
            raise ValueError(f"feature_dim must be >= 3, got {feature_dim}")
        self.backbone = create_backbone(backbone, pretrained, features_only=True,
                                        output_stride=STRIDE, **timm_kwargs)
        chans = self.backbone.feature_info.channels()[-3:]
        split = [feature_dim // 7, 2 * feature_dim // 7]
        split.append(feature_dim - sum(split))
        self.reduce = nn.ModuleList(nn.Conv2d(c, s, 1, bias=False) for c, s in zip(chans, split))
        self.mix = nn.Conv2d(feature_dim, feature_dim, 1, bias=False)
        for m in self.reduce:
            nn.init.kaiming_normal_(m.weight)
        nn.init.xavier_uniform_(self.mix.weight, gain=4)
        self.feature_dim = feature_dim
        # the statistics the inputs need: those of the pretrained weights (pypi: 0.5 / 0.5)
        self.input_norm = input_normalisation(pretrained)
        self.freeze_bn = bool(freeze_bn)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new 1x1 convs (trained with ``head_lr_mult`` x lr)."""
        return list(self.reduce.parameters()) + list(self.mix.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = math.ceil(x.shape[2] / STRIDE), math.ceil(x.shape[3] / STRIDE)
        feats = self.backbone(x)[-3:]
        outs = []
        for conv, ft in zip(self.reduce, feats):
            y = F.elu(conv(ft))
            if y.shape[2:] != (h, w):
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            outs.append(y)
        return F.elu(self.mix(torch.cat(outs, dim=1)))


def build_affinity_net(params: TrainAffinity | Mapping[str, Any],
                       pretrained: Any = "from_params") -> AffinityNet:
    """:class:`AffinityNet` from :class:`pipeline.io.settings.TrainAffinity` or a mapping of its
    keys (e.g. a checkpoint's ``params``; defaults: the dataclass, PSA with a ResNet-50):
    ``backbone``, ``pretrained``, ``feature_dim``, ``freeze_bn``; ``pretrained=None``
    overrides the params (used when a checkpoint's state dict is loaded afterwards)."""
    s = TrainAffinity.of(params)
    return AffinityNet(s.backbone, s.pretrained if pretrained == "from_params" else pretrained,
                       feature_dim=s.feature_dim, freeze_bn=s.freeze_bn)


def load_affinity_net(model_path: str | Path, device: str | torch.device = "cpu") -> AffinityNet:
    """Load a checkpoint written by :func:`pipeline.steps.refine.affinity_train.train_affinity_net`
    (``{"state_dict", "params"}``), in eval mode on ``device``.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
    """
    p = Path(model_path)
    if not p.is_file():
        raise FileNotFoundError(f"affinity model {p} does not exist; run the train_affinity "
                                f"stage first.")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    model = build_affinity_net(ckpt["params"], pretrained=None)
    model.load_state_dict(ckpt["state_dict"])
    model.input_norm = input_normalisation(ckpt["params"].get("pretrained"))   # as in training
    return model.to(device).eval()
