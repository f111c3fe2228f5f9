import numpy as np
import pytest
import torch

from pipeline.steps.seeds import maps_to_label, normalise_maps


def test_maps_to_label_threshold_by_hand():
    maps = np.array([[[0.1, 0.5], [0.9, 0.3]],
                     [[0.2, 0.6], [0.1, 0.35]]], np.float32)
    lab = maps_to_label(maps, np.array([3, 7]), 0.35)
    # (0,0): max 0.2 <= .35 -> bg; (0,1): class 7 (0.6); (1,0): class 3; (1,1): 0.35 tie -> bg
    assert (lab == np.array([[0, 7], [3, 0]])).all()
    assert (maps_to_label(np.zeros((0, 2, 2), np.float32), np.array([]), 0.3) == 0).all()
    # background included: plain argmax over channels
    probs = np.stack([1 - maps.max(0), maps[0], maps[1]])
    assert (maps_to_label(probs, np.array([0, 3, 7]), None)
            == np.array([[0, 7], [3, 0]])).all()


def test_normalise_max_and_minmax():
    m = torch.tensor([[[0.0, 2.0], [1.0, 4.0]]])
    assert torch.allclose(normalise_maps(m, "max", 0), m / 4)
    m2 = m + 1
    assert torch.allclose(normalise_maps(m2, "minmax", 0), m / 4)


# ---------------------------------------- fixed threshold vs the official best-on-GT sweep


def _hand_dataset(tmp_path, maps_by_id, cids_by_id, gts, names=("background", "a", "b")):
    from pipeline.data.voc import save_mask_png
    from pipeline.io.storage import MapWriter
    from PIL import Image
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    h5 = tmp_path / "maps.h5"
    with MapWriter(h5, list(names)) as w:
        for iid, gt in gts.items():
            Image.fromarray(np.zeros(gt.shape + (3,), np.uint8)).save(tmp_path / "JPEGImages" / f"{iid}.jpg")
            save_mask_png(tmp_path / "SegmentationClass" / f"{iid}.png", gt)
            w.write(iid, np.asarray(cids_by_id[iid]), gt.shape, **maps_by_id[iid])
    return h5


def test_best_threshold_on_gt_by_construction_and_fixed_miou_unchanged(tmp_path):
    """1 x 9 image: GT background where the map is <= 0.375, class 1 where it is >= 0.5 (values
    exact in float16). Every t in [0.375, 0.5) separates them perfectly: on the official grid
    i/100 the best is t = 0.38 (the smallest), mIoU 1. The fixed t = 0.35 calls the 0.375 pixel
    foreground: IoU bg 3/4, fg 4/5. The void pixel (map 0.75) is ignored."""
    from pipeline.engine.evaluator import BEST_ON_GT_PROTOCOL, OFFICIAL_SWEEP
    from pipeline.steps.seeds import evaluate_maps
    cam = np.array([[0.125, 0.25, 0.25, 0.375, 0.5, 0.625, 0.75, 0.75, 0.75]], np.float32)
    gt = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 255]], np.uint8)
    h5 = _hand_dataset(tmp_path, {"x": {"cams": cam[None]}}, {"x": [1]}, {"x": gt})
    args = (h5, tmp_path, ["x"], "SegmentationClass", "cams", 0.35, [0.30, 0.40])
    plain = evaluate_maps(*args)
    res = evaluate_maps(*args, sweep=OFFICIAL_SWEEP)
    assert res["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2, abs=1e-15)
    assert {k: v for k, v in res.items() if k != "best_threshold_on_gt"} == plain   # bit-identical
    b = res["best_threshold_on_gt"]
    assert b["miou"] == 1.0 and b["bg_threshold"] == 0.38 and b["protocol"] == BEST_ON_GT_PROTOCOL
    assert "not a fair number" in b["protocol"] and "100 values" in b["thresholds"]
    assert b["iou"] == {"background": 1.0, "a": 1.0, "b": None}
    assert len(b["curve"]) == 100 and b["curve"]["0.35"] == res["miou"]    # same evaluator
    assert b["curve"]["0.37"] < 1.0 and b["curve"]["0.49"] == 1.0 and b["curve"]["0.50"] < 1.0


def test_refined_sweep_replaces_the_background_channel(tmp_path):
    """Maps with a background channel (refined probs): `miou` is their arg-max; the sweep uses
    the foreground channels against a constant threshold, as evaluation.py does."""
    from pipeline.engine.labels import maps_to_label
    from pipeline.engine.metrics import confusion_matrix, scores_from_confusion
    from pipeline.engine.evaluator import OFFICIAL_SWEEP
    from pipeline.steps.seeds import evaluate_maps
    rng = np.random.default_rng(0)
    probs = rng.random((3, 6, 5)).astype(np.float32)
    probs /= probs.sum(0)
    gt = rng.choice([0, 1, 2, 255], (6, 5)).astype(np.uint8)
    h5 = _hand_dataset(tmp_path, {"y": {"probs": probs}}, {"y": [0, 1, 2]}, {"y": gt})
    res = evaluate_maps(h5, tmp_path, ["y"], "SegmentationClass", "probs", None, sweep=OFFICIAL_SWEEP)
    stored = probs.astype(np.float16).astype(np.float32)
    assert res["miou"] == scores_from_confusion(confusion_matrix(stored.argmax(0), gt, 3))["miou"]
    curve = [scores_from_confusion(confusion_matrix(maps_to_label(stored[1:], np.array([1, 2]), t),
                                                    gt, 3))["miou"] for t in OFFICIAL_SWEEP]
    b = res["best_threshold_on_gt"]
    assert b["miou"] == max(curve) and b["bg_threshold"] == OFFICIAL_SWEEP[int(np.argmax(curve))]
    assert "background channel" in b["note"]


def test_pseudo_labels_say_the_sweep_is_not_defined(tmp_path):
    from pipeline.data.voc import save_mask_png
    from pipeline.steps.pseudo import evaluate_label_dir
    gt = np.array([[0, 1], [1, 255]], np.uint8)
    h5 = _hand_dataset(tmp_path, {"z": {"cams": np.ones((1, 2, 2), np.float32)}}, {"z": [1]}, {"z": gt})
    (tmp_path / "pseudo").mkdir()
    save_mask_png(tmp_path / "pseudo" / "z.png", np.array([[0, 1], [0, 1]], np.uint8))
    res = evaluate_label_dir(tmp_path / "pseudo", tmp_path, ["z"], "SegmentationClass", ["bg", "a", "b"])
    assert res["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    b = res["best_threshold_on_gt"]
    assert b["miou"] is None and b["bg_threshold"] is None and b["protocol"].startswith("not defined")
    assert h5.is_file()
