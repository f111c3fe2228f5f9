"""AFA (pipeline/methods/afa/): Eq. 3 against a per-head loop over the captured attention
logits, the GMP classifier / CAM (Eq. 2), the warm-up schedule of Eq. 12, the propagated
seeds (Eq. 6-7) and a smoke test of the plug-in on a tiny ViT."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import get_method
from pipeline.methods.afa.losses import seg_loss
from pipeline.methods.afa.model import AFANet, minmax, train_time_cams
from pipeline.methods.common.token_affinity import propagate_affinity, radius_mask
from vit_reference import tiny_afa

TINY = {**tiny_afa(), "cam_scales": [1.0], "cam_flip": True}


def _model(**kw):
    torch.manual_seed(0)
    return AFANet({**TINY, **kw}, 20).eval()


def _attention_inputs(m, x, blocks=(1, 2)):
    """One ``m.run(x)`` with the input tokens of the attention of ``blocks`` recorded."""
    feats = {}
    hooks = [m.vit.blocks[i].attn.register_forward_pre_hook(
        lambda mod, args, i=i: feats.__setitem__(i, args[0])) for i in blocks]
    out = m.run(x)
    for h in hooks:
        h.remove()
    return out, feats


def brute_eq3(m, feats, bias, scaled, blocks=(1, 2)):
    """Â_ij = Σ_k w_k (S_k[i, j] + S_k[j, i]) + b over the heads k of ``blocks`` (image 0),
    float64, with S_k = q_k k_kᵀ recomputed by hand from each block's qkv weight and bias
    (``t W^T + b``, split into q / k / v and heads), divided by √d only when ``scaled``."""
    n = feats[blocks[0]].shape[1] - 1
    exp = torch.full((n, n), bias, dtype=torch.float64)
    k = 0
    for blk in blocks:
        inner = m.vit.blocks[blk].attn.inner
        t = feats[blk][0].double()                                  # (N, D) input of attention
        W, b = inner.qkv.weight.double(), inner.qkv.bias.double()
        D, nh = t.shape[1], inner.num_heads
        hd = D // nh
        qkv = t @ W.t() + b                                         # (N, 3D): q | k | v
        for hh in range(nh):
            q = qkv[:, hh * hd:(hh + 1) * hd]
            kk = qkv[:, D + hh * hd:D + (hh + 1) * hd]
            S = torch.zeros(t.shape[0], t.shape[0], dtype=torch.float64)
            for i in range(t.shape[0]):
                for j in range(t.shape[0]):
                    S[i, j] = sum(float(q[i, c]) * float(kk[j, c]) for c in range(hd))
            if scaled:
                S = S / math.sqrt(hd)
            S = S[1:, 1:]                                           # drop the class token
            exp = exp + float(m.aff_proj.weight[0, k]) * (S + S.t())
            k += 1
    return exp


def test_affinity_eq3_unscaled_qk_default_and_scaled_option_loop():
    """Default ``aff_attention: logits_unscaled`` = official wetr/mix_transformer.py
    ``attn_copy`` = ``q @ kᵀ`` without 1/√d; ``logits`` = the paper's QKᵀ/√d (Eq. 1); both
    against a per-head brute force from the blocks' qkv weights."""
    m = _model()
    assert m.aff_attention == "logits_unscaled"                     # in-code default
    with torch.no_grad():
        m.aff_proj.weight.normal_()
        m.aff_proj.bias.fill_(0.3)
    x = torch.randn(1, 3, 16, 16)                                   # 4x4 tokens + class token
    out, feats = _attention_inputs(m, x)
    unscaled = brute_eq3(m, feats, 0.3, scaled=False)
    torch.testing.assert_close(out["aff"][0].double(), unscaled, rtol=1e-4, atol=1e-4)
    assert torch.allclose(out["aff"][0], out["aff"][0].t(), atol=1e-5)      # symmetric
    sc = AFANet({**TINY, "aff_attention": "logits"}, 20).eval()
    sc.load_state_dict(m.state_dict())
    out_s, feats_s = _attention_inputs(sc, x)
    scaled = brute_eq3(sc, feats_s, 0.3, scaled=True)
    torch.testing.assert_close(out_s["aff"][0].double(), scaled, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unscaled, scaled, atol=1e-2)          # head dim 8: √8 apart
    # the softmax variant uses the post-softmax attention instead -> a different Â
    soft = AFANet({**TINY, "aff_attention": "softmax"}, 20).eval()
    soft.load_state_dict(m.state_dict())
    assert not torch.allclose(soft.run(x)["aff"], out["aff"], atol=1e-3)
    with pytest.raises(ValueError, match="aff_attention"):
        AFANet({**TINY, "aff_attention": "qk"}, 20)


