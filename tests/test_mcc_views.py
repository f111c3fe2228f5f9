"""MCC's official views (fwu11/MCC ``datasets/voc.py: VOC12ClsDataset``, ``datasets/
transforms.py``, ``model/model_seg_neg.py: forward_proj``; issue 14): the DINO-style view
augmentation, which image each view is made from, and how the two global views and the local
view enter the contrast."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.data import transforms
from pipeline.data.datasets import ClassificationDataset
from pipeline.data.transforms import mcc_view
from pipeline.data.voc import load_image
from vit_reference import tiny_mcc

TINY = tiny_mcc()


def _two_colour(h=12, w=16):
    """Left half red, right half blue, a bright square top-left: flips, grey and jitter are
    each visible in the output."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 40, 30)
    img[:, w // 2:] = (30, 50, 190)
    img[:3, :3] = 250
    return img


def test_mcc_view_rates_of_flip_grey_and_jitter_are_the_official_ones():
    """Over 400 fixed seeds (deterministic): flip p 0.5, grey p 0.2, jitter applied p 0.8
    (official ``flip_and_color_jitter``). Without blur, an output equal to the (possibly
    flipped) input means neither jitter nor grey happened (each changes the pixels)."""
    img = _two_colour()
    n, flips, greys, untouched = 400, 0, 0, 0
    for seed in range(n):
        out = mcc_view(img, seed, blur_p=0.0).astype(int)
        flipped = out[:, :8, 2].mean() > out[:, 8:, 2].mean()     # the blue half on the left
        flips += flipped
        greys += bool((out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all())
        untouched += bool((out == (img[:, ::-1] if flipped else img)).all())
    sd = lambda p: 4 * (p * (1 - p) / n) ** 0.5                     # noqa: E731
    assert abs(flips / n - 0.5) < sd(0.5)
    assert abs(greys / n - 0.2) < sd(0.2)
    assert abs(untouched / n - 0.2 * 0.8) < sd(0.16)                 # no jitter and no grey


def test_mcc_view_blur_and_solarize_are_the_last_steps_and_seeded():
    """Same seed, same draws up to the last step: solarize p 1 = ``ImageOps.solarize`` (128)
    of the solarize-free output; blur p 1 smooths it (lower squared neighbour differences over the seeds); the call
    leaves torch's global RNG as it was; the random resized crop gives S x S."""
    img = np.asarray(Image.fromarray(_two_colour(24, 32)).resize((32, 24)))
    state = torch.get_rng_state()
    tv = lambda a: np.square(np.diff(a.astype(float), axis=1)).sum()           # noqa: E731
    tv_plain = tv_blur = 0.0
    for seed in range(20):
        plain = mcc_view(img, seed, blur_p=0.0)
        assert np.array_equal(plain, mcc_view(img, seed, blur_p=0.0))          # deterministic
        sol = mcc_view(img, seed, blur_p=0.0, solarize_p=1.0)
        assert np.array_equal(sol, np.asarray(ImageOps.solarize(Image.fromarray(plain), 128)))
        tv_plain, tv_blur = tv_plain + tv(plain), tv_blur + tv(mcc_view(img, seed, blur_p=1.0))
        assert mcc_view(img, seed, 0.1, 0.2, resized_crop=20).shape == (20, 20, 3)
    assert tv_blur < 0.9 * tv_plain                     # radius ~ U(0.1, 2): smoother on average
    assert torch.equal(torch.get_rng_state(), state)
    assert not np.array_equal(mcc_view(img, 0, 0.0), mcc_view(img, 1, 0.0))


def test_dataset_mcc_views_come_from_the_official_images(vocsample_root, monkeypatch):
    """``extra_views: mcc``: view 1 = the plain item's crop under mcc_view(blur 1.0); global
    view 2 = mcc_view of the WHOLE image (blur 0.1, solarize 0.2, resized crop to `crop`);
    local = the same crop under mcc_view(blur 0.5), each with its own seed. mcc_view is
    replaced by a recorder (identity, or a resize for the resized crop)."""
    calls = []

    def record(image, seed, blur_p, solarize_p=0.0, resized_crop=None):
        calls.append((image.copy(), seed, blur_p, solarize_p, resized_crop))
        if resized_crop:
            return np.array(Image.fromarray(np.ascontiguousarray(image)).resize((resized_crop,) * 2))
        return np.ascontiguousarray(image)
    monkeypatch.setattr(transforms, "mcc_view", record)
    iid = "2007_000033"
    kw = dict(crop=32, scale_range=(0.5, 1.0), hflip=True)
    plain = ClassificationDataset(vocsample_root, [iid], {iid: [1]}, **kw)
    ds = ClassificationDataset(vocsample_root, [iid], {iid: [1]}, extra_views="mcc", **kw)
    whole = load_image(vocsample_root, iid)
    for epoch in range(3):
        plain.set_epoch(epoch)
        ds.set_epoch(epoch)
        x0 = plain[0][0]
        calls.clear()
        x, y, i, extra = ds[0]
        assert set(extra) == {"global2", "local"}
        (g_img, g_seed, *g_args), (l_img, l_seed, *l_args), (v_img, v_seed, *v_args) = calls
        assert g_args == [0.1, 0.2, 32] and np.array_equal(g_img, whole)
        assert l_args == [0.5, 0.0, None] and v_args == [1.0, 0.0, None]
        torch.testing.assert_close(x, x0, rtol=0, atol=0)                 # view 1's crop
        torch.testing.assert_close(extra["local"], x0, rtol=0, atol=0)    # the same crop
        assert extra["global2"].shape == (3, 32, 32)
        assert len({g_seed, l_seed, v_seed}) == 3
    with pytest.raises(ValueError, match="views: crop"):
        ClassificationDataset(vocsample_root, [iid], {iid: [1]}, extra_views="mcc", crop=None)
    with pytest.raises(ValueError, match="extra_views"):
        ClassificationDataset(vocsample_root, [iid], {iid: [1]}, extra_views="dino", crop=32)


def _loss_spy(monkeypatch):
    import pipeline.methods.mcc as mcc_mod
    seen = {}
    real = mcc_mod.info_nce_code

    def f(q, k, pos, tau, *a):
        seen["qkp"] = (q, k, pos)
        return real(q, k, pos, tau, *a)
    monkeypatch.setattr(mcc_mod, "info_nce_code", f)
    return seen


def test_loss_with_two_global_views_and_the_local_image(monkeypatch):
    """Official forward_proj + MCCLoss: the teacher projects both global views (EMA projector,
    detached class tokens), the student both (positives, first) and the n_local masked copies
    of the LOCAL image; with local = x and no second view the old one-view contrast returns."""
    from pipeline.methods import get_method
    seen = _loss_spy(monkeypatch)
    torch.manual_seed(0)
    m = get_method("mcc")
    p = {**TINY, "n_local": 3, "mask_scale": 2, "cam_scales": [1.0], "seg_start_iter": 10}
    assert m.extra_views(p) == "mcc" and m.extra_views({**p, "views": "crop"}) is None
    model = m.build_model(p, 20)
    x, g2, loc = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 20)
    y[0, 3] = y[1, 7] = 1
    m.loss(model, x, y, p, torch.Generator().manual_seed(0), it=0, global2=g2, local=loc)
    q, k, pos = seen["qkp"]
    assert q.shape[:2] == (2, 2) and k.shape[:2] == (2, 5) and pos[:, :2].all()
    with torch.no_grad():
        c1, c2 = model.tokens(x)[0], model.tokens(g2)[0]
        torch.testing.assert_close(q[:, 0], model.proj_ema(c1))
        torch.testing.assert_close(q[:, 1], model.proj_ema(c2))
        torch.testing.assert_close(k[:, 0], model.proj(c1))
        torch.testing.assert_close(k[:, 1], model.proj(c2))
    # the local columns: the local image under the masks; with local = x they are x's
    m.loss(model, x, y, p, torch.Generator().manual_seed(0), it=0, global2=g2, local=x)
    k_x = seen["qkp"][1]
    m.loss(model, x, y, p, torch.Generator().manual_seed(0), it=0)
    q1, k1, pos1 = seen["qkp"]
    assert q1.shape[:2] == (2, 1) and k1.shape[:2] == (2, 4)
    torch.testing.assert_close(k1[:, 1:], k_x[:, 2:])
    assert not torch.allclose(k[:, 2:], k_x[:, 2:])
    with pytest.raises(ValueError, match="both global2 and local"):
        m.loss(model, x, y, p, torch.Generator(), it=0, global2=g2)
    with pytest.raises(ValueError, match="views"):
        m.extra_views({**p, "views": "dino"})


def test_official_views_train_end_to_end(vocsample_root, tmp_path, monkeypatch):
    """train_classifier hands the dataset's global2 / local to MCC.loss (the `voc` profile's
    views: official), scaled down: a tiny ViT at 32 px, batch 2, 2 iterations."""
    from pipeline.io.config import load_params, stage_params
    from pipeline.steps.cls import train_classifier
    p = dict(stage_params(load_params(), "voc", "mcc", "train_cls"))
    assert p["views"] == "official"
    p.update(TINY, crop=32, n_local=2, mask_scale=2, cam_scales=[1.0], batch_size=2, iters=2,
             epochs=None, warmup_iters=0, device="cpu", num_workers=0, amp="off",
             checkpoint_every=0, seg_start_iter=10)
    seen = {}
    import pipeline.methods.mcc as mcc_mod
    real = mcc_mod.MCC.loss

    def spy(self, model, x, y, p, gen, it=None, **kw):
        seen.update({k: v.shape for k, v in kw.items()})
        return real(self, model, x, y, p, gen, it, **kw)
    monkeypatch.setattr(mcc_mod.MCC, "loss", spy)
    ids = ["2007_000033", "2007_000129"]
    met = train_classifier("mcc", vocsample_root, ids, {i: [1] for i in ids}, p,
                           tmp_path / "m.pt", log=lambda s: None)
    assert met["iters"] == 2 and (tmp_path / "m.pt").is_file()
    assert seen == {"global2": (2, 3, 32, 32), "local": (2, 3, 32, 32)}
