"""The cross-method comparison table."""
import json

import numpy as np

from pipeline.steps.compare import all_background_miou, comparison, to_markdown
from pipeline.data.voc import save_mask_png


def test_all_background_miou_by_hand(tmp_path):
    (tmp_path / "SegmentationClass").mkdir()
    m = np.zeros((4, 5), np.uint8)
    m[:2, :2] = 7          # 4 px of class 7, 16 px background
    m[3, 4] = 255          # void, ignored
    save_mask_png(tmp_path / "SegmentationClass/a.png", m)
    # background IoU = 15/19 (TP 15, FP 4), class 7 IoU = 0 -> mean over the 2 classes present
    assert abs(all_background_miou(tmp_path, ["a"], "SegmentationClass") - (15 / 19) / 2) < 1e-12


def test_comparison_rows_and_markdown(tmp_path):
    r = tmp_path / "results/d"
    for m, s in (("x", 0.5), ("y", 0.25)):
        (r / m).mkdir(parents=True)
        (r / m / "miou.json").write_text(json.dumps(
            {"miou": s, "stages": {"seeds": s, "refined": s, "pseudo": s, "segmentation": s}}))
    (r / "x/own_seg_miou.json").write_text(json.dumps({"miou": 0.125}))
    (r / "y/own_seg_miou.json").write_text(json.dumps({"miou": None, "note": "no head"}))
    (r / "benchmarks/x").mkdir(parents=True)
    (r / "benchmarks/x/train_cls.tsv").write_text("s\th:m:s\n90.0\t0:01:30\n")
    (r / "benchmarks/x/eval_seg.tsv").write_text("s\th:m:s\n30.0\t0:00:30\n")
    c = comparison("d", ["x", "y", "missing"], tmp_path / "results")
    assert [row["method"] for row in c["rows"]] == ["x", "y"]
    x, y = c["rows"]
    assert x["seeds"] == 50.0 and x["own_segmentation"] == 12.5 and x["chain_minutes"] == 2.0
    assert y["own_segmentation"] is None and y["chain_minutes"] is None
    md = to_markdown(c)
    assert "| x | 50.0 | 50.0 | 50.0 | 50.0 | 12.5 | – | 2.0 |" in md
    assert "| y | 25.0 | 25.0 | 25.0 | 25.0 | – | – | – |" in md


def test_protocol_table_shows_best_on_gt_and_the_three_segmentation_numbers(tmp_path):
    import subprocess
    import sys
    r = tmp_path / "results/d"
    (r / "x").mkdir(parents=True)
    prot = {"single_scale": {"miou": 0.401}, "multi_scale_flip": {"miou": 0.452},
            "multi_scale_flip_crf": {"miou": 0.478}}
    (r / "x/miou.json").write_text(json.dumps(
        {"miou": 0.452, "configured_as": "multi_scale_flip", "protocols": prot,
         "stages": {"seeds": 0.3, "refined": 0.35, "pseudo": 0.38, "segmentation": 0.452}}))
    best = {"protocol": "official (threshold chosen on the evaluation ground truth; not a fair number)"}
    (r / "x/seeds_miou.json").write_text(json.dumps(
        {"miou": 0.3, "key": "cams", "best_threshold_on_gt": {**best, "miou": 0.333, "bg_threshold": 0.27}}))
    (r / "x/refined_miou.json").write_text(json.dumps(
        {"miou": 0.35, "best_threshold_on_gt": {**best, "miou": 0.366, "bg_threshold": 0.05}}))
    (r / "x/pseudo_miou.json").write_text(json.dumps(
        {"miou": 0.38, "best_threshold_on_gt": {"miou": None, "bg_threshold": None}}))
    (r / "y").mkdir()
    (r / "y/miou.json").write_text(json.dumps({"miou": 0.2, "stages": {"segmentation": 0.2}}))  # older file
    c = comparison("d", ["x", "y"], tmp_path / "results")
    x, y = c["rows"]
    assert (x["seeds_best_on_gt"], x["seeds_best_threshold"], x["refined_best_on_gt"]) == (33.3, 0.27, 36.6)
    assert (x["seg_single_scale"], x["seg_multi_scale_flip"], x["seg_multi_scale_flip_crf"]) == (40.1, 45.2, 47.8)
    assert x["seg_configured_as"] == "multi_scale_flip" and y["seg_single_scale"] is None
    md = to_markdown(c)
    assert "| x | 30.0 | 35.0 | 38.0 | 45.2 | – | – | – |" in md          # first table as before
    assert ("| x | 30.0 | 33.3 (τ 0.27) | 35.0 | 36.6 (τ 0.05) | 38.0 | 40.1 | 45.2 | 47.8 |") in md
    assert "| y | – | – | – | – | – | – | – | – |" in md
    assert "DeepLabV2 single scale | DeepLabV2 MS + flip | DeepLabV2 MS + flip + CRF |" in md
    assert "not a fair number" in md and "no threshold sweep is defined" in md
    # the stage writes the same numbers to comparison.json / .md
    out = subprocess.run([sys.executable, "-m", "stages.compare", "--dataset", "d", "--methods", "x",
                          "--results", str(tmp_path / "results")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    j = json.loads((r / "comparison.json").read_text())
    assert j["rows"][0]["seg_multi_scale_flip_crf"] == 47.8 and j["rows"][0]["seeds_best_on_gt"] == 33.3
    assert "33.3 (τ 0.27)" in (r / "comparison.md").read_text()
