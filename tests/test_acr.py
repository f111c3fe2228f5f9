"""ACR equations against independent constructions (paper Eq. 1-8)."""
import numpy as np
import pytest
import torch

from pipeline.methods.acr import (ACR, acr_maps, consistency_losses, invert_class_attention,
                                  invert_patch_attention)
from pipeline.methods.common.tokens import transform_image
from pipeline.methods.base import ViTClassifier
from pipeline.models.vit import attentions
from vit_reference import fd_grad_per_head, tiny_vit


def perm_matrix(order):
    n = len(order)
    P = np.zeros((n, n))
    P[np.arange(n), order] = 1
    return P


def commutation(h, w):
    """K with vec_rowmajor(X^T) = K vec_rowmajor(X) for X of shape (h, w)."""
    K = np.zeros((h * w, h * w))
    for r in range(h):
        for c in range(w):
            K[c * h + r, r * w + c] = 1
    return K


def token_matrix(h, w, t):
    """Pi with tokens(view) = Pi tokens(original), from Eq. 3-4 via Kronecker products:
    row-major vec(P_h X P_w) = (P_h kron P_w^T) vec(X); rotation inserts the transpose (C)."""
    Jh, Jw = perm_matrix(list(range(h))[::-1]), perm_matrix(list(range(w))[::-1])
    Ih, Iw = np.eye(h), np.eye(w)
    if t == "hflip":      # X' = X J_w
        return np.kron(Ih, Jw.T)
    if t == "vflip":      # X' = J_h X
        return np.kron(Jh, Iw)
    if t == "rot90":      # torch.rot90 k=1: X' = J_w X^T  (shape w x h)
        return np.kron(Jw, Ih) @ commutation(h, w)
    if t == "rot270":     # X' = X^T J_h
        return np.kron(Iw, Jh.T) @ commutation(h, w)
    raise ValueError(t)


@pytest.mark.parametrize("t", ["hflip", "vflip", "rot90", "rot270"])
@pytest.mark.parametrize("h,w", [(3, 4), (5, 5), (2, 7)])
def test_token_permutation_matches_kronecker_form(t, h, w):
    Pi = token_matrix(h, w, t)
    X = torch.arange(h * w, dtype=torch.float64).view(h, w) * 1.7 + 3
    # the image transform moves tokens exactly like Pi (Eq. 3/4)
    assert np.allclose(transform_image(X, t).reshape(-1).numpy(), Pi @ X.reshape(-1).numpy())
    # f^{-1}(A') = Pi^T A' Pi  (Eq. 5), A' an arbitrary attention of the view
    rng = np.random.default_rng(0)
    A2 = rng.random((h * w, h * w))
    expect = Pi.T @ A2 @ Pi
    got = invert_patch_attention(torch.tensor(A2)[None], t, (h, w), (h * w, 1))[0].numpy()
    assert np.allclose(got, expect)
    a2 = rng.random(h * w)
    got_c = invert_class_attention(torch.tensor(a2)[None], t, (h, w), (0, 0))[0].numpy()
    assert np.allclose(got_c, Pi.T @ a2)


def test_attention_of_equivariant_map_is_restored():
    """If view-2 attention is exactly the permuted view-1 attention, L_act = L_aff = 0;
    the class token (index 0) is never permuted."""
    h, w, B = 4, 3, 2
    n = h * w
    A = torch.rand(B, 2, n + 1, n + 1).softmax(-1)
    for t in ["hflip", "rot90", "vflip"]:
        Pi = torch.tensor(token_matrix(h, w, t), dtype=A.dtype)
        P_full = torch.block_diag(torch.eye(1), Pi)
        A2 = P_full @ A @ P_full.T          # attention of the transformed token sequence
        gv = (w, h) if t == "rot90" else (h, w)
        la, lf = consistency_losses([A], [A2], t, (h, w), gv)
        assert la.item() < 1e-6 and lf.item() < 1e-6
        # a wrong inverse (no inverse) gives a positive loss
        la_bad, _ = consistency_losses([A], [A2], "vflip" if t != "vflip" else "hflip", (h, w), gv)
        assert la_bad.item() > 1e-4


