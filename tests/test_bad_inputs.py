"""Bad inputs: each gets a documented, counted conversion/skip or a clear error naming the
file — never a silent wrong output."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.data.prepare import build_manifest
from pipeline.data.voc import VOC_PALETTE, DatasetError, load_image, load_mask, save_mask_png
from tests.conftest import REPO


def make_voc(root, n=3, size=(20, 30)):
    """A tiny VOC-layout dataset: image k has class k+1 in its top-left block."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"im{k}" for k in range(n)]
    for k, iid in enumerate(ids):
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / "JPEGImages" / f"{iid}.jpg")
        m = np.zeros(size, np.uint8)
        m[:8, :8] = k + 1
        m[8, :8] = 255
        save_mask_png(root / "SegmentationClass" / f"{iid}.png", m)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return {"root": str(root), "label_dir": "SegmentationClass",
            "splits": {"train": "ImageSets/Segmentation/train.txt"}}, ids


def test_grey_and_cmyk_jpegs_are_converted_and_counted(tmp_path):
    data, ids = make_voc(tmp_path)
    img = Image.open(tmp_path / "JPEGImages/im0.jpg")
    img.convert("L").save(tmp_path / "JPEGImages/im0.jpg")
    img.convert("CMYK").save(tmp_path / "JPEGImages/im1.jpg")
    m = build_manifest(data, log=lambda s: None)
    assert m["image_modes"] == {"L": 1, "CMYK": 1, "RGB": 1}
    for iid in ids:
        x = load_image(tmp_path, iid)
        assert x.shape == (20, 30, 3) and x.dtype == np.uint8
    grey = load_image(tmp_path, "im0")
    assert (grey[..., 0] == grey[..., 1]).all()


def test_truncated_jpeg_is_named(tmp_path):
    data, _ = make_voc(tmp_path, size=(64, 64))
    p = tmp_path / "JPEGImages/im2.jpg"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(DatasetError, match=r"im2\.jpg cannot be decoded.*truncated"):
        build_manifest(data, log=lambda s: None)
    with pytest.raises(DatasetError, match=r"im2\.jpg"):
        load_image(tmp_path, "im2")


def test_mask_of_other_size_is_refused(tmp_path):
    data, _ = make_voc(tmp_path)
    save_mask_png(tmp_path / "SegmentationClass/im1.png", np.zeros((30, 20), np.uint8))
    with pytest.raises(DatasetError, match=r"im1\.png is 20x30 but .*im1\.jpg is 30x20"):
        build_manifest(data, log=lambda s: None)


def test_rgb_mask_is_converted_through_the_palette_or_refused(tmp_path):
    data, _ = make_voc(tmp_path)
    idx = load_mask(tmp_path, "im1")
    rgb = VOC_PALETTE[idx].astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "SegmentationClass/im1.png")
    assert np.array_equal(load_mask(tmp_path, "im1"), idx)  # classes and void (255) recovered
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb, "RGB").save(tmp_path / "SegmentationClass/im1.png")
    with pytest.raises(DatasetError, match=r"im1\.png is an RGB image with colours not in the VOC palette: \[\(1, 2, 3\)\]"):
        load_mask(tmp_path, "im1")


def test_listed_id_without_files_and_empty_split(tmp_path):
    data, ids = make_voc(tmp_path)
    split = tmp_path / "ImageSets/Segmentation/train.txt"
    split.write_text("\n".join(ids + ["ghost"]) + "\n")
    with pytest.raises(DatasetError, match=r"ghost\.jpg listed in a split file is missing"):
        build_manifest(data, log=lambda s: None)
    split.write_text("\n")
    with pytest.raises(DatasetError, match="is empty"):
        build_manifest(data, log=lambda s: None)


def test_image_without_foreground_is_kept_and_listed(tmp_path):
    data, _ = make_voc(tmp_path)
    save_mask_png(tmp_path / "SegmentationClass/im2.png", np.zeros((20, 30), np.uint8))
    logs = []
    m = build_manifest(data, log=logs.append)
    assert m["no_foreground"] == ["im2"] and m["labels"]["im2"] == []
    assert any("1 images without a foreground class" in s for s in logs)


def test_stage_cli_prints_one_line_error_and_writes_nothing(tmp_path):
    data, _ = make_voc(tmp_path / "ds")
    save_mask_png(tmp_path / "ds/SegmentationClass/im0.png", np.zeros((5, 5), np.uint8))
    out = tmp_path / "dataset.json"
    r = subprocess.run([sys.executable, "-m", "stages.prepare_dataset", "--dataset", "demo",
                        "--params-json", json.dumps({"data": data, "seed": 0}), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "ERROR [prepare_dataset]:" in r.stderr and "im0.png" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_nan_loss_stops_with_iteration_and_batch_ids(tmp_path, monkeypatch):
    import pipeline.steps.cls as cls
    data, ids = make_voc(tmp_path, n=4, size=(32, 32))
    labels = build_manifest(data, log=lambda s: None)["labels"]
    real = cls.get_method

    class NanAtThird:
        def __init__(self, m):
            self.m, self.n = m, 0

        def __getattr__(self, k):
            return getattr(self.m, k)

        def loss(self, *a, **kw):
            loss, parts = self.m.loss(*a, **kw)
            self.n += 1
            return (loss * float("nan") if self.n == 3 else loss), parts

    monkeypatch.setattr(cls, "get_method", lambda name: NanAtThird(real(name)))
    p = {"backbone": {"name": "vit_tiny_patch16_224", "pretrained": "none",
                      "overrides": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
         "head": "gmp", "crop": 32, "batch_size": 2, "iters": 5, "lr": 1e-3, "device": "cpu",
         "seed": 0, "num_workers": 0}
    with pytest.raises(FloatingPointError, match=r"iteration 3 of 5; batch ids \['im\d', 'im\d'\]"):
        cls.train_classifier("cam", tmp_path, ids, labels, p, tmp_path / "m.pt", log=lambda s: None)
    assert not (tmp_path / "m.pt").exists()


def test_mask_with_values_outside_the_class_set_is_listed_and_warned(tmp_path, caplog):
    """Issue 14: a VOC mask with a patch of 37 is listed under ``bad_gt`` and warned about,
    naming the file; image labels ignore it and the manifest is still built."""
    data, _ = make_voc(tmp_path)
    m = load_mask(tmp_path, "im1")
    m[10:12, 10:12] = 37
    m[15, 15] = 21          # == C for VOC: also outside
    save_mask_png(tmp_path / "SegmentationClass/im1.png", m)
    with caplog.at_level("WARNING", logger="wsss"):
        man = build_manifest(data, log=lambda s: None)
    assert man["bad_gt"] == {"im1": [21, 37]}
    assert man["labels"]["im1"] == [2]
    warn = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warn) == 1
    msg = warn[0].getMessage()
    assert str(tmp_path / "SegmentationClass/im1.png") in msg and "[21, 37]" in msg
    assert "im0.png" not in msg and "0..20 and 255" in msg and "Fix the masks" in msg


def test_clean_masks_give_empty_bad_gt_and_no_warning(tmp_path, caplog):
    data, _ = make_voc(tmp_path)          # values 0, k+1 and 255 only
    with caplog.at_level("WARNING", logger="wsss"):
        man = build_manifest(data, log=lambda s: None)
    assert man["bad_gt"] == {}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
