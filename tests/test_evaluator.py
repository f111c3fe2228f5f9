"""pipeline.engine.evaluator: the one evaluation loop, against per-pixel brute force."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.voc import save_mask_png
from pipeline.engine.evaluator import SWEEP, Evaluator
from pipeline.engine.metrics import PredictionRangeError

C = 4
NAMES = ["bg", "a", "b", "c"]
SIZES = {"i0": (7, 9), "i1": (5, 6), "i2": (8, 4)}


def _dataset(tmp_path, seed=0):
    """Random GT (some 255) per id in ``<tmp>/SegmentationClass`` and random predictions
    with 255 pixels too; returns (gts, preds)."""
    rng = np.random.default_rng(seed)
    (tmp_path / "SegmentationClass").mkdir()
    gts, preds = {}, {}
    for iid, shape in SIZES.items():
        gt = rng.integers(0, C, shape).astype(np.uint8)
        gt[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, C, shape).astype(np.uint8)
        pred[rng.random(shape) < 0.1] = 255
        save_mask_png(tmp_path / "SegmentationClass" / f"{iid}.png", gt)
        gts[iid], preds[iid] = gt, pred
    return gts, preds


def _brute_force(pairs):
    """mIoU, per-class IoU, pixel accuracy by a loop over every pixel of every (pred, gt)."""
    inter, union, correct, total = [0] * C, [0] * C, 0, 0
    for pred, gt in pairs:
        for y in range(gt.shape[0]):
            for x in range(gt.shape[1]):
                g, p = int(gt[y, x]), int(pred[y, x])
                if g == 255 or p == 255:
                    continue
                total += 1
                correct += g == p
                for c in range(C):
                    inter[c] += (g == c) and (p == c)
                    union[c] += (g == c) or (p == c)
    iou = [inter[c] / union[c] if union[c] else None for c in range(C)]
    present = [v for v in iou if v is not None]
    return sum(present) / len(present), iou, correct / total


def test_scores_match_per_pixel_brute_force_and_pngs_are_saved(tmp_path):
    gts, preds = _dataset(tmp_path)
    ev = Evaluator(tmp_path, "SegmentationClass", NAMES)
    res = ev.run(list(SIZES), lambda iid: preds[iid], save_dir=tmp_path / "out")
    miou, iou, acc = _brute_force((preds[i], gts[i]) for i in SIZES)
    assert res["miou"] == pytest.approx(miou, abs=1e-12)
    assert res["pixel_accuracy"] == pytest.approx(acc, abs=1e-12)
    for n, v in zip(NAMES, iou):
        assert res["iou"][n] == (None if v is None else pytest.approx(v, abs=1e-12)), n
    assert res["num_images"] == 3 and list(res)[-1] == "num_images"
    for iid in SIZES:
        with Image.open(tmp_path / "out" / f"{iid}.png") as im:
            np.testing.assert_array_equal(np.asarray(im), preds[iid])
    assert not (tmp_path / "out.tmp").exists()


def test_streams_each_score_their_own_label_maps(tmp_path):
    """Two streams, one given the same array as the first (scored once, added to both)."""
    gts, preds = _dataset(tmp_path, seed=1)
    other = {i: np.where(p == 255, 255, (p + 1) % C).astype(np.uint8) for i, p in preds.items()}
    ev = Evaluator(tmp_path, "SegmentationClass", NAMES, streams=["x", "same", "other"])
    res = ev.run(list(SIZES), lambda iid: {"x": preds[iid], "same": preds[iid], "other": other[iid]})
    assert res == {**ev.scores("x"), "num_images": 3}
    assert ev.scores("same") == ev.scores("x")
    assert ev.scores("other")["miou"] == pytest.approx(_brute_force((other[i], gts[i]) for i in SIZES)[0],
                                                       abs=1e-12)
    with pytest.raises(ValueError, match="streams"):
        ev.add("i0", {"x": preds["i0"]})          # a stream missing
    with pytest.raises(ValueError, match="distinct"):
        Evaluator(tmp_path, "SegmentationClass", NAMES, streams=["a", "a"])


def test_threshold_sweep_matches_a_brute_force_loop(tmp_path):
    """Per threshold t and pixel: background if max_c maps <= t (in the maps' float32, ties
    with t = 0.3, 0.5, 0.7 included) else the first arg-max channel's class."""
    gts, _ = _dataset(tmp_path, seed=2)
    rng = np.random.default_rng(5)
    cids = {"i0": np.array([1, 3]), "i1": np.array([2]), "i2": np.array([], np.int64)}
    maps = {i: (rng.integers(0, 11, (len(cids[i]),) + SIZES[i]) / 10).astype(np.float32) for i in SIZES}
    ts = [0.0, 0.25, 0.3, 0.5, 0.7, 0.95]
    ev = Evaluator(tmp_path, "SegmentationClass", NAMES, sweep=ts)
    ev.run(list(SIZES), lambda iid: {"main": np.zeros(SIZES[iid], np.uint8), SWEEP: (maps[iid], cids[iid])})
    ref = np.zeros((len(ts), C, C), np.int64)
    for k, t in enumerate(ts):
        for iid in SIZES:
            gt, m = gts[iid], maps[iid]
            for y in range(gt.shape[0]):
                for x in range(gt.shape[1]):
                    if gt[y, x] == 255:
                        continue
                    label = 0
                    if len(cids[iid]):
                        v = [float(m[c, y, x]) for c in range(len(cids[iid]))]
                        if max(v) > float(np.float32(t)):
                            label = int(cids[iid][v.index(max(v))])
                    ref[k, gt[y, x], label] += 1
    np.testing.assert_array_equal(ev.sweep_conf, ref)
    mious = [_brute_force_conf(ref[k]) for k in range(len(ts))]
    best = ev.best_threshold_on_gt()
    assert best["miou"] == pytest.approx(max(mious), abs=1e-12)
    assert best["bg_threshold"] == ts[int(np.argmax(mious))]
    assert list(best["curve"]) == [f"{t:.2f}" for t in ts]


