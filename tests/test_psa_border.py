"""The random walk's image border (``refine_seeds.border``) against a loop reference of the
official ``infer_aff.py`` (jiwoon-ahn/psa): the normalised image is zero-padded at the bottom /
right to a multiple of 8 (``F.pad(img, p2d)``) before the AffinityNet forward, and the CAM stack
``[(1 - max)^alpha; cams]`` is zero-padded likewise (``np.pad(..., mode='constant')``) and
pooled by ``F.avg_pool2d(8, 8)``, so a partial border cell is its pixels' sum / 64. The
reference pools with explicit loops and shares no code with ``refine_with_features``."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.transforms import to_tensor
from pipeline.io.settings import RefineSeeds
from pipeline.steps.refine.affinity_net import AffinityNet
from pipeline.steps.refine.random_walk import random_walk_dense, refine_maps, refine_with_features

WALK = dict(radius=3, beta=8, logt=3, bg_alpha=4)


def ref_pooled(cams, alpha, border):
    """infer_aff.py's pooled CAM stack by loops: channel 0 ``(1 - max cams)^alpha`` at full
    resolution, then per 8 x 8 cell the sum of its image pixels divided by 64 (``pad``: the
    zero padding counts) or by the number of its image pixels (``valid``)."""
    k, H, W = cams.shape
    full = np.zeros((k + 1, H, W), np.float64)
    full[1:] = cams
    full[0] = (1.0 - cams.max(0)) ** alpha
    h, w = -(-H // 8), -(-W // 8)
    out = np.zeros((k + 1, h, w), np.float64)
    for i in range(h):
        for j in range(w):
            block = full[:, 8 * i:8 * i + 8, 8 * j:8 * j + 8]
            n = 64 if border == "pad" else block.shape[1] * block.shape[2]
            out[:, i, j] = block.sum(axis=(1, 2)) / n
    return out


def ref_refined(f, cams, border):
    """The walk (the dense official form, tested in test_psa_official.py) on the reference
    pooling, bilinear upsampling to the padded size, crop, per-pixel normalisation."""
    k, H, W = cams.shape
    pooled = torch.from_numpy(ref_pooled(cams, WALK["bg_alpha"], border)).float()
    rw = random_walk_dense(f, pooled, WALK["radius"], WALK["beta"], WALK["logt"])
    h, w = rw.shape[1:]
    up = F.interpolate(rw[None], size=(8 * h, 8 * w), mode="bilinear",
                       align_corners=False)[0, :, :H, :W].clamp_min(0)
    return (up / up.sum(0, keepdim=True)).numpy()


@pytest.mark.parametrize("H,W", [(37, 45), (40, 43), (33, 48)])
def test_pooling_matches_the_official_border(H, W):
    rng = np.random.default_rng(H * W)
    cams = rng.random((2, H, W)).astype(np.float32)
    cams[:, -3:, :] = 0.95                   # strong values in the partial border cells
    f = torch.from_numpy(rng.random((5, -(-H // 8), -(-W // 8)))).float()
    for border in ("pad", "valid"):
        got = refine_with_features(f, cams, (H, W), dict(WALK, border=border))
        np.testing.assert_allclose(got, ref_refined(f, cams, border), atol=2e-5)
    # the two forms differ exactly where a cell is partial (here the bottom row of cells)
    pad = ref_pooled(cams, WALK["bg_alpha"], "pad")
    valid = ref_pooled(cams, WALK["bg_alpha"], "valid")
    assert not np.allclose(pad[:, -1], valid[:, -1])
    np.testing.assert_allclose(pad[:, :H // 8, :W // 8], valid[:, :H // 8, :W // 8])


def test_refine_maps_pads_the_normalised_image():
    torch.manual_seed(0)
    net = AffinityNet("resnet10t", None, feature_dim=14).eval()
    seen = []
    grad = []

    def record(module, args):            # returns None: the forward's inputs stay as given
        seen.append(args[0].clone())
        grad.append(torch.is_grad_enabled())

    net.register_forward_pre_hook(record)
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    cams = rng.random((1, 37, 45)).astype(np.float32)
    out = refine_maps(net, img, cams, dict(WALK))           # default: the official padding
    x = seen[-1]
    assert grad == [False]                                  # the walk builds no autograd graph
    assert x.shape == (1, 3, 40, 48)
    torch.testing.assert_close(x[0, :, :37, :45], to_tensor(img))
    assert (x[0, :, 37:] == 0).all() and (x[0, :, :, 45:] == 0).all()
    with torch.no_grad():
        f = net(x)[0]
    np.testing.assert_allclose(out, refine_with_features(f, cams, (37, 45), dict(WALK)),
                               atol=1e-6)
    refine_maps(net, img, cams, dict(WALK, border="valid"))
    assert seen[-1].shape == (1, 3, 37, 45)
    torch.testing.assert_close(seen[-1][0], to_tensor(img))


def test_border_default_and_bad_value():
    assert RefineSeeds.of({}).border == "pad"
    with pytest.raises(ValueError, match="border"):
        RefineSeeds.of({"border": "reflect"})
