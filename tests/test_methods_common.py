"""Shared method helpers (pipeline/methods/common: PAR, CAM-to-label, token affinity) and AFA's
losses (pipeline/methods/afa/losses.py) against independent brute-force constructions: explicit
loops over pixels / pairs, dense formulas, hand-computed values."""
import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.methods.afa.losses import affinity_loss_afa
from pipeline.methods.common.cam_labels import cam_to_label, combine_high_low, refine_cams_with_bkg
from pipeline.methods.common.par import PAR, dilated_neighbours
from pipeline.methods.common.token_affinity import (affinity_label_from_seg, propagate_affinity,
                                                    propagate_cams_with_bkg, radius_mask,
                                                    transition_matrix)

OFFS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


# ------------------------------------------------------------------------------ PAR (Eq. 8-10)

def par_reference(img, masks, dilations, iters, w1, w2, w3):
    """Eq. 8-10 with Python loops, float64, replicate padding = clamped coordinates."""
    img = np.asarray(img, np.float64)[0]       # (3, H, W)
    m = np.asarray(masks, np.float64)[0]       # (K, H, W)
    _, H, W = img.shape
    nbrs = [(dy * d, dx * d) for d in dilations for dy, dx in OFFS]
    dist = np.array([math.hypot(a, b) for a, b in nbrs])
    s_pos = dist.std(ddof=1)
    kpos = -(dist / (w2 * s_pos)) ** 2
    spos = np.exp(kpos) / np.exp(kpos).sum()
    ker = np.zeros((H, W, len(nbrs)))
    for i, j in itertools.product(range(H), range(W)):
        vals = np.array([img[:, min(max(i + a, 0), H - 1), min(max(j + b, 0), W - 1)]
                         for a, b in nbrs])            # (N, 3)
        std = vals.std(0, ddof=1)                       # per channel
        krgb = -(((np.abs(vals - img[:, i, j]) / (w1 * std)) ** 2).mean(1))
        srgb = np.exp(krgb) / np.exp(krgb).sum()
        ker[i, j] = srgb + w3 * spos
    for _ in range(iters):
        new = np.zeros_like(m)
        for i, j in itertools.product(range(H), range(W)):
            for n, (a, b) in enumerate(nbrs):
                new[:, i, j] += ker[i, j, n] * m[:, min(max(i + a, 0), H - 1), min(max(j + b, 0), W - 1)]
        m = new
    return m


def test_dilated_neighbours_order_and_padding():
    x = torch.arange(20.).view(1, 1, 4, 5)
    nb = dilated_neighbours(x, [1, 2])
    assert nb.shape == (1, 1, 16, 4, 5)
    # pixel (1, 1), dilation 1, offset (-1, -1) -> (0, 0); dilation 2, offset (1, 1) -> (3, 3)
    assert nb[0, 0, 0, 1, 1] == x[0, 0, 0, 0] and nb[0, 0, 8 + 7, 1, 1] == x[0, 0, 3, 3]
    # replicate padding: pixel (0, 4), dilation 2, offset (-1, 1) -> clamped (0, 4)
    assert nb[0, 0, 8 + 2, 0, 4] == x[0, 0, 0, 4]


@pytest.mark.parametrize("w2", [0.3, 0.7])
def test_par_matches_loop_reference(w2):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 6, 7, generator=g, dtype=torch.float64)
    masks = torch.rand(1, 2, 6, 7, generator=g, dtype=torch.float64)
    par = PAR(dilations=[1, 2], num_iter=3, w1=0.3, w2=w2, w3=0.05, variant="paper")
    got = par(img, masks).numpy()[0]
    ref = par_reference(img.numpy(), masks.numpy(), [1, 2], 3, 0.3, w2, 0.05)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)


def test_par_code_variant_uses_w1_for_position():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 5, 5, generator=g, dtype=torch.float64)
    masks = torch.rand(1, 2, 5, 5, generator=g, dtype=torch.float64)
    code = PAR([1, 2], 2, w1=0.3, w2=0.9, w3=0.5, variant="code")(img, masks).numpy()[0]
    np.testing.assert_allclose(code, par_reference(img.numpy(), masks.numpy(), [1, 2], 2, 0.3, 0.3, 0.5),
                               rtol=1e-6)
    paper = PAR([1, 2], 2, w1=0.3, w2=0.9, w3=0.5, variant="paper")(img, masks).numpy()[0]
    assert not np.allclose(code, paper)       # the scales differ -> results differ
    with pytest.raises(ValueError):
        PAR(variant="other")


def test_par_preserves_constant_maps_and_mass_factor():
    """Each kernel row sums to 1 + w3, so a constant map c becomes c (1 + w3)^iters."""
    img = torch.rand(2, 3, 9, 8)
    par = PAR([1, 2, 4], num_iter=4, w3=0.01)
    k = par.kernel(img)
    torch.testing.assert_close(k.sum(2), torch.full_like(k.sum(2), 1.01))
    out = par(img, torch.full((2, 1, 9, 8), 0.5))
    torch.testing.assert_close(out, torch.full_like(out, 0.5 * 1.01 ** 4))


