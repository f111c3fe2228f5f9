"""ViT-PCM's training geometry and augmentation (official deepplants/ViT-PCM
``dataloader.py: _preprocess_image``, ``utils.py: affine_transform`` / ``color_transform``)
against independent references: Python's ``colorsys`` per pixel for TF's colour ops, a PIL
resize and numpy flips for the geometry, replaying the same random draws."""
import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datasets import ClassificationDataset
from pipeline.data.transforms import color_jitter, to_tensor
from pipeline.data.voc import load_image

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _jitter_by_hand(img, rng, b=0.2, c=(0.5, 2.0), s=(0.5, 1.5), h=0.1, g=0.1):
    """TF's random_brightness, random_contrast, random_saturation, random_hue and the grey
    branch of color_transform, pixel by pixel (colorsys for the HSV round trip)."""
    d_b, f_c, f_s, d_h = rng.uniform(-b, b), rng.uniform(*c), rng.uniform(*s), rng.uniform(-h, h)
    grey = rng.random() < g
    H, W, _ = img.shape
    x = img.astype(np.float64) + d_b
    out = np.zeros_like(x)
    for ch in range(3):
        m = sum(x[i, j, ch] for i in range(H) for j in range(W)) / (H * W)
        out[..., ch] = (x[..., ch] - m) * f_c + m
    for i in range(H):
        for j in range(W):
            hh, ss, vv = colorsys.rgb_to_hsv(*(out[i, j] / 255.0))
            ss = min(max(ss * f_s, 0.0), 1.0)
            hh = (hh + d_h) % 1.0
            r, gg, bb = colorsys.hsv_to_rgb(hh, ss, vv)
            out[i, j] = np.array([r, gg, bb]) * 255.0
            if grey:
                out[i, j] = 0.2989 * out[i, j, 0] + 0.5870 * out[i, j, 1] + 0.1140 * out[i, j, 2]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_color_jitter_is_tf_color_transform(seed):
    img = np.random.default_rng(100 + seed).integers(90, 190, (5, 7, 3)).astype(np.uint8)
    got = color_jitter(img, np.random.default_rng(seed), gray_p=0.5)
    ref = _jitter_by_hand(img, np.random.default_rng(seed), g=0.5)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
    assert got.dtype == np.float32 and not np.allclose(got, img, atol=1.0)


def test_color_jitter_identity_settings_and_no_clipping():
    img = np.random.default_rng(0).integers(0, 256, (6, 6, 3)).astype(np.uint8)
    same = color_jitter(img, np.random.default_rng(0), brightness=0.0, contrast=(1, 1),
                        saturation=(1, 1), hue=0.0, gray_p=0.0)
    np.testing.assert_allclose(same, img, atol=1e-3)
    hi = color_jitter(img, np.random.default_rng(0), brightness=0.0, contrast=(2, 2),
                      saturation=(1, 1), hue=0.0, gray_p=0.0)
    assert hi.max() > 255 or hi.min() < 0          # TF keeps out-of-range values


def test_square_resize_colour_and_dihedral_items(vocsample_root):
    """``resize_square`` + ``color_jitter`` + hflip / ``vflip`` / ``transpose`` with
    ``crop: null``: the item is the image resized to S x S, then jittered and flipped by the
    same draws; all eight dihedral cases occur."""
    iid = "2007_000033"
    image = load_image(vocsample_root, iid)
    S = 48
    ds = ClassificationDataset(vocsample_root, [iid], {iid: [1]}, crop=None, scale_range=(1.0, 1.0),
                               hflip=True, mean=HALF[0], std=HALF[1], resize_square=S,
                               vflip=True, transpose=True, color_jitter={})
    cases = set()
    for epoch in range(48):
        ds.set_epoch(epoch)
        x, y, _ = ds[0]
        rng = np.random.default_rng((0, epoch, 0))
        rng.uniform(1.0, 1.0)                                   # the rescale draw
        hf = rng.random() < 0.5
        ref = np.asarray(Image.fromarray(image).resize((S, S), Image.BILINEAR))
        ref = ref[:, ::-1] if hf else ref
        ref = _jitter_by_hand(ref, rng)
        vf = rng.random() < 0.5
        ref = ref[::-1] if vf else ref
        tr = rng.random() < 0.5
        ref = ref.transpose(1, 0, 2) if tr else ref
        assert tuple(x.shape) == (3, S, S)
        torch.testing.assert_close(x, to_tensor(np.ascontiguousarray(ref.astype(np.float32)), *HALF),
                                   rtol=1e-5, atol=1e-4)
        cases.add((hf, vf, tr))
    assert len(cases) == 8


