import numpy as np
import pytest

from pipeline.engine.metrics import confusion_matrix, scores_from_confusion


def test_confusion_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    M = confusion_matrix(pred, gt, 3)
    expect = np.array([[1, 1, 0],     # gt 0: one right, one predicted 1
                       [0, 2, 0],     # gt 1: both right
                       [0, 1, 0]])    # gt 2: predicted 1; the 255 pixel is ignored
    assert (M == expect).all()
    s = scores_from_confusion(M, ["bg", "a", "b"])
    # IoU bg = 1/(1+0+1)=0.5 ; a = 2/(2+2+0)=0.5 ; b = 0/(0+0+1)=0
    assert s["iou"] == {"bg": 0.5, "a": 0.5, "b": 0.0}
    assert s["miou"] == pytest.approx(1 / 3)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)


def test_absent_class_is_excluded_from_mean():
    gt = np.array([0, 0, 1, 1])
    M = confusion_matrix(gt, gt, 4)
    s = scores_from_confusion(M)
    assert s["miou"] == 1.0 and s["iou"]["2"] is None and s["iou"]["3"] is None


def test_bincount_equals_per_image_loop():
    rng = np.random.default_rng(0)
    C = 21
    total = np.zeros((C, C), np.int64)
    brute = np.zeros((C, C), np.int64)
    for _ in range(5):
        gt = rng.integers(0, C, (17, 23))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = rng.integers(0, C, gt.shape)
        total += confusion_matrix(pred, gt, C)
        for g, p in zip(gt.ravel(), pred.ravel()):
            if g != 255:
                brute[g, p] += 1
    assert (total == brute).all()


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_confusion_matches_pixel_loop_for_any_integer_dtype(dtype):
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 23, (17, 13))
    gt[0, :5] = 255 if dtype == np.uint8 else -1
    pred = rng.integers(0, 21, (17, 13))
    ref = np.zeros((21, 21), np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if 0 <= g < 21:
            ref[g, p] += 1
    got = confusion_matrix(pred.astype(dtype), gt.astype(dtype) if dtype != np.uint8 else np.where(gt < 0, 255, gt).astype(np.uint8), 21)
    assert np.array_equal(got, ref)


# ------------------------------------------------------------------ issue 14: values out of range
def test_prediction_outside_classes_raises_naming_the_file():
    from pipeline.engine.metrics import PredictionRangeError
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 7, 0]], np.uint8)     # 7 with C = 3
    with pytest.raises(PredictionRangeError, match=r"pred/im1\.png holds values \[7\] \(1 pixels\) "
                                                   r"outside the class ids 0\.\.2"):
        confusion_matrix(pred, gt, 3, name="pred/im1.png")
    assert issubclass(PredictionRangeError, ValueError)
    with pytest.raises(PredictionRangeError, match=r"\[-1, 3\]"):   # negative and == C, signed
        confusion_matrix(np.array([[0, -1, 3], [1, 1, 3]]), gt, 3, name="x")


def test_prediction_ignore_index_passes_and_is_ignored():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 255, 1], [1, 1, 255]], np.uint8)
    M = confusion_matrix(pred, gt, 3, name="pred/im1.png")
    # pixels kept: (0,0)->0 ; (0,2) 1->1 ; (1,0) 1->1 ; (1,1) 2->1 ; 255 pred and 255 gt dropped
    assert np.array_equal(M, np.array([[1, 0, 0], [0, 2, 0], [0, 1, 0]]))


def test_gt_outside_classes_is_ignored_like_255():
    """GT stray values (listed by prepare_dataset, not an error here) drop those pixels."""
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    a = confusion_matrix(pred, np.array([[0, 0, 1], [1, 37, 255]]), 3)
    b = confusion_matrix(pred, np.array([[0, 0, 1], [1, 255, 255]]), 3)
    assert np.array_equal(a, b) and a.sum() == 4


def test_stage_cli_prints_one_line_naming_the_prediction_file(tmp_path, capsys):
    from pipeline.data.voc import save_mask_png
    from pipeline.steps.pseudo import evaluate_label_dir
    from stages._common import run_cli
    from tests.test_bad_inputs import make_voc
    data, ids = make_voc(tmp_path / "ds", n=2)
    pred = tmp_path / "pseudo"
    pred.mkdir()
    save_mask_png(pred / "im0.png", np.zeros((20, 30), np.uint8))
    bad = np.zeros((20, 30), np.uint8)
    bad[3:5, 3:5] = 37
    save_mask_png(pred / "im1.png", bad)
    with pytest.raises(SystemExit) as ei:
        run_cli("make_pseudo_labels",
                lambda: evaluate_label_dir(pred, tmp_path / "ds", ids, "SegmentationClass"))
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("ERROR [make_pseudo_labels]:")]
    assert len(lines) == 1 and str(pred / "im1.png") in lines[0] and "[37] (4 pixels)" in lines[0]


# ------------------------------------------------------------ background-threshold sweep


def test_threshold_sweep_equals_one_confusion_per_threshold():
    """threshold_sweep_confusion == confusion_matrix(maps_to_label(.., t)) for every t,
    ties (map value == threshold) included, void GT ignored, no-class images all background."""
    from pipeline.engine.labels import maps_to_label
    from pipeline.engine.metrics import threshold_sweep_confusion
    rng = np.random.default_rng(3)
    ts = [i / 100 for i in range(100)]
    for k, dtype in ((3, np.float32), (1, np.float64), (2, np.float16), (0, np.float32)):
        maps = (rng.integers(0, 41, (k, 9, 7)) / 40).astype(dtype)   # many exact ties with i/100
        cids = np.array([5, 2, 7][:k])
        gt = rng.choice([0, 2, 5, 7, 255], (9, 7)).astype(np.uint8)
        got = threshold_sweep_confusion(maps, cids, gt, ts, 8)
        assert got.shape == (100, 8, 8)
        for i, t in enumerate(ts):
            np.testing.assert_array_equal(got[i], confusion_matrix(maps_to_label(maps, cids, t), gt, 8),
                                          err_msg=f"k={k} t={t}")


def test_threshold_sweep_rejects_bad_input():
    from pipeline.engine.metrics import PredictionRangeError, threshold_sweep_confusion
    maps = np.full((1, 2, 2), 0.9, np.float32)
    gt = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="ascending"):
        threshold_sweep_confusion(maps, [1], gt, [0.5, 0.2], 3)
    with pytest.raises(PredictionRangeError, match="img7"):
        threshold_sweep_confusion(maps, [4], gt, [0.5], 3, name="img7")
    # a class id outside the set is fine where it is never predicted (below every threshold)
    assert threshold_sweep_confusion(maps * 0.1, [4], gt, [0.5], 3)[0, 0, 0] == 4