# ---------------------------------------------------------------------- Eq. 4 / high-low

def test_cam_to_label_hand_values():
    cams = torch.tensor([[[[0.9, 0.5, 0.2, 0.55]], [[0.1, 0.45, 0.3, 0.35]], [[0.95, 0.9, 0.9, 0.9]]]])
    y = torch.tensor([[1., 1., 0.]])           # class 2 absent: masked out
    lab = cam_to_label(cams, y, bg_high=0.55, bg_low=0.35)
    # 0.9 -> 1; 0.5 between; 0.3 <= 0.35; 0.55 == β_h is uncertain (official `<=high_thre`)
    assert lab.tolist() == [[[1, 255, 0, 255]]]
    assert cam_to_label(cams, y, 0.5499, 0.35).tolist() == [[[1, 255, 0, 1]]]
    assert cam_to_label(cams, y, 0.55, 0.3).tolist() == [[[1, 255, 0, 255]]]   # 0.3 <= β_l
    lab2 = cam_to_label(cams, torch.ones(1, 3), 0.7, 0.25)
    assert lab2.tolist() == [[[3, 3, 3, 3]]]
    with pytest.raises(ValueError):
        cam_to_label(cams, y, 0.3, 0.5)


def test_combine_high_low():
    hi = torch.tensor([0, 0, 3, 2])
    lo = torch.tensor([0, 5, 3, 0])
    assert combine_high_low(hi, lo).tolist() == [0, 255, 3, 2]


def test_refine_cams_with_bkg_identity_par_equals_thresholding():
    """With a PAR that does nothing (0 iterations) and no downsampling, the refined label is
    the argmax of softmax([β; cams]) = Eq. 4's thresholds."""
    torch.manual_seed(0)
    cams = torch.rand(2, 4, 6, 6)
    y = torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0]])
    par = PAR([1], num_iter=0)
    got = refine_cams_with_bkg(par, torch.rand(2, 3, 6, 6), cams, y, 0.55, 0.35, down_scale=1)
    v, idx = (cams * y[:, :, None, None]).max(1)
    exp = torch.full_like(idx, 255)
    exp[v > 0.55] = idx[v > 0.55] + 1
    exp[v < 0.35] = 0
    assert torch.equal(got, exp)