def test_items_without_the_new_options_are_unchanged(vocsample_root):
    """The new draws come after the old ones: a dataset without them gives the items it gave
    before (an independent PIL resize + flip + pad + crop replay of the same draws)."""
    iid = "2007_000129"
    image = load_image(vocsample_root, iid)
    ds = ClassificationDataset(vocsample_root, [iid], {iid: [2]}, crop=64, scale_range=(0.2, 0.3))
    x, _, _ = ds[0]
    rng = np.random.default_rng((0, 0, 0))
    s = rng.uniform(0.2, 0.3)
    h, w = image.shape[:2]
    nh, nw = int(round(h * s)), int(round(w * s))
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    img = img[:, ::-1] if rng.random() < 0.5 else img
    ph, pw = max(64, nh), max(64, nw)
    canvas = np.empty((ph, pw, 3), np.uint8)
    canvas[:] = (np.array((0.485, 0.456, 0.406)) * 255).astype(np.uint8)
    oy, ox = int(rng.integers(0, ph - nh + 1)), int(rng.integers(0, pw - nw + 1))
    canvas[oy:oy + nh, ox:ox + nw] = img
    cy, cx = int(rng.integers(0, ph - 64 + 1)), int(rng.integers(0, pw - 64 + 1))
    torch.testing.assert_close(x, to_tensor(canvas[cy:cy + 64, cx:cx + 64].copy()))


def test_square_whole_images_batch_and_other_whole_images_do_not(vocsample_root, tmp_path):
    """``crop: null`` + ``resize_square`` without rescale: every item has the same size, so a
    batch of 2 trains; with a rescale the sizes differ again and batch 2 is refused before
    anything is written."""
    from pipeline.steps.cls import train_classifier
    ids = ["2007_000033", "2007_000129"]
    labels = {ids[0]: [1], ids[1]: [2]}
    p = {"arch": "cnn", "head": "gap", "backbone": {"name": "resnet10t", "pretrained": "none"},
         "crop": None, "resize_square": 64, "scale_range": [1.0, 1.0], "batch_size": 2, "iters": 2,
         "lr": 1e-3, "device": "cpu", "seed": 0, "num_workers": 0, "vflip": True,
         "transpose": True, "color_jitter": {}}
    met = train_classifier("cam", vocsample_root, ids, labels, p, tmp_path / "m.pt", log=lambda s: None)
    assert met["iters"] == 2 and (tmp_path / "m.pt").is_file()
    with pytest.raises(ValueError, match="crop is null"):
        train_classifier("cam", vocsample_root, ids, labels, {**p, "scale_range": [0.5, 1.0]},
                         tmp_path / "n.pt", log=lambda s: None)
    assert not (tmp_path / "n.pt").exists()


def test_unknown_colour_jitter_key_is_refused_up_front(vocsample_root):
    with pytest.raises(ValueError, match=r"color_jitter: unknown keys \['brightnes'\]"):
        ClassificationDataset(vocsample_root, ["2007_000033"], {"2007_000033": [1]}, crop=32,
                              color_jitter={"brightnes": 0.1})