def test_gmp_classifier_and_cam_eq2():
    m = _model()
    x = torch.randn(2, 3, 32, 32)
    out = m.run(x)
    f = out["feat"]
    torch.testing.assert_close(out["logits"], f.amax(1) @ m.classifier.weight.t())
    assert m.classifier.bias is None
    cam, _ = m.cams(x)
    # CAM at token (r, c) = W^T F at that token
    torch.testing.assert_close(cam[1, :, 2, 5], m.classifier.weight @ f[1, 2 * 8 + 5])
    assert out["seg"].shape == (2, 21, 8, 8)


def test_train_time_cams_flip_max_and_minmax():
    m = _model()
    x = torch.randn(1, 3, 32, 32)
    got = train_time_cams(m, x, scales=[1.0], flip=True)
    c1, _ = m.cams(x)
    c2, _ = m.cams(x.flip(-1))
    up = lambda c: F.interpolate(c, size=(32, 32), mode="bilinear", align_corners=False)
    raw = F.relu(torch.maximum(up(c1), up(c2).flip(-1)))
    exp = (raw - raw.amin((2, 3), keepdim=True)) / (raw.amax((2, 3), keepdim=True)
                                                    - raw.amin((2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
    assert float(got.min()) >= 0 and float(got.max()) <= 1


def test_seg_loss_modes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 2, 2, generator=g)
    lab = torch.tensor([[[0, 0], [2, 255]]])
    ce = F.cross_entropy(logits, lab, ignore_index=255)
    assert seg_loss(logits, lab, "ce").item() == pytest.approx(ce.item())
    lp = -F.log_softmax(logits, 1)
    bal = 0.5 * ((lp[0, 0, 0, 0] + lp[0, 0, 0, 1]) / 2 + lp[0, 2, 1, 0])
    assert seg_loss(logits, lab, "balanced").item() == pytest.approx(bal.item(), rel=1e-6)
    # default = official utils/losses.py get_seg_loss: (bg_loss + fg_loss) * 0.5
    off = 0.5 * (F.cross_entropy(logits, torch.tensor([[[0, 0], [255, 255]]]), ignore_index=255)
                 + F.cross_entropy(logits, torch.tensor([[[255, 255], [2, 255]]]), ignore_index=255))
    assert seg_loss(logits, lab).item() == pytest.approx(off.item(), rel=1e-6)
    assert seg_loss(logits, lab).item() != pytest.approx(ce.item(), rel=1e-3)


def _afa_batch():
    """The AFA plug-in, a tiny AFA network in train mode, 2 random 32 x 32 images and their
    labels (class 3 in the first, class 7 in the second, 20 classes)."""
    afa = get_method("afa")
    m = afa.build_model(TINY, 20).train()
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 20)
    y[0, 3] = y[1, 7] = 1
    return afa, m, x, y


def test_warmup_schedule_and_loss_terms():
    afa, m, x, y = _afa_batch()
    p = {**TINY, "warmup_cls_iters": 2, "warmup_aff_iters": 2}
    g = torch.Generator()
    l0, parts0 = afa.loss(m, x, y, p, g, it=1)            # classification only
    assert parts0["aff"] == parts0["seg"] == parts0["reg"] == 0.0
    from pipeline.methods.base import multilabel_loss
    assert l0.item() == pytest.approx(multilabel_loss(m(x), y).item(), rel=1e-5)
    l1, parts1 = afa.loss(m, x, y, p, g, it=2)            # + seg (refined) + aff + reg
    assert parts1["prop"] == 0.0 and parts1["aff"] > 0 and parts1["seg"] > 0
    exp = parts1["cls"] + 0.1 * parts1["seg"] + 0.1 * parts1["aff"] + 0.01 * parts1["reg"]
    assert l1.item() == pytest.approx(exp, rel=1e-5)
    l1.backward()
    assert m.aff_proj.weight.grad is not None and m.decoder.cls.weight.grad is not None
    assert m.vit.blocks[0].attn.inner.qkv.weight.grad is not None
    assert afa.loss(m, x, y, p, g, it=3)[1]["prop"] == 0.0  # last refined-target iteration
    _, parts2 = afa.loss(m, x, y, p, g, it=4)              # propagated segmentation target
    assert parts2["prop"] == 1.0
    groups = afa.param_groups(m, {"head_lr_mult": 10})
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_maps_and_segment():
    afa = get_method("afa")
    m = _model()
    x = torch.randn(1, 3, 32, 32)
    fg = torch.tensor([3, 5])
    p = {"alpha": 2.0, "aff_radius": 2}
    out = afa.maps(m, x, fg, p)
    assert out["cams"].shape == (2, 8, 8) and (out["cams"] >= 0).all()
    cam, aff = m.cams(x)
    exp = propagate_affinity(minmax(F.relu(cam[:, fg])), torch.sigmoid(aff), 2.0, 1,
                             radius_mask(8, 8, 2), 0.1)               # default prop_eps: official
    torch.testing.assert_close(out["cams_aff"], exp[0])
    paper = afa.maps(m, x, fg, {**p, "prop_eps": 0.0})["cams_aff"]
    assert not torch.allclose(paper, out["cams_aff"], atol=1e-4)
    assert afa.segment(m, x, {}).shape == (1, 21, 8, 8)
    assert afa.has_seg_head and not get_method("cam").has_seg_head
    with pytest.raises(NotImplementedError):
        get_method("cam").segment(None, x, {})


# ------------------------------------- official-code defaults (issue 14; rulixiang/afa)

def brute_aff_loss_official(a, lab):
    """utils/losses.py get_aff_loss, pair by pair: ½ Σ+(1-s)/(N+ + 1) + ½ Σ- s/(N- + 1)."""
    pos = neg = 0.0
    npos = nneg = 0
    B, n, _ = lab.shape
    for b in range(B):
        for i in range(n):
            for j in range(n):
                s = 1 / (1 + math.exp(-float(a[b, i, j])))
                if int(lab[b, i, j]) == 1:
                    pos, npos = pos + (1 - s), npos + 1
                elif int(lab[b, i, j]) == 0:
                    neg, nneg = neg + s, nneg + 1
    return 0.5 * pos / (npos + 1) + 0.5 * neg / (nneg + 1)


def test_aff_loss_official_default_vs_pairs_and_by_hand():
    from pipeline.methods.afa.losses import affinity_loss_afa
    g = torch.Generator().manual_seed(7)
    a = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 5, 5), generator=g)
    lab[lab == 2] = 255
    assert affinity_loss_afa(a, lab).item() == pytest.approx(brute_aff_loss_official(a, lab), rel=1e-12)
    # by hand: s = 0.5 everywhere; 2 positives, 1 negative, 1 ignored
    z = torch.zeros(1, 2, 2, dtype=torch.float64)
    lab2 = torch.tensor([[[1, 0], [255, 1]]])
    assert affinity_loss_afa(z, lab2).item() == pytest.approx(0.5 * 1.0 / 3 + 0.5 * 0.5 / 2)  # 7/24
    assert affinity_loss_afa(z, lab2, "paper").item() == pytest.approx(1.0 / 2 + 0.5 / 1)      # 1.0
    # no pairs at all: 0 (official +1 counts), not nan
    assert affinity_loss_afa(z, torch.full((1, 2, 2), 255)).item() == 0.0
    with pytest.raises(ValueError, match="aff_loss"):
        affinity_loss_afa(z, lab2, "mean")