def test_maps_to_par_label_batched_equals_per_image_loop():
    """The batched gather of valid channels = running PAR per image on its valid channels."""
    from pipeline.methods.common.par import maps_to_par_label
    g = torch.Generator().manual_seed(9)
    B, C = 3, 5
    img = torch.rand(B, 3, 12, 10, generator=g, dtype=torch.float64)
    maps = torch.rand(B, C + 1, 6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([[1., 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)
    par = PAR([1, 2], num_iter=3)
    for softmax in (True, False):
        got = maps_to_par_label(par, img, maps, y, softmax, down_scale=2)
        small = torch.nn.functional.interpolate(img, size=(6, 5), mode="bilinear", align_corners=False)
        for b in range(B):
            keys = [0] + [c + 1 for c in range(C) if y[b, c] > 0]
            m = maps[b:b + 1, keys]
            m = m.softmax(1) if softmax else m
            r = torch.nn.functional.interpolate(par(small[b:b + 1], m), size=(12, 10),
                                                mode="bilinear", align_corners=False)
            exp = torch.tensor(keys)[r.argmax(1)[0]]
            assert torch.equal(got[b], exp), (softmax, b)


# ------------------------------------------------------------------------ affinity labels

def radius_mask_loop(h, w, r):
    m = np.zeros((h * w, h * w), bool)
    for i in range(h * w):
        y, x = divmod(i, w)
        for yy in range(max(0, y - r), min(h, y + r + 1)):
            for xx in range(max(0, x - r), min(w, x + r + 1)):
                m[i, yy * w + xx] = m[yy * w + xx, i] = True
    return m


@pytest.mark.parametrize("h,w,r", [(5, 7, 2), (4, 4, 0), (6, 3, 8), (9, 11, 3)])
def test_radius_mask_matches_loop(h, w, r):
    assert np.array_equal(radius_mask(h, w, r).numpy(), radius_mask_loop(h, w, r))


def test_affinity_label_matches_loop():
    g = torch.Generator().manual_seed(3)
    seg = torch.randint(0, 3, (2, 4, 5), generator=g)
    seg[0, 1, 2] = seg[1, 3, 4] = 255
    for radius, diag in [(1, False), (2, True), (None, True)]:
        got = affinity_label_from_seg(seg, radius, ignore_diagonal=diag).numpy()
        flat = seg.reshape(2, -1).numpy()
        for b, i, j in itertools.product(range(2), range(20), range(20)):
            yi, xi = divmod(i, 5)
            yj, xj = divmod(j, 5)
            far = radius is not None and max(abs(yi - yj), abs(xi - xj)) > radius
            if flat[b, i] == 255 or flat[b, j] == 255 or far or (diag and i == j):
                exp = 255
            else:
                exp = int(flat[b, i] == flat[b, j])
            assert got[b, i, j] == exp, (radius, diag, b, i, j)


def test_affinity_loss_afa_eq5():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 6, 6), generator=g)
    lab[lab == 2] = 255
    pos = neg = 0.0
    npos = nneg = 0
    for b, i, j in itertools.product(range(2), range(6), range(6)):
        s = 1 / (1 + math.exp(-a[b, i, j].item()))
        if lab[b, i, j] == 1:
            pos, npos = pos + 1 - s, npos + 1
        elif lab[b, i, j] == 0:
            neg, nneg = neg + s, nneg + 1
    assert affinity_loss_afa(a, lab, "paper").item() == pytest.approx(pos / npos + neg / nneg, rel=1e-12)


# ------------------------------------------------------------------ propagation (Eq. 6-7)

def test_transition_and_propagation_dense_formula():
    g = torch.Generator().manual_seed(5)
    n, K = 12, 3
    a = torch.rand(2, n, n, generator=g, dtype=torch.float64)
    cams = torch.rand(2, K, 3, 4, generator=g, dtype=torch.float64)
    mask = radius_mask(3, 4, 1)
    for alpha, eps, iters in [(2.0, 0.0, 1), (3.0, 0.1, 2)]:
        got = propagate_affinity(cams, a, alpha, iters, mask, eps)
        for b in range(2):
            A = a[b].numpy() ** alpha * mask.numpy()
            D = np.diag(1.0 / (A.sum(1) + eps))
            T = D @ A                                   # Eq. 6
            M = cams[b].reshape(K, -1).numpy().T        # vec(M): (n, K)
            for _ in range(iters):
                M = T @ M                               # Eq. 7
            np.testing.assert_allclose(got[b].reshape(K, -1).numpy().T, M, rtol=1e-10)
    # eps = 0: rows of T sum to 1, so a constant map is a fixed point
    T = transition_matrix(a, 2.0)
    torch.testing.assert_close(T.sum(-1), torch.ones(2, n, dtype=torch.float64))
    # symmetric A: paper's row-normalised T M equals the official cams @ (A / colsum)
    s = a + a.transpose(1, 2)
    off = (cams[0].reshape(K, -1) @ (s[0] ** 2 / (s[0] ** 2).sum(0, keepdim=True))).reshape(K, 3, 4)
    torch.testing.assert_close(propagate_affinity(cams, s)[0], off)
    with pytest.raises(ValueError):
        propagate_affinity(cams, a[:, :5, :5])


def test_propagate_cams_with_bkg_softmax_over_valid():
    g = torch.Generator().manual_seed(6)
    cams = torch.rand(1, 4, 2, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([[0., 1, 0, 1]], dtype=torch.float64)
    a = torch.eye(6, dtype=torch.float64)[None]          # identity: no propagation
    out = propagate_cams_with_bkg(cams, y, a, bg=0.4)
    full = torch.cat([torch.full((1, 1, 2, 3), 0.4, dtype=torch.float64), cams], 1)
    exp = torch.zeros_like(full)
    exp[:, [0, 2, 4]] = full[:, [0, 2, 4]].softmax(1)
    torch.testing.assert_close(out, exp)




def test_par_is_differentiable_and_list_maps_match_separate_calls():
    from pipeline.methods.common.par import maps_to_par_label
    g = torch.Generator().manual_seed(11)
    img = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    m = torch.rand(2, 2, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    par = PAR([1, 2], num_iter=2)
    assert torch.autograd.gradcheck(lambda t: par(img, t), (m,))
    maps = [torch.rand(2, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    y = torch.tensor([[1., 0, 1], [0, 1, 0]], dtype=torch.float64)
    both = maps_to_par_label(par, img, maps, y, True, 2)
    for mp, lab in zip(maps, both):
        assert torch.equal(lab, maps_to_par_label(par, img, mp, y, True, 2))


def test_par_precomputed_kernel_gives_same_labels():
    from pipeline.methods.common.par import par_input
    g = torch.Generator().manual_seed(12)
    img = torch.rand(2, 3, 12, 12, generator=g)
    cams = torch.rand(2, 3, 6, 6, generator=g)
    y = torch.tensor([[1., 1, 0], [0, 0, 1]])
    par = PAR([1, 2], 3)
    k = par.kernel(par_input(img, 2))
    assert torch.equal(refine_cams_with_bkg(par, img, cams, y, kernel=k),
                       refine_cams_with_bkg(par, img, cams, y))