def test_rescale_inverse_preserves_mass_and_identity():
    h, w = 4, 6
    A = torch.rand(3, h * w, h * w).softmax(-1)
    same = invert_patch_attention(A, "rescale", (h, w), (h, w))
    assert torch.allclose(same, A, atol=1e-6)
    # a 2x larger view: constant attention 1/n' maps back to constant 1/n
    hv, wv = 8, 12
    U = torch.full((1, hv * wv, hv * wv), 1.0 / (hv * wv))
    back = invert_patch_attention(U, "rescale", (h, w), (hv, wv))
    assert back.shape == (1, h * w, h * w)
    assert torch.allclose(back, torch.full_like(back, 1.0 / (h * w)), atol=1e-6)
    c = invert_class_attention(U[:, 0], "rescale", (h, w), (hv, wv))
    assert torch.allclose(c.sum(-1), torch.ones(1), atol=1e-5)


def test_l1_reductions_by_hand():
    A1 = torch.zeros(1, 1, 3, 3)
    A2 = torch.zeros(1, 1, 3, 3)
    A2[0, 0, 1, 2] = 0.5      # one patch-patch difference (patch 0 -> patch 1)
    A2[0, 0, 0, 1] = 0.25     # one class-patch difference
    la, lf = consistency_losses([A1], [A2], "rescale", (1, 2), (1, 2), reduction="sum")
    assert la.item() == pytest.approx(0.25) and lf.item() == pytest.approx(0.5)
    la, lf = consistency_losses([A1], [A2], "rescale", (1, 2), (1, 2), reduction="row")
    assert la.item() == pytest.approx(0.25) and lf.item() == pytest.approx(0.25)  # 0.5 / 2 rows
    la, lf = consistency_losses([A1], [A2], "rescale", (1, 2), (1, 2), reduction="mean")
    assert la.item() == pytest.approx(0.125) and lf.item() == pytest.approx(0.125)


TINY = {"backbone": tiny_vit(patch=8, dim=24, depth=3)}


def test_eq7_eq8_paper_form_against_finite_differences():
    """The paper-literal options (Eq. 7 head mean then ReLU of the layer mean; Eq. 8 row
    vector x mean attention of the same blocks); the official default form is tested in
    tests/test_acr_official.py."""
    torch.manual_seed(0)
    model = ViTClassifier({**TINY, "head": "cls_token"}, 5).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    fg = torch.tensor([1, 3])
    out = acr_maps(model, x, fg, layers=[-2, -1], grad_head_reduce="mean_then_relu",
                   layer_reduce="mean", eq8_form="paper")
    # finite differences of y_c w.r.t. each head's A[0, 1 + j] in blocks 1 and 2; Eq. 7's
    # paper form takes the head mean of the gradient
    n = 16
    fd = torch.stack([torch.stack([fd_grad_per_head(model, x, b, int(c)).mean(0) for b in (1, 2)])
                      for c in fg])                      # (class, layer, patch)
    expect_star = fd.mean(1).clamp_min(0)                 # ReLU(mean over layers)
    assert torch.allclose(out["cams_star"].reshape(2, n), expect_star, atol=1e-6)
    # Eq. 8: M = M* x mean_l A_l[1:, 1:] (head-averaged)
    with torch.no_grad():
        model(x)
    att = attentions(model.vit)
    aff = torch.stack([att[i][0].mean(0)[1:, 1:] for i in (1, 2)]).mean(0)
    assert torch.allclose(out["cams"].reshape(2, n), expect_star @ aff, atol=1e-6)


def test_acr_loss_backpropagates_through_attention():
    torch.manual_seed(0)
    m = ACR()
    model = m.build_model(TINY, 5)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 5)
    y[:, 2] = 1
    g = torch.Generator().manual_seed(0)
    loss, parts = m.loss(model, x, y, {**TINY, "transforms": ["rot90"], "alpha": 0.0, "beta": 5.0,
                                       "reduction": "row"}, g)
    loss.backward()
    qkv = model.vit.blocks[0].attn.inner.qkv.weight.grad
    assert qkv is not None and qkv.abs().sum() > 0
    assert parts["aff"] > 0 and set(parts) == {"cls", "act", "aff"}