def brute_prop_official(cams, labels, aff_sig, radius, h, w, bg, eps):
    """scripts/dist_train_voc.py + utils/camutils.py propagte_aff_cam_with_bkg, loop form:
    mask pairs beyond the Chebyshev radius, square, divide each column by its sum + eps,
    softmax over [bg; present classes] per pixel, maps @ aff."""
    B, C = labels.shape
    n = h * w
    out = torch.zeros(B, C + 1, n, dtype=torch.float64)
    for b in range(B):
        A = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                if max(abs(i // w - j // w), abs(i % w - j % w)) <= radius:
                    A[i, j] = float(aff_sig[b, i, j]) ** 2
        for j in range(n):
            A[:, j] = A[:, j] / (A[:, j].sum() + eps)
        keys = [0] + [c + 1 for c in range(C) if labels[b, c] > 0]
        full = torch.cat([torch.full((1, h, w), bg, dtype=torch.float64),
                          cams[b].double()]).reshape(C + 1, n)
        v = full[keys]
        sm = torch.exp(v) / torch.exp(v).sum(0, keepdim=True)
        for r, k in enumerate(keys):
            for j in range(n):
                out[b, k, j] = sum(sm[r, i] * A[i, j] for i in range(n))
    return out.reshape(B, C + 1, h, w)


def _propagation_setup(seed: int, scales: list[float]):
    """The AFA plug-in, params with ``scales`` as ``cam_scales`` (radius 2, no warm-ups), a tiny
    4-class network in eval mode with a random affinity projection, 2 random 32 x 32 images
    and their labels, all drawn after ``torch.manual_seed(seed)``."""
    afa = get_method("afa")
    torch.manual_seed(seed)
    p = {**TINY, "cam_scales": scales, "aff_radius": 2, "warmup_cls_iters": 0, "warmup_aff_iters": 0}
    m = afa.build_model(p, 4).eval()
    with torch.no_grad():
        m.aff_proj.weight.normal_()
    return afa, p, m, torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])


