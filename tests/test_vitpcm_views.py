"""ViT-PCM's official seed export (upsample the label-merged distribution, then the arg-max)
and second views (per-image crop / resize / dihedral, 2 x 2 mosaics) against brute-force
replays: a bilinear ``align_corners`` resize written as loops, the transforms redone by hand
from the recorded draws (official deepplants/ViT-PCM ``main.py: test``, ``utils.py:
affine_transform`` / ``bbox_for_crop``, ``model.py: merged_step`` / ``compute_cce_loss``)."""
import math

import numpy as np
import pytest
import torch

from pipeline.methods.vitpcm import ViTPCM
from pipeline.methods.vitpcm.losses import merge_class_labels, mosaic_tiles, official_views, with_background
from pipeline.methods.vitpcm.model import pcm_scores
from pipeline.steps.seeds import maps_to_label
from vit_reference import tiny_vit

TINY = {"backbone": tiny_vit(patch=8, dim=24, depth=2)}


def _bilinear_align_corners(a, H, W):
    """Brute-force bilinear resize of ``(h, w, C)`` to ``(H, W, C)`` with align_corners=True
    (TF1 ``tf.image.resize(..., align_corners=True)``, ViT-PCM ``utils.resize``)."""
    h, w, C = a.shape
    out = np.zeros((H, W, C))
    for i in range(H):
        y = i * (h - 1) / (H - 1) if H > 1 else 0.0
        y0 = min(int(math.floor(y)), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(W):
            x = j * (w - 1) / (W - 1) if W > 1 else 0.0
            x0 = min(int(math.floor(x)), w - 1)
            x1, fx = min(x0 + 1, w - 1), x - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * a[y0, x0] + fx * a[y0, x1])
                         + fy * ((1 - fx) * a[y1, x0] + fx * a[y1, x1]))
    return out


@pytest.mark.parametrize("bpm_norm", ["max", "none"])
def test_exported_seeds_are_the_official_argmax_of_the_upsampled_merged_distribution(bpm_norm):
    """Official ``main.py: test``: ``argmax(resize(merge_class_labels(preds, labels)))`` at
    image size. The stored ``cams`` at 0.5 (``bpm_upsample: probs``, the default) give those
    labels at every pixel; the earlier ``ratio`` form does not (it differs between token
    centres)."""
    from pipeline.data.transforms import to_tensor
    from pipeline.steps.seeds import multiscale_maps

    torch.manual_seed(3)
    m = ViTPCM()
    model = m.build_model(TINY, 7).eval()
    with torch.no_grad():                                  # sharpen: a random net is near uniform
        model.classifier.weight.mul_(20)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)     # multiples of the stride 8
    cids = np.array([2, 5])
    p = {"scales": [1.0], "flip": False, "norm": "mean", "align_corners": True, "bpm_norm": bpm_norm}
    got = multiscale_maps(m, model, img, torch.as_tensor(cids - 1), p, torch.device("cpu"))
    assert set(got) == {"cams", "bpm_bg", "bpm_fg", "probs"}
    with torch.no_grad():
        z = model(to_tensor(img).unsqueeze(0))[0].softmax(-1).double().numpy()   # (4, 5, 8)
    keep = [0, 2, 5]
    merged = np.zeros_like(z)                              # official merge_class_labels, by hand
    merged[..., keep] = z[..., keep]
    if bpm_norm == "max":
        merged = merged / merged.reshape(-1, 8).max(0).clip(1e-300)
    merged = merged / merged.sum(-1, keepdims=True)
    up = _bilinear_align_corners(merged, 32, 40)[..., keep]
    ref = np.array(keep)[up.argmax(-1)]
    lab = maps_to_label(got["cams"].numpy(), cids, 0.5)
    assert (lab == ref).all()
    # bpm_bg / bpm_fg are the upsampled distribution itself (official main.py test --crf:
    # the CRF's input; make_pseudo_labels.source: seeds), bpm_bg once per class channel
    bg, fg = got["bpm_bg"].numpy(), got["bpm_fg"].numpy()
    assert bg.shape == fg.shape == (2, 32, 40) and (bg == bg[:1]).all()
    assert np.allclose(np.concatenate([bg[:1], fg]), up.transpose(2, 0, 1), rtol=1e-5, atol=1e-7)
    assert np.isin(ref, [2, 5]).any() and (ref == 0).any()    # not a trivial labelling
    old = multiscale_maps(m, model, img, torch.as_tensor(cids - 1), {**p, "bpm_upsample": "ratio"},
                          torch.device("cpu"))
    assert set(old) == {"cams", "probs"} and torch.allclose(old["probs"], got["probs"])
    with pytest.raises(ValueError, match="bpm_upsample"):
        multiscale_maps(m, model, img, torch.as_tensor(cids - 1), {**p, "norm": "max"},
                        torch.device("cpu"))


