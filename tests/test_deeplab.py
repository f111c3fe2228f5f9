"""DeepLab-v2 model: stride, ASPP sum, dilations, parameter groups (random init, CPU)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.deeplab import ASPPSum, DeepLabV2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepLabV2("resnet10t", num_classes=5, pretrained=None).eval()


@pytest.mark.parametrize("hw", [(48, 48), (50, 63), (65, 33), (96, 128)])
def test_output_shape_stride8(model, hw):
    H, W = hw
    with torch.no_grad():
        y = model(torch.randn(2, 3, H, W))
    assert y.shape == (2, 5, math.ceil(H / 8), math.ceil(W / 8))
    assert y.dtype == torch.float32


def test_backbone_feature_is_h_over_8(model):
    with torch.no_grad():
        f = model.features(torch.randn(1, 3, 64, 80))
    assert f.shape == (1, model.feature_channels, 8, 10)
    assert model.feature_channels == model.backbone.feature_info.channels()[-1] == 512


def test_backbone_stages_dilated_for_os8(model):
    dil3 = {m.dilation for n, m in model.backbone.named_modules()
            if n.startswith("layer3") and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    dil4 = {m.dilation for n, m in model.backbone.named_modules()
            if n.startswith("layer4") and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    assert (2, 2) in dil3 and (4, 4) in dil4
    strides = {m.stride for n, m in model.backbone.named_modules()
               if n.startswith(("layer3", "layer4")) and isinstance(m, nn.Conv2d)}
    assert strides == {(1, 1)}


def test_output_stride_16():
    m = DeepLabV2("resnet10t", num_classes=3, pretrained=None, output_stride=16).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 96)).shape == (1, 3, 4, 6)


def test_aspp_dilations_as_configured():
    m = DeepLabV2("resnet10t", num_classes=4, pretrained=None, rates=(2, 3, 5))
    assert [c.dilation for c in m.aspp.branches] == [(2, 2), (3, 3), (5, 5)]
    assert [c.padding for c in m.aspp.branches] == [(2, 2), (3, 3), (5, 5)]
    assert all(c.out_channels == 4 and c.in_channels == 512 and c.kernel_size == (3, 3)
               for c in m.aspp.branches)
    default = ASPPSum(8, 21)
    assert default.rates == (6, 12, 18, 24)
    assert all(float(c.bias.detach().abs().max()) == 0.0 for c in default.branches)
    assert all(float(c.weight.detach().std()) < 0.02 for c in default.branches)  # N(0, 0.01) init


def test_aspp_is_sum_of_branches(model):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    ws, bs = [], []
    with torch.no_grad():
        for conv in model.aspp.branches:  # replace with known weights
            conv.weight.copy_(torch.randn_like(conv.weight) * 0.05)
            conv.bias.copy_(torch.randn_like(conv.bias))
            ws.append(conv.weight.clone())
            bs.append(conv.bias.clone())
        f = model.features(x)
        manual = sum(F.conv2d(f, w, b, padding=r, dilation=r)
                     for w, b, r in zip(ws, bs, model.rates))
        out = model(x)
        # a single branch alone differs from the sum (no concatenation/averaging)
        only0 = F.conv2d(f, ws[0], bs[0], padding=6, dilation=6)
    assert out.shape == manual.shape == (1, 5, 8, 8)
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, only0)


def test_aspp_sum_with_indicator_branches():
    aspp = ASPPSum(2, 2, rates=(1, 2))
    with torch.no_grad():
        for i, conv in enumerate(aspp.branches):
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(2) * (i + 1)  # centre tap: identity * (i+1)
            conv.bias.fill_(10.0 * (i + 1))
        x = torch.randn(1, 2, 5, 5)
        y = aspp(x)
    torch.testing.assert_close(y, 3 * x + 30.0)


def test_param_groups_cover_all_params_once():
    m = DeepLabV2("resnet10t", num_classes=3, pretrained=None)
    groups = m.param_groups()
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.aspp.parameters()}


def test_freeze_bn_excludes_bn_params():
    m = DeepLabV2("resnet10t", num_classes=3, pretrained=None)
    m.train()
    m.freeze_bn()
    bns = [mod for mod in m.backbone.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert bns and all(not b.training for b in bns)
    n_bn = sum(p.numel() for b in bns for p in b.parameters())
    n_groups = sum(p.numel() for g in m.param_groups() for p in g["params"])
    assert n_groups == sum(p.numel() for p in m.parameters()) - n_bn