def test_propagation_uses_largest_scale_affinity_on_its_grid(monkeypatch):
    """Default prop_affinity: largest_scale = official multi_scale_cam_with_aff_mat: the
    affinity of the max(cam_scales) forward (unflipped image), the CAM resized to that grid,
    the radius mask of that grid; then the official propagation (loops)."""
    import pipeline.methods.afa as afa_mod
    from pipeline.methods.common.token_affinity import propagate_cams_with_bkg
    afa, p, m, x, y = _propagation_setup(1, [1.0, 1.5])                  # prop_eps: default
    calls = []
    real = afa_mod.propagate_cams_with_bkg

    def spy(cg, yy, aff, bg, *a):
        calls.append((cg, aff, bg, a))
        return real(cg, yy, aff, bg, *a)
    monkeypatch.setattr(afa_mod, "propagate_cams_with_bkg", spy)
    out = m.run(x)
    afa.pseudo_labels(m, x, y, out["aff"], out["grid"], p, propagate=True)
    assert len(calls) == 2
    cg, aff, bg, (alpha, iters, mask, eps) = calls[1]
    assert eps == 0.1 and alpha == 2.0 and iters == 1                 # official + 1e-1 default
    assert cg.shape[-2:] == (12, 12) and aff.shape == (2, 144, 144)          # 1.5 x 32 / 4
    with torch.no_grad():                                                   # independent forward
        x15 = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
        m.run(x15)
        exp_aff = torch.sigmoid(m.affinity(1))
    torch.testing.assert_close(aff, exp_aff)
    cams = train_time_cams(m, x, [1.0, 1.5], True) * y[:, :, None, None]
    torch.testing.assert_close(cg, F.interpolate(cams, size=(12, 12), mode="bilinear", align_corners=False))
    got = propagate_cams_with_bkg(cg[:, :, :4, :4].contiguous(), y,
                                  aff.reshape(2, 12, 12, 12, 12)[:, :4, :4, :4, :4].reshape(2, 16, 16),
                                  0.35, 2.0, 1, radius_mask(4, 4, 2), 0.1)
    ref = brute_prop_official(cg[:, :, :4, :4], y,
                              aff.reshape(2, 12, 12, 12, 12)[:, :4, :4, :4, :4].reshape(2, 16, 16),
                              2, 4, 4, 0.35, 0.1)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # the old option: the training forward's affinity at the crop grid
    calls.clear()
    afa.pseudo_labels(m, x, y, out["aff"], out["grid"], {**p, "prop_affinity": "train_forward"}, True)
    assert calls[0][0].shape[-2:] == (8, 8)
    torch.testing.assert_close(calls[0][1], torch.sigmoid(out["aff"]))
    with pytest.raises(ValueError, match="prop_affinity"):
        afa.pseudo_labels(m, x, y, out["aff"], out["grid"], {**p, "prop_affinity": "x"}, True)


def test_propagation_affinity_comes_from_the_cam_pass(monkeypatch):
    """Official multi_scale_cam_with_aff_mat: the largest scale's affinity is taken from that
    scale's image + flip forward, so pseudo_labels runs one forward per CAM scale and no more
    (the extra no-grad forward of the unflipped images is gone); the affinity is the unflipped
    half's, equal to a forward of the unflipped images alone up to float rounding."""
    afa, p, m, x, y = _propagation_setup(2, [1.0, 1.5, 0.5])
    sizes, real_run = [], m.run

    def run_spy(inp, with_heads=True):
        sizes.append((inp.shape[0], *inp.shape[-2:]))
        return real_run(inp, with_heads=with_heads)
    monkeypatch.setattr(m, "run", run_spy)
    afa.pseudo_labels(m, x, y, None, (8, 8), p, propagate=True)
    assert sizes == [(4, 32, 32), (4, 48, 48), (4, 16, 16)]        # one batched pass per scale
    cams, aff, grid = train_time_cams(m, x, p["cam_scales"], True, with_affinity=True)
    assert grid == (12, 12) and aff.shape == (2, 144, 144)
    torch.testing.assert_close(cams, train_time_cams(m, x, p["cam_scales"], True))
    with torch.no_grad():
        real_run(F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False))
        torch.testing.assert_close(aff, m.affinity(1))
    with pytest.raises(ValueError, match="cam_scales must be > 0"):
        train_time_cams(m, x, [1.0, 0.0], True)


