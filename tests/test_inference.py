"""pipeline.engine.inference.multiscale_flip against brute-force loops (one forward per pass,
F.interpolate per pass, every merge written out), and the AFA / MCC seed export against the
official ``multi_scale_cam`` semantics (rulixiang/afa, rulixiang/ToCo ``utils/camutils.py``)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.io.config import load_params, stage_params
from pipeline.data.transforms import to_tensor
from pipeline.engine.inference import OFFICIAL_MS_CAM, multiscale_flip
from pipeline.methods import get_method
from pipeline.methods.afa.model import AFANet
from pipeline.methods.mcc.model import MCCNet
from pipeline.steps.seeds import multiscale_maps
from vit_reference import tiny_afa, tiny_mcc


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(6, 4, 3, stride=2, padding=1)).eval()


def brute(forward, x, scales, flips, size_of, relu, softmax, align, flip_merge, scale_merge, norm,
          eps=1e-5):
    """Written out: one forward per (scale, flip), upsample, flip back, merges as lists."""
    B, _, H, W = x.shape
    per_scale = []
    npass = 0
    for s in scales:
        h, w = size_of(s)
        xs = x if (h, w) == (H, W) and s == 1.0 and size_of.keeps_unit else \
            F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        maps = []
        for f in flips:
            m = forward(xs.flip(-1) if f else xs)
            npass += 1
            if relu == "before_upsample":
                m = m.clamp(min=0)
            m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=align).float()
            if softmax:
                m = m.exp() / m.exp().sum(1, keepdim=True)
            if f:
                m = m.flip(-1)
            if relu == "after_upsample":
                m = m.clamp(min=0)
            maps.append(m)
        st = torch.stack(maps)
        m = {"sum": st.sum(0), "mean": st.mean(0), "max": st.max(0).values}[flip_merge]
        if relu == "after_flip_merge":
            m = m.clamp(min=0)
        per_scale.append(m)
    st = torch.stack(per_scale)
    acc = {"sum": st.sum(0), "mean": st.mean(0), "max": st.max(0).values}[scale_merge]
    if norm == "passes":
        return acc / npass
    if norm == "none":
        return acc
    mx = acc.flatten(2).max(2).values[..., None, None]
    mn = acc.flatten(2).min(2).values[..., None, None] if norm == "minmax" else 0
    return (acc - mn) / (mx - mn + eps)


class Size:
    def __init__(self, H, W, kind, stride=4, base=None):
        self.H, self.W, self.kind, self.stride = H, W, kind, stride
        self.base = base or (H, W)
        self.keeps_unit = kind != "stride" and self.base == (H, W)

    def __call__(self, s):
        H0, W0 = self.base
        if self.kind == "stride":
            st = self.stride
            return max(st, round(H0 * s / st) * st), max(st, round(W0 * s / st) * st)
        if self.kind == "round":
            return max(1, round(H0 * s)), max(1, round(W0 * s))
        return int(s * H0), int(s * W0)


CASES = [  # (options, brute-force extras)
    dict(resize="stride", stride=4, relu="after_upsample", flip_merge="sum", scale_merge="sum",
         fold="flat", norm="passes"),                                     # seeds, ViT-PCM mean
    dict(resize="stride", stride=4, relu="before_upsample", flip_merge="sum", scale_merge="sum",
         fold="flat", norm="minmax", base_size=(24, 24), align_corners=True),   # legacy AFA, ACR square
    dict(resize="stride", stride=4, flip_merge="mean", scale_merge="max"),         # own head, max
    dict(resize="stride", stride=4, flip_merge="mean", scale_merge="mean"),        # own head, mean
    dict(resize="round", flip_batch=True, softmax=True, flip_merge="sum", scale_merge="sum",
         norm="passes"),                                                  # DeepLab predict
    dict(flip_batch=True, **OFFICIAL_MS_CAM),                             # official multi_scale_cam
    dict(resize="floor", relu="after_flip_merge", flip_merge="max", scale_merge="max", norm="max"),
]


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize("flips", [(False, True), (False,), (True,)])
def test_multiscale_flip_matches_brute_force(opts, flips):
    net = _net()
    x = torch.randn(2, 3, 20, 28, generator=torch.Generator().manual_seed(0))
    scales = [1.0, 0.5, 1.5]
    got = multiscale_flip(net, x, scales, flips=flips, **opts)
    size = Size(20, 28, opts["resize"], opts.get("stride", 4), opts.get("base_size"))
    exp = brute(net, x, scales, flips, size, opts.get("relu", "none"), opts.get("softmax", False),
                opts.get("align_corners", False), opts["flip_merge"], opts["scale_merge"],
                opts.get("norm", "none"), opts.get("norm_eps", 1e-5))
    assert got.dtype == torch.float32 and got.shape == (2, 4, 20, 28)
    torch.testing.assert_close(got, exp, rtol=2e-6, atol=2e-6)


def test_dict_outputs_on_pass_and_errors():
    net = _net()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    seen = []
    got = multiscale_flip(lambda b: {"a": net(b), "b": -net(b)}, x, [1.0, 0.5], flip_batch=True,
                          resize="round", relu="after_flip_merge", flip_merge="max",
                          on_pass=lambda s, f, m: seen.append((s, f, sorted(m))))
    for key, sign in (("a", 1), ("b", -1)):
        exp = brute(lambda b: sign * net(b), x, [1.0, 0.5], (False, True), Size(16, 16, "round"),
                    "after_flip_merge", False, False, "max", "sum", "none")
        torch.testing.assert_close(got[key], exp)
    assert seen == [(1.0, False, ["a", "b"]), (1.0, True, ["a", "b"]),
                    (0.5, False, ["a", "b"]), (0.5, True, ["a", "b"])]
    with pytest.raises(ValueError, match="fold"):
        multiscale_flip(net, x, [1.0], resize="round", flip_merge="max", fold="flat")
    with pytest.raises(ValueError, match="relu"):
        multiscale_flip(net, x, [1.0], resize="round", relu="later")
    with pytest.raises(ValueError):
        multiscale_flip(net, x, [], resize="round")


# --------------------------------------------------------------- AFA / MCC seed export
def _export_inputs(img, scales, stride):
    """The export's resized inputs, one per scale: sides rounded to multiples of the stride."""
    H, W = img.shape[:2]
    x = to_tensor(img)[None]
    for s in scales:
        h = max(stride, round(H * s / stride) * stride)
        w = max(stride, round(W * s / stride) * stride)
        yield F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def _minmax(total, eps):
    """Per class (m - min) / (max - min + eps) of a (K, H, W) map."""
    mn = total.flatten(1).min(1).values[:, None, None]
    mx = total.flatten(1).max(1).values[:, None, None]
    return (total - mn) / (mx - mn + eps)