def _brute_force_conf(M):
    ious = [M[c, c] / (M[c].sum() + M[:, c].sum() - M[c, c]) for c in range(C)
            if M[c].sum() + M[:, c].sum() > 0]
    return sum(ious) / len(ious)


def test_prediction_outside_the_classes_names_the_file_and_keeps_the_folder(tmp_path):
    gts, preds = _dataset(tmp_path, seed=3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.png").write_bytes(b"x")
    bad = dict(preds, i1=np.where(preds["i1"] == 2, 9, preds["i1"]).astype(np.uint8))
    ev = Evaluator(tmp_path, "SegmentationClass", NAMES)
    with pytest.raises(PredictionRangeError, match=r"pred/i1\.png holds values \[9\]"):
        ev.run(list(SIZES), lambda iid: bad[iid], name=lambda iid: f"pred/{iid}.png",
               save_dir=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.png"]
    assert not (tmp_path / "out.tmp").exists()


def test_ground_truth_is_read_once_per_id(tmp_path, monkeypatch):
    """A prediction function that needs the mask (all background) shares the loop's read."""
    import pipeline.engine.evaluator as E
    gts, _ = _dataset(tmp_path, seed=4)
    reads = []
    real = E.load_mask
    monkeypatch.setattr(E, "load_mask", lambda *a: (reads.append(a[1]), real(*a))[1])
    ev = Evaluator(tmp_path, "SegmentationClass", NAMES)
    res = ev.run(list(SIZES), lambda iid: np.zeros_like(ev.ground_truth(iid)))
    assert reads == list(SIZES)
    assert res["miou"] == pytest.approx(_brute_force((np.zeros_like(gts[i]), gts[i]) for i in SIZES)[0],
                                        abs=1e-12)
