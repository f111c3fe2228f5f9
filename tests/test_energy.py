"""The dense CRF energy loss (pipeline/methods/common/energy.py) against loops written from the
official rloss code (AFA / MCC ``get_energy_loss``, ``DenseEnergyLossFunction``)."""
import math

import numpy as np
import pytest
import torch

from pipeline.methods.common.energy import bilateral_filter_dense, dense_energy_loss


def _filter_loop(img, vals, s_rgb, s_xy):
    B, K, H, W = vals.shape
    out = np.zeros_like(vals)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                acc = np.zeros(K)
                for yy in range(H):
                    for xx in range(W):
                        d_xy = ((y - yy) ** 2 + (x - xx) ** 2) / (2 * s_xy ** 2)
                        d_c = ((img[b, :, y, x] - img[b, :, yy, xx]) ** 2).sum() / (2 * s_rgb ** 2)
                        acc += math.exp(-d_xy - d_c) * vals[b, :, yy, xx]
                out[b, :, y, x] = acc
    return out


def _energy_loop(img, probs, label, roi, weight, s_rgb, s_xy):
    """Official DenseEnergyLossFunction at scale 1: value and the gradient it back-propagates."""
    B = probs.shape[0]
    gate = roi - probs.max(1)
    gate[label == 255] = 1
    gate[gate < 0] = 0
    s = probs * roi[:, None]
    a_s = _filter_loop(img, s, s_rgb, s_xy) * gate[:, None]
    value = -(s * a_s).sum() / B
    grad = -2 * a_s / B * roi[:, None]
    return weight * value, weight * grad


def _case(seed=0, B=2, K=3, H=4, W=5):
    g = np.random.default_rng(seed)
    img = g.uniform(0, 255, (B, 3, H, W))
    logits = g.normal(size=(B, K, H, W))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    label = g.integers(0, K, (B, H, W))
    label[:, 0, :2] = 255
    roi = np.ones((B, H, W))
    roi[1, :, -1] = 0                                   # a crop box that ends early
    return img, probs, label, roi


@pytest.mark.parametrize("block", [3, 2048])
def test_bilateral_filter_matches_loop(block):
    img, probs, _, _ = _case()
    got = bilateral_filter_dense(torch.tensor(img), torch.tensor(probs), 40.0, 2.0, block)
    np.testing.assert_allclose(got.numpy(), _filter_loop(img, probs, 40.0, 2.0), rtol=1e-10)


def test_energy_value_and_official_backward_match_loop():
    img, probs, label, roi = _case(1)
    p = torch.tensor(probs, requires_grad=True)
    loss = dense_energy_loss(torch.tensor(img), p, torch.tensor(label), torch.tensor(roi),
                             weight=1e-3, sigma_rgb=40.0, sigma_xy=2.0, scale_factor=1.0)
    want, want_grad = _energy_loop(img, probs, label, roi, 1e-3, 40.0, 2.0)
    assert loss.item() == pytest.approx(want, rel=1e-10) and loss.item() < 0
    loss.backward()
    np.testing.assert_allclose(p.grad.numpy(), want_grad, rtol=1e-10, atol=1e-18)
    assert (p.grad[1, :, :, -1] == 0).all()            # nothing flows outside the crop box


def test_energy_scale_factor_resizes_like_the_official_layer():
    # scale 0.5: image / ROI / label nearest, probabilities bilinear, sigma_xy halved
    img, probs, label, roi = _case(2, H=8, W=6)
    got = dense_energy_loss(torch.tensor(img), torch.tensor(probs), torch.tensor(label),
                            torch.tensor(roi), weight=1.0, sigma_rgb=30.0, sigma_xy=4.0,
                            scale_factor=0.5).item()
    tf = torch.nn.functional
    si = tf.interpolate(torch.tensor(img), scale_factor=0.5, recompute_scale_factor=True).numpy()
    sp = tf.interpolate(torch.tensor(probs), scale_factor=0.5, mode="bilinear",
                        align_corners=False, recompute_scale_factor=True).numpy()
    sr = roi[:, ::2, ::2]
    sl = label[:, ::2, ::2]                              # nearest at 0.5 takes even rows/cols
    want, _ = _energy_loop(si, sp, sl, sr, 1.0, 30.0, 2.0)
    assert got == pytest.approx(want, rel=1e-10)


def test_energy_prefers_segments_that_follow_the_colours():
    # two colour halves, every pixel unlabelled (gate 1): -S^T W S is lower for a hard
    # segmentation along the colour edge than for one across it
    H, W = 6, 8
    img = torch.zeros(1, 3, H, W)
    img[:, :, :, W // 2:] = 200.0
    along = torch.zeros(1, 2, H, W)
    along[:, 0, :, :W // 2] = 1
    along[:, 1, :, W // 2:] = 1
    across = torch.zeros(1, 2, H, W)
    across[:, 0, :H // 2] = 1
    across[:, 1, H // 2:] = 1
    label = torch.full((1, H, W), 255)
    kw = dict(weight=1.0, sigma_rgb=15.0, sigma_xy=100.0, scale_factor=1.0)
    assert dense_energy_loss(img, along, label, **kw) < dense_energy_loss(img, across, label, **kw)


def test_energy_errors():
    img, probs, label, _ = _case()
    with pytest.raises(ValueError, match="must"):
        dense_energy_loss(torch.tensor(img), torch.tensor(probs), torch.tensor(label[:, :2]))
    with pytest.raises(ValueError, match="scale_factor"):
        dense_energy_loss(torch.tensor(img), torch.tensor(probs), torch.tensor(label),
                          scale_factor=0)
    with pytest.raises(ValueError, match="sigma"):
        bilateral_filter_dense(torch.tensor(img), torch.tensor(probs), 0.0, 1.0)


def test_energy_runs_in_float32_for_half_inputs():
    # bf16 probabilities (AMP) are summed over n^2 weights in float32, gradients flow back
    img, probs, label, roi = _case(3)
    p32 = torch.tensor(probs, dtype=torch.float32)
    p16 = p32.to(torch.bfloat16).requires_grad_()
    kw = dict(weight=1.0, sigma_rgb=40.0, sigma_xy=2.0, scale_factor=1.0)
    got = dense_energy_loss(torch.tensor(img), p16, torch.tensor(label), **kw)
    assert got.dtype == torch.float32
    want = dense_energy_loss(torch.tensor(img), p16.detach().float(), torch.tensor(label), **kw)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    assert p16.grad is not None and p16.grad.dtype == torch.bfloat16