def test_lreg_off_by_default_and_aff_loss_option():
    afa, m, x, y = _afa_batch()
    p = {**TINY, "warmup_cls_iters": 0, "warmup_aff_iters": 5}
    torch.manual_seed(3)
    loss, parts = afa.loss(m, x, y, p, torch.Generator(), it=0)
    assert parts["reg"] == 0.0                                   # official: reg_loss commented out
    assert loss.item() == pytest.approx(parts["cls"] + 0.1 * parts["seg"] + 0.1 * parts["aff"], rel=1e-5)
    _, pp = afa.loss(m, x, y, {**p, "lambdas": [0.1, 0.1, 0.01], "aff_loss": "paper"},
                     torch.Generator(), it=0)
    assert pp["reg"] < 0                                          # rloss energy: -S^T G W S
    assert pp["aff"] > 1.5 * parts["aff"]                        # unhalved Eq. 5 vs official half
    with pytest.raises(ValueError, match="aff_loss"):
        afa.loss(m, x, y, {**p, "aff_loss": "bad"}, torch.Generator(), it=0)


def test_plugin_and_params_defaults_are_official(monkeypatch):
    """Issue 14: without the keys the plug-in runs the official values (seg_loss balanced,
    prop_eps 0.1, aff_attention logits_unscaled), and params.yaml's voc / demo profiles say
    the same."""
    import pipeline.methods.afa as afa_mod
    from pipeline.io.config import load_params, stage_params
    cfg = load_params()
    for prof in ("voc", "demo"):
        tc = stage_params(cfg, prof, "afa", "train_cls")
        assert (tc["seg_loss"], tc["prop_eps"], tc["aff_attention"]) == ("balanced", 0.1, "logits_unscaled")
        assert stage_params(cfg, prof, "afa", "export_seeds")["prop_eps"] == 0.1
    seen = {}
    real_seg, real_prop = afa_mod.seg_loss, afa_mod.propagate_cams_with_bkg

    def seg_spy(lg, lab, mode):
        seen["seg"] = mode
        return real_seg(lg, lab, mode)

    def prop_spy(*a):
        seen["eps"] = a[-1]                      # (cams, y, aff, bg, alpha, iters, mask, eps)
        return real_prop(*a)
    monkeypatch.setattr(afa_mod, "seg_loss", seg_spy)
    monkeypatch.setattr(afa_mod, "propagate_cams_with_bkg", prop_spy)
    afa, m, x, y = _afa_batch()
    assert m.aff_attention == "logits_unscaled"
    p = {**TINY, "warmup_cls_iters": 0, "warmup_aff_iters": 0}
    for k in ("seg_loss", "prop_eps", "aff_attention"):
        assert k not in p
    afa.loss(m, x, y, p, torch.Generator(), it=0)
    assert seen == {"seg": "balanced", "eps": 0.1}


def test_profile_phase_gates_match_the_official_iteration_tests():
    """Official ``scripts/dist_train_{voc,coco}.py``: classification only while ``n_iter <=
    cam_iters`` (2000 / 5000), the refined target while ``n_iter <= 6000`` / ``15000``; the
    plug-in's 0-based ``it < warmup_cls_iters`` and ``it >= warmup_cls_iters +
    warmup_aff_iters`` (``test_warmup_schedule_and_loss_terms``) must select the same iterations."""
    from pipeline.io.config import load_params, stage_params
    cfg = load_params()
    for prof, cam_iters, prop_after in (("voc", 2000, 6000), ("coco", 5000, 15000)):
        tc = stage_params(cfg, prof, "afa", "train_cls")
        wc, wa = tc["warmup_cls_iters"], tc["warmup_aff_iters"]
        for n in list(range(cam_iters - 3, cam_iters + 4)) + list(range(prop_after - 3, prop_after + 4)):
            assert (n < wc) == (n <= cam_iters), (prof, n)
            assert (n >= wc + wa) == (n > prop_after), (prof, n)
