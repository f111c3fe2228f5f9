"""train_seg / load_model / predict / evaluate on a tiny synthetic VOC-layout dataset."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.transforms import to_tensor
from pipeline.data.voc import DatasetError, save_mask_png
from pipeline.engine.metrics import confusion_matrix, scores_from_confusion
from pipeline.steps.segment import seg_loss, train_seg
from pipeline.steps.segment_eval import evaluate, load_model, predict

COLOURS = {1: (220, 40, 40), 2: (40, 200, 60)}
TINY = {"backbone": "resnet10t", "pretrained": None, "crop": 48, "batch_size": 4, "iters": 40,
        "lr": 0.01, "scale_range": [0.9, 1.1], "seed": 0, "num_workers": 0, "log_every": 10}


def _make_dataset(root: Path, n: int = 6, size: int = 48) -> list[str]:
    rng = np.random.default_rng(123)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    ids = []
    for k in range(n):
        img = rng.normal(120, 12, (size, size, 3))
        mask = np.zeros((size, size), np.uint8)
        for c in (1, 2) if k % 3 else (1 + k % 2,):
            s = int(rng.integers(14, 20))
            y, x = rng.integers(0, size - s, 2)
            img[y:y + s, x:x + s] = np.array(COLOURS[c]) + rng.normal(0, 8, (s, s, 3))
            mask[y:y + s, x:x + s] = c
        # VOC-style void outline around objects
        fg = mask > 0
        dil = fg.copy()
        dil[1:] |= fg[:-1]; dil[:-1] |= fg[1:]; dil[:, 1:] |= fg[:, :-1]; dil[:, :-1] |= fg[:, 1:]
        mask[dil & ~fg] = 255
        iid = f"2000_{k:06d}"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{iid}.jpg",
                                                                quality=95)
        save_mask_png(root / "SegmentationClass" / f"{iid}.png", mask)
        ids.append(iid)
    return ids


def _read(path: Path, rgb: bool = False) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB") if rgb else im)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return root, _make_dataset(root)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    root, ids = data
    ck = tmp_path_factory.mktemp("ck") / "seg.pth"
    metrics = train_seg(root, ids, root / "SegmentationClass", ck, TINY, log=lambda s: None)
    return ck, metrics


def test_train_loss_decreases_and_checkpoint(trained):
    ck, m = trained
    curve = m["loss_curve"]
    print("loss curve", curve)
    assert [c["iter"] for c in curve] == [10, 20, 30, 40]
    assert curve[-1]["loss"] < 0.6 * curve[0]["loss"]
    assert m["final_loss"] == curve[-1]["loss"] and m["wall_time_s"] > 0
    assert ck.is_file() and not ck.with_name(ck.name + ".tmp").exists()
    saved = torch.load(ck, map_location="cpu", weights_only=True)
    assert set(saved) == {"state_dict", "params", "num_classes"}
    assert saved["num_classes"] == 21 and saved["params"]["backbone"] == "resnet10t"


def test_trained_model_beats_all_background(trained, data, tmp_path):
    ck, _ = trained
    root, ids = data
    model = load_model(ck)
    scores = evaluate(model, root, ids, "SegmentationClass", tmp_path / "pred",
                      {"scales": [1.0], "flip": False}, log=lambda s: None)
    conf0 = np.zeros((21, 21), np.int64)
    for i in ids:
        gt = _read(root / "SegmentationClass" / f"{i}.png")
        conf0 += confusion_matrix(np.zeros_like(gt), gt, 21)
    bg = scores_from_confusion(conf0)["miou"]  # = IoU_bg / 3
    print("trained mIoU", scores["miou"], "all-background", bg)
    assert scores["miou"] > bg + 0.2, (scores["miou"], bg)


def test_checkpoint_round_trip_identical(trained, data):
    ck, _ = trained
    root, ids = data
    a, b = load_model(ck), load_model(ck)
    x = to_tensor(_read(root / "JPEGImages" / f"{ids[0]}.jpg", rgb=True))[None]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    sd = torch.load(ck, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_training_is_deterministic_and_worker_independent(data, tmp_path):
    root, ids = data
    p = dict(TINY, iters=2, log_every=1)
    m1 = train_seg(root, ids, root / "SegmentationClass", tmp_path / "a.pth", p, log=lambda s: None)
    m2 = train_seg(root, ids, root / "SegmentationClass", tmp_path / "b.pth",
                   dict(p, num_workers=1), log=lambda s: None)
    assert [c["loss"] for c in m1["loss_curve"]] == pytest.approx([c["loss"] for c in m2["loss_curve"]],
                                                                  rel=1e-5)
    sa = torch.load(tmp_path / "a.pth", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b.pth", weights_only=True)["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_ignored_pixels_do_not_affect_loss_or_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[:, :3] = 255
    loss = seg_loss(logits, target)
    loss.backward()
    assert torch.all(logits.grad[:, :, :3] == 0)
    assert torch.any(logits.grad[:, :, 3:] != 0)
    valid = target != 255
    manual = F.cross_entropy(logits.detach().permute(0, 2, 3, 1)[valid], target[valid])
    torch.testing.assert_close(loss.detach(), manual)
    # changing the logits at ignored pixels leaves the loss unchanged
    other = logits.detach().clone()
    other[:, :, :3] = torch.randn_like(other[:, :, :3]) * 100
    torch.testing.assert_close(seg_loss(other, target), loss.detach())
    # all-ignored batch: zero loss and zero (finite) gradient instead of NaN
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    l0 = seg_loss(z, torch.full((1, 8, 8), 255))
    l0.backward()
    assert float(l0.detach()) == 0.0 and torch.all(z.grad == 0)


def test_ignored_labels_do_not_change_model_gradient():
    """Through the model + bilinear upsampling: 255 pixels contribute no gradient at all."""
    from pipeline.models.deeplab import DeepLabV2
    torch.manual_seed(0)
    m = DeepLabV2("resnet10t", num_classes=3, pretrained=None).eval()
    x = torch.randn(1, 3, 32, 32)
    y = torch.randint(0, 3, (1, 32, 32))
    y[:, 10:20, 5:25] = 255
    seg_loss(m(x), y).backward()
    g1 = m.aspp.branches[0].weight.grad.clone()
    m.zero_grad()
    up = F.interpolate(m(x), size=(32, 32), mode="bilinear", align_corners=False)
    valid = y != 255
    F.cross_entropy(up.permute(0, 2, 3, 1)[valid], y[valid]).backward()
    torch.testing.assert_close(m.aspp.branches[0].weight.grad, g1)


def test_predict_flip_and_scale_averaging(trained, data):
    ck, _ = trained
    root, ids = data
    model = load_model(ck)
    img = _read(root / "JPEGImages" / f"{ids[1]}.jpg", rgb=True)[:, :40]
    H, W = img.shape[:2]
    prob = predict(model, img, scales=(1.0,), flip=True)
    assert prob.shape == (21, H, W) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-5)
    x = to_tensor(img)[None]
    with torch.no_grad():
        p0 = F.interpolate(model(x), (H, W), mode="bilinear", align_corners=False).softmax(1)[0]
        p1 = F.interpolate(model(x.flip(-1)), (H, W), mode="bilinear",
                           align_corners=False).softmax(1)[0].flip(-1)
    np.testing.assert_allclose(prob, ((p0 + p1) / 2).numpy(), atol=1e-5)
    np.testing.assert_allclose(predict(model, img, scales=(1.0,), flip=False), p0.numpy(), atol=1e-5)
    ms = predict(model, img, scales=(0.5, 1.0), flip=False)
    half = predict(model, img, scales=(0.5,), flip=False)
    np.testing.assert_allclose(ms, (half + p0.numpy()) / 2, atol=1e-5)
    assert model.training is False


def test_evaluate_writes_pngs_and_miou_matches_brute_force(trained, data, tmp_path):
    ck, _ = trained
    root, ids = data
    model = load_model(ck)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    (pred_dir / "stale.png").write_bytes(b"x")  # replaced atomically
    scores = evaluate(model, root, ids, "SegmentationClass", pred_dir,
                      {"scales": [1.0], "flip": True}, log=lambda s: None)
    files = sorted(p.name for p in pred_dir.iterdir())
    assert files == sorted(f"{i}.png" for i in ids)
    assert not Path(str(pred_dir) + ".tmp").exists()
    assert scores["num_images"] == len(ids)
    # brute force IoU from the saved PNGs
    inter = np.zeros(21)
    union = np.zeros(21)
    for i in ids:
        with Image.open(pred_dir / f"{i}.png") as im:
            assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]
            pred = np.asarray(im)
        gt = _read(root / "SegmentationClass" / f"{i}.png")
        ok = gt != 255
        for c in range(21):
            inter[c] += np.sum((pred == c) & (gt == c) & ok)
            union[c] += np.sum(((pred == c) | (gt == c)) & ok)
    iou = [inter[c] / union[c] for c in range(21) if union[c] > 0]
    assert scores["miou"] == pytest.approx(float(np.mean(iou)), abs=1e-12)
    assert scores["iou"]["aeroplane"] == pytest.approx(inter[1] / union[1])


def test_evaluate_applies_crf_with_given_kwargs(trained, data, tmp_path, monkeypatch):
    ck, _ = trained
    root, ids = data
    calls = []

    def fake_crf(image, probs, **kw):
        calls.append((image.shape, probs.shape, kw))
        out = np.zeros_like(probs)
        out[2] = 1.0  # everything -> class 2
        return out

    mod = types.ModuleType("pipeline.steps.refine.crf")
    mod.dense_crf = fake_crf
    monkeypatch.setitem(sys.modules, "pipeline.steps.refine.crf", mod)
    import pipeline.steps.refine
    monkeypatch.setattr(pipeline.steps.refine, "crf", mod, raising=False)
    crf = {"gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 67, "bilateral_srgb": 3,
           "bilateral_compat": 4, "iters": 10}
    evaluate(load_model(ck), root, ids[:2], "SegmentationClass", tmp_path / "p",
             {"scales": [1.0], "flip": False, "crf": crf}, log=lambda s: None)
    assert len(calls) == 2 and calls[0] == ((48, 48, 3), (21, 48, 48), crf)
    assert np.all(_read(tmp_path / "p" / f"{ids[0]}.png") == 2)


def test_missing_pseudo_label_raises(data, tmp_path):
    root, ids = data
    pdir = tmp_path / "pseudo"
    pdir.mkdir()
    for i in ids[1:]:
        (pdir / f"{i}.png").write_bytes((root / "SegmentationClass" / f"{i}.png").read_bytes())
    with pytest.raises(DatasetError, match=f"{ids[0]}.png"):
        train_seg(root, ids, pdir, tmp_path / "x.pth", TINY, log=lambda s: None)
    save_mask_png(pdir / f"{ids[0]}.png", np.zeros((40, 48), np.uint8))
    with pytest.raises(DatasetError, match=f"{ids[0]}.png.*48x40"):
        train_seg(root, ids, pdir, tmp_path / "x.pth", TINY, log=lambda s: None)
    assert not (tmp_path / "x.pth").exists()


def test_bad_label_value_raises(data, tmp_path):
    root, ids = data
    pdir = tmp_path / "pseudo"
    pdir.mkdir()
    for i in ids:
        save_mask_png(pdir / f"{i}.png", np.full((48, 48), 30, np.uint8))
    before = torch.get_num_threads()
    with pytest.raises(DatasetError, match="num_classes"):
        train_seg(root, ids, pdir, tmp_path / "x.pth", dict(TINY, iters=1, num_threads=2),
                  log=lambda s: None)
    assert torch.get_num_threads() == before  # num_threads is restored even on errors


# ------------------------------------------------- test protocols: single scale, MS + flip, + CRF


class _TinySeg(torch.nn.Module):
    """3-class 'segmenter' whose output depends on scale and on flips (stride-4 asymmetric conv)."""
    num_classes = 3

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 5, stride=4, padding=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()

    def forward(self, x):
        return 2.0 * self.conv(x)


def _brute_force_miou(root, ids, model, scales, flip, crf=None):
    """Each pass run alone by hand, softmax averaged, arg-max, IoU by loops over classes."""
    from pipeline.steps.refine.crf import dense_crf
    C = 3
    inter, union = np.zeros(C), np.zeros(C)
    for i in ids:
        img = _read(root / "JPEGImages" / f"{i}.jpg", rgb=True)
        gt = _read(root / "SegmentationClass" / f"{i}.png")
        H, W = gt.shape
        x = to_tensor(img)[None]
        passes = []
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, size=(round(H * s), round(W * s)),
                                                  mode="bilinear", align_corners=False)
            for f in ((False, True) if flip else (False,)):
                with torch.no_grad():
                    out = model(xs.flip(-1) if f else xs)
                    p = F.interpolate(out, (H, W), mode="bilinear", align_corners=False).softmax(1)[0]
                passes.append(p.flip(-1) if f else p)
        prob = (sum(passes) / len(passes)).numpy()
        if crf:
            prob = dense_crf(img, prob, **crf)
        pred = prob.argmax(0)
        for c in range(C):
            for y in range(H):
                for xx in range(W):
                    if gt[y, xx] == 255:
                        continue
                    a, b = pred[y, xx] == c, gt[y, xx] == c
                    inter[c] += a and b
                    union[c] += a or b
    return float(np.mean([inter[c] / union[c] for c in range(C) if union[c] > 0]))


ALL = ["single_scale", "multi_scale_flip", "multi_scale_flip_crf"]


def test_protocols_match_brute_force_and_leave_the_configured_miou_unchanged(data, tmp_path):
    from pipeline.steps.segment_eval import DEEPLAB_CRF
    root, ids = data
    model = _TinySeg().eval()
    conf = {"scales": [0.5, 1.0], "flip": True, "crf": None}
    plain = evaluate(model, root, ids, "SegmentationClass", tmp_path / "a", conf, log=lambda s: None)
    res = evaluate(model, root, ids, "SegmentationClass", tmp_path / "b", {**conf, "protocols": ALL},
                   log=lambda s: None)
    for k in ("miou", "iou", "pixel_accuracy", "mean_accuracy", "num_images"):
        assert res[k] == plain[k], k                        # the configured number, bit-identical
    for i in ids:
        np.testing.assert_array_equal(_read(tmp_path / "a" / f"{i}.png"), _read(tmp_path / "b" / f"{i}.png"))
    pr = res["protocols"]
    assert list(pr) == ALL and res["configured_as"] == "multi_scale_flip"
    ss = _brute_force_miou(root, ids, model, [1.0], False)
    ms = _brute_force_miou(root, ids, model, [0.5, 1.0], True)
    crf = _brute_force_miou(root, ids, model, [0.5, 1.0], True, DEEPLAB_CRF)
    assert ss != ms                                         # the fixture tells them apart
    assert pr["single_scale"]["miou"] == pytest.approx(ss, abs=1e-12)
    assert pr["multi_scale_flip"]["miou"] == pytest.approx(ms, abs=1e-12) == res["miou"]
    assert pr["multi_scale_flip_crf"]["miou"] == pytest.approx(crf, abs=1e-12)
    assert pr["single_scale"]["scales"] == [1.0] and pr["single_scale"]["flip"] is False
    assert pr["multi_scale_flip_crf"]["crf"] == DEEPLAB_CRF and pr["multi_scale_flip_crf"]["crf_seconds"] >= 0
    assert pr["multi_scale_flip"]["same_as_configured"] and not pr["single_scale"]["same_as_configured"]


def test_protocols_when_the_configured_one_has_no_scale_1_no_flip_and_a_crf(data, tmp_path):
    """Every protocol needs its own passes here: an extra scale-1.0 forward, extra flipped
    forwards, a CRF (the configured one) on the MS + flip probabilities."""
    root, ids = data
    model = _TinySeg().eval()
    crf = {"gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 20, "bilateral_srgb": 10,
           "bilateral_compat": 5, "iters": 5}
    conf = {"scales": [0.5, 0.75], "flip": False, "crf": crf}
    plain = evaluate(model, root, ids[:4], "SegmentationClass", tmp_path / "a", conf, log=lambda s: None)
    res = evaluate(model, root, ids[:4], "SegmentationClass", tmp_path / "b", {**conf, "protocols": ALL},
                   log=lambda s: None)
    assert res["miou"] == plain["miou"] and res["configured_as"] is None
    assert res["miou"] == pytest.approx(_brute_force_miou(root, ids[:4], model, [0.5, 0.75], False, crf), abs=1e-12)
    pr = res["protocols"]
    assert pr["single_scale"]["miou"] == pytest.approx(_brute_force_miou(root, ids[:4], model, [1.0], False), abs=1e-12)
    assert pr["multi_scale_flip"]["miou"] == pytest.approx(
        _brute_force_miou(root, ids[:4], model, [0.5, 0.75], True), abs=1e-12)
    assert pr["multi_scale_flip_crf"]["miou"] == pytest.approx(
        _brute_force_miou(root, ids[:4], model, [0.5, 0.75], True, crf), abs=1e-12)
    assert pr["multi_scale_flip_crf"]["crf"] == crf
    with pytest.raises(ValueError, match="unknown.*multi_scale"):
        evaluate(model, root, ids[:1], "SegmentationClass", tmp_path / "c",
                 {**conf, "protocols": ["multi_scale"]}, log=lambda s: None)