def camutils_reference(cam_fn, img, scales, stride=4, eps=1e-5):
    """multi_scale_cam (camutils.py): per scale the raw CAM of the image and of its flip,
    upsampled (bilinear, align_corners=False), max(image, flip back), ReLU; summed over
    scales; per class (m - min) / (max - min + 1e-5). Input sizes: the export's (multiples
    of the token stride)."""
    H, W = img.shape[:2]
    total = 0
    for xs in _export_inputs(img, scales, stride):
        up = lambda c: F.interpolate(c[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        a = up(cam_fn(xs))
        b = up(cam_fn(xs.flip(-1))).flip(-1)
        total = total + F.relu(torch.max(a, b))
    return _minmax(total, eps)


def legacy_reference(cam_fn, img, scales, stride=4, eps=1e-5):
    """The previous export: ReLU at the token grid, each pass upsampled, summed over flips
    and scales, min-max."""
    H, W = img.shape[:2]
    total = 0
    for xs in _export_inputs(img, scales, stride):
        for f in (False, True):
            m = F.interpolate(F.relu(cam_fn(xs.flip(-1) if f else xs))[None], size=(H, W),
                              mode="bilinear", align_corners=False)[0]
            total = total + (m.flip(-1) if f else m)
    return _minmax(total, eps)


def _afa():
    torch.manual_seed(0)
    net = AFANet(tiny_afa(), 20).eval()
    return net, {"cams": lambda xs: net.cams(xs)[0][0, FG]}


def _mcc():
    torch.manual_seed(0)
    net = MCCNet(tiny_mcc(), 20).eval()
    return net, {"cams": lambda xs: net.cams(xs)[0][0, FG],
                 "cams_aux": lambda xs: net.cams(xs)[1][0, FG]}


FG = torch.tensor([1, 3, 7])


@pytest.mark.parametrize("name,build", [("afa", _afa), ("mcc", _mcc)])
def test_afa_mcc_seed_export_is_official_multi_scale_cam(name, build):
    p = stage_params(load_params(), "voc", name, "export_seeds")
    assert p["norm"] == "minmax" and p["flip"] is True
    assert p["ms_flip_merge"] == "max" and p["ms_relu"] == "after_flip_merge"
    p = {**p, "scales": [1.0, 0.5, 1.5], "aff_radius": 2}
    net, cams = build()
    img = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    meth = get_method(name)
    with torch.no_grad():
        for q in (p, {"scales": p["scales"], "norm": "minmax", "aff_radius": 2}):  # params / class default
            got = multiscale_maps(meth, net, img, FG, q, torch.device("cpu"))
            for key, fn in cams.items():
                exp = camutils_reference(fn, img, p["scales"])
                torch.testing.assert_close(got[key], exp, rtol=1e-5, atol=1e-5)
        old = multiscale_maps(meth, net, img, FG, {**p, "ms_flip_merge": "sum",
                                                   "ms_relu": "before_upsample"}, torch.device("cpu"))
        for key, fn in cams.items():
            exp = legacy_reference(fn, img, p["scales"])
            torch.testing.assert_close(old[key], exp, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(old[key], got[key], atol=1e-3)   # the two forms differ
    with pytest.raises(ValueError, match="ms_flip_merge"):
        multiscale_maps(meth, net, img, FG, {**p, "ms_flip_merge": "mean"}, torch.device("cpu"))