def test_voc_profile_training_recipe_runs_at_toy_size(vocsample_root, tmp_path):
    """The `voc` profile's ViT-PCM train_cls settings (square resize, no crop, colour jitter,
    three flips, official views with the code's crop / size ratio, staged warm-up, background
    label from the manifest) train end to end, scaled down: a tiny random ViT at 48 px instead
    of ViT-B at 384 (eq_crop / eq_scale 16 / 24 = 128 / 192 x 48 / 384), batch 4, 2 iterations."""
    from vit_reference import tiny_vit
    from pipeline.io.config import load_params, stage_params
    from pipeline.steps.cls import train_classifier
    p = dict(stage_params(load_params(), "voc", "vitpcm", "train_cls"))
    assert (p["resize_square"], p["crop"], p["eq_views"], p["eq_crop"], p["eq_scale"]) == \
        (384, None, "official", 128, 192)
    assert p["color_jitter"] == {} and p["vflip"] and p["transpose"] and p["bg_label"] == "gt"
    assert p["eq_view_source"] == "base"                # view 2 from the resized image
    p.update(backbone=tiny_vit(patch=8, dim=16, depth=2, img=48), resize_square=48, eq_crop=16,
             eq_scale=24, batch_size=4, iters=2, epochs=None, freeze_warmup_iters=1,
             unfreeze_blocks=1, device="cpu", num_workers=0, amp="off", checkpoint_every=0,
             lstm_units=4)
    ids = ["2007_000033", "2007_000129", "2007_000323", "2007_000332"]
    labels = {i: [1] for i in ids}
    met = train_classifier("vitpcm", vocsample_root, ids, labels, p, tmp_path / "m.pt",
                           log=lambda s: None, no_background=[ids[1]])
    assert met["iters"] == 2 and (tmp_path / "m.pt").is_file()
    assert {"mce", "eq", "l2"} <= set(met["final"])


def test_base_view_items_are_view1_plus_an_independently_jittered_resized_image(vocsample_root):
    """``extra_views: base`` (official ``_preprocess_image``: both views from the resized image, each
    with its own ``color_transform`` / ``affine_transform``): view 1 is the item without it,
    ``base`` the S x S resize with a colour jitter of its own (replayed after view 1's draws),
    unflipped, and ``code`` view 1's (lr, ud, transpose) flags."""
    iid = "2007_000033"
    image = load_image(vocsample_root, iid)
    S = 24
    kw = dict(crop=None, scale_range=(1.0, 1.0), hflip=True, mean=HALF[0], std=HALF[1],
              resize_square=S, vflip=True, transpose=True, color_jitter={})
    plain = ClassificationDataset(vocsample_root, [iid], {iid: [1]}, **kw)
    ds = ClassificationDataset(vocsample_root, [iid], {iid: [1]}, extra_views="base", **kw)
    resized = np.asarray(Image.fromarray(image).resize((S, S), Image.BILINEAR))
    codes = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        x, y, i, extra = ds[0]
        base, code = extra["base"], extra["base_code"]
        torch.testing.assert_close(x, plain[0][0], rtol=0, atol=0)
        rng = np.random.default_rng((0, epoch, 0))
        rng.uniform(1.0, 1.0)
        hf = rng.random() < 0.5
        _jitter_by_hand(resized, rng)                           # view 1's colour draws
        vf, tr = rng.random() < 0.5, rng.random() < 0.5
        assert code.tolist() == [hf, vf, tr]
        ref = _jitter_by_hand(resized, rng)
        torch.testing.assert_close(base, to_tensor(np.ascontiguousarray(ref.astype(np.float32)), *HALF),
                                   rtol=1e-5, atol=1e-4)
        codes.add((hf, vf, tr))
    assert len(codes) > 3
    with pytest.raises(ValueError, match="eq_view_source: view1"):
        ClassificationDataset(vocsample_root, [iid], {iid: [1]}, extra_views="base",
                              **{**kw, "crop": 16})