def _view_by_hand(img, box, code, crop, scale):
    """One official second view from its draws: crop, align-corners bilinear resize (the
    brute-force loop above), fliplr, flipud, transpose — on an ``(H, W, C)`` array."""
    a = img if box is None else img[box[0]:box[0] + crop, box[1]:box[1] + crop]
    a = _bilinear_align_corners(a, scale, scale)
    if code[0]:
        a = a[:, ::-1]
    if code[1]:
        a = a[::-1]
    if code[2]:
        a = a.transpose(1, 0, 2)
    return a


def test_official_views_mosaic_and_target_follow_the_drawn_transforms():
    """Official affine_transform / merged_step / compute_cce_loss: every mosaic tile is its
    image cropped, resized and flipped as drawn, the target went through the same transforms
    at patch level, crops start on the patch grid at min(U{0, s, ..., S}, S - crop), and
    mosaic_tiles cuts the predictions back in the tiling order."""
    torch.manual_seed(0)
    S, stride, crop, scale = 32, 8, 16, 16
    x = torch.randn(9, 3, S, S, dtype=torch.float64)
    tgt = torch.rand(9, 4, 4, 5, dtype=torch.float64)
    mos, tg, draws = official_views(x, tgt, stride, crop, 0.5, scale, torch.Generator().manual_seed(1))
    assert mos.shape == (2, 3, 2 * scale, 2 * scale) and tg.shape == (8, 2, 2, 5) and len(draws) == 8
    boxes = [d[0] for d in draws]
    assert any(b is None for b in boxes) and any(b is not None for b in boxes)
    assert {d[1] for d in draws} != {(False, False, False)}
    for b, (box, code) in enumerate(draws):
        m, r, c = b // 4, (b % 4) // 2, b % 2
        tile = mos[m, :, r * scale:(r + 1) * scale, c * scale:(c + 1) * scale].permute(1, 2, 0).numpy()
        ref = _view_by_hand(x[b].permute(1, 2, 0).numpy(), box, code, crop, scale)
        np.testing.assert_allclose(tile, ref, atol=1e-9)
        pbox = None if box is None else (box[0] // stride, box[1] // stride)
        tref = _view_by_hand(tgt[b].numpy(), pbox, code, crop // stride, scale // stride)
        np.testing.assert_allclose(tg[b].numpy(), tref, atol=1e-9)
        if box is not None:
            assert all(v % stride == 0 and 0 <= v <= S - crop for v in box)
    z = torch.arange(2 * 4 * 4 * 3, dtype=torch.float64).reshape(2, 4, 4, 3)
    tiles = mosaic_tiles(z)
    for b in range(8):
        m, r, c = b // 4, (b % 4) // 2, b % 2
        assert torch.equal(tiles[b], z[m, 2 * r:2 * r + 2, 2 * c:2 * c + 2])
    # the corner clamp: draws pile up on S - crop (9 of the 25 starts, as 384 / 16 / 128)
    many = official_views(torch.zeros(1, 3, 48, 48).expand(400, -1, -1, -1), torch.zeros(400, 24, 24, 2),
                          2, 16, 1.0, 24, torch.Generator().manual_seed(2))[2]
    ys = np.array([d[0][0] for d in many])
    assert abs((ys == 32).mean() - 9 / 25) < 0.08 and set(np.unique(ys)) == set(range(0, 33, 2))
    with pytest.raises(ValueError, match="eq_views"):
        official_views(x[:3], tgt[:3], stride, crop, 0.5, scale, torch.Generator())


def test_official_equivariance_loss_is_ce_to_the_merged_transformed_target(monkeypatch):
    """``eq_views: official`` in the loss: L_eq = CE between merge_class_labels of the
    transformed dropout-free target and the mosaic tiles' predictions (recomputed here from
    the same draws), four images per mosaic."""
    import pipeline.methods.vitpcm as vp
    torch.manual_seed(0)
    m = ViTPCM()
    p = {**TINY, "dropout": 0.0, "eq_crop_p": 0.5}
    model = m.build_model(p, 5).eval()
    x = torch.randn(4, 3, 32, 32)
    y = torch.zeros(4, 5)
    y[:, 1] = 1
    y[2, 3] = 1
    seen = {}
    real = vp.official_views

    def spy(*a, **k):
        seen["out"] = real(*a, **k)
        return seen["out"]
    monkeypatch.setattr(vp, "official_views", spy)
    _, parts = m.loss(model, x, y, p, torch.Generator().manual_seed(0))
    mos, tg, draws = seen["out"]
    assert mos.shape == (1, 3, 32, 32) and tg.shape[1:3] == (2, 2)      # 32 // 2 = 16 px = 2 tokens
    with torch.no_grad():
        z1 = pcm_scores(model(x))[0]
        z2 = mosaic_tiles(pcm_scores(model(mos))[0])
    ref_t = torch.stack([torch.from_numpy(np.ascontiguousarray(
        _view_by_hand(z1[b].double().numpy(), None if bx is None else (bx[0] // 8, bx[1] // 8), c, 1, 2)))
        for b, (bx, c) in enumerate(draws)]).float()
    torch.testing.assert_close(tg, ref_t, atol=1e-5, rtol=1e-5)
    q = merge_class_labels(ref_t, with_background(y))
    ref = -(q * z2.clamp(1e-7, 1).log()).sum(-1).mean()
    assert parts["eq"] == pytest.approx(ref.item(), rel=1e-5)


def test_undo_dihedral_inverts_every_code():
    from pipeline.methods.vitpcm.losses import dihedral, undo_dihedral
    a = torch.arange(2 * 3 * 3 * 4).reshape(2, 3, 3, 4)
    for code in [(h, v, t) for h in (0, 1) for v in (0, 1) for t in (0, 1)]:
        assert torch.equal(undo_dihedral(dihedral(a, code, (1, 2)), code, (1, 2)), a)
    assert not torch.equal(undo_dihedral(a, (1, 0, 1), (1, 2)), dihedral(a, (1, 0, 1), (1, 2)))


def test_views_come_from_the_base_image_with_view1_target_unflipped(monkeypatch):
    """``eq_view_source: base`` (official ``compute_cce_loss``: ``revert_affine_transform`` of
    view 1's predictions, then view 2's transform): official_views gets the base image and a
    target whose token (r, c) is view 1's prediction at the position view 1's flips send
    (r, c) to - computed here from index arithmetic, token by token."""
    import pipeline.methods.vitpcm as vp
    seen, real = [], vp.official_views

    def spy(src, target, *a):
        seen.append((src, target))
        return real(src, target, *a)
    monkeypatch.setattr(vp, "official_views", spy)
    torch.manual_seed(0)
    m = ViTPCM()
    p = {**TINY, "eq_crop": 16, "eq_scale": 16}
    assert m.extra_views(p) == "base" and m.extra_views({**p, "eq_view_source": "view1"}) is None
    assert m.extra_views({**p, "eq_views": "batch"}) is None
    model = m.build_model(p, 5).train()
    x, base = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    codes = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]])
    y = torch.zeros(4, 5)
    y[:, 1] = 1
    m.loss(model, x, y, p, torch.Generator().manual_seed(0), base=base, base_code=codes)
    src, target = seen[-1]
    assert src is base
    model.eval()
    with torch.no_grad():
        t1 = pcm_scores(model(x))[0]                        # (4, 4, 4, 6) in view 1's frame
    n = t1.shape[1]
    for b, (hf, vf, tr) in enumerate(codes.tolist()):
        for r in range(n):
            for c in range(n):
                rr, cc = r, c
                if hf:
                    cc = n - 1 - cc
                if vf:
                    rr = n - 1 - rr
                if tr:
                    rr, cc = cc, rr
                torch.testing.assert_close(target[b, r, c], t1[b, rr, cc])
    m.loss(model.train(), x, y, {**p, "eq_view_source": "view1"}, torch.Generator().manual_seed(0))
    assert seen[-1][0] is x
    with pytest.raises(ValueError, match="eq_view_source"):
        m.extra_views({**p, "eq_view_source": "raw"})
