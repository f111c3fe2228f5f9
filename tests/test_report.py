"""The Snakemake HTML report (issue: `snakemake --report report.html` shows every chain's
scores, per-class IoU, training curves and galleries in one self-contained page).

Unit tests of pipeline/report.py's pure functions (fast, against brute-force references and
hand-known VOC colours), then one slow test: the report of tiny demo chains (tests/conftest.py
``tiny_dag``) rendered in headless Chromium.
"""
import base64
import html as htmlmod
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import report
from pipeline.config import ConfigError, validate
from pipeline.data.voc import VOC_CLASSES
from tests.conftest import REPO


# ----------------------------------------------------------------------- pure functions


def test_overlay_puts_voc_colours_on_label_pixels_and_keeps_background():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    lab = rng.choice([0, 1, 15, 255], size=(6, 7)).astype(np.uint8)
    full = report.overlay(img, lab, alpha=1.0)
    # hand-known VOC colours: aeroplane, person, void
    known = {1: (128, 0, 0), 15: (192, 128, 128), 255: (224, 224, 192)}
    for y in range(6):
        for x in range(7):
            want = img[y, x] if lab[y, x] == 0 else known[int(lab[y, x])]
            assert tuple(full[y, x]) == tuple(want), (y, x, lab[y, x])
    half = report.overlay(img, lab, alpha=0.25)
    for y in range(6):
        for x in range(7):
            if lab[y, x] == 0:
                assert tuple(half[y, x]) == tuple(img[y, x])
            else:
                ref = [round(0.75 * int(a) + 0.25 * b) for a, b in zip(img[y, x], known[int(lab[y, x])])]
                assert np.abs(half[y, x].astype(int) - ref).max() <= 1
    with pytest.raises(ValueError, match="must match"):
        report.overlay(img, lab[:, :5])
    with pytest.raises(ValueError, match="alpha"):
        report.overlay(img, lab, alpha=1.5)


def test_legend_lists_exactly_the_classes_drawn():
    rng = np.random.default_rng(1)
    labels = [rng.choice([0, 3, 7, 255], size=(5, 5)), rng.choice([0, 7, 20], size=(4, 6))]
    present = set()
    for lab in labels:
        for v in lab.ravel():
            if v not in (0, 255):
                present.add(int(v))
    got = report.legend_entries(labels, VOC_CLASSES)
    assert [c for c, _, _ in got] == sorted(present)
    assert [n for _, n, _ in got] == [VOC_CLASSES[c] for c in sorted(present)]
    assert dict((c, col) for c, _, col in got)[20] == (0, 64, 128)      # tvmonitor
    assert report.legend_entries([np.zeros((3, 3)), np.full((2, 2), 255)], VOC_CLASSES) == []
    with pytest.raises(ValueError, match="no class name"):
        report.legend_entries([np.full((2, 2), 5)], ["bg", "a"])


def test_gallery_ids_are_the_first_sorted_ids_whatever_the_order():
    ids = [f"2008_{i:06d}" for i in range(30)]
    rng = np.random.default_rng(2)
    picks = {tuple(report.gallery_ids(list(rng.permutation(ids)), 4)) for _ in range(5)}
    assert picks == {tuple(ids[:4])}
    assert report.gallery_ids(ids[:3], 10) == ids[:3]
    assert report.gallery_ids(ids + ids[:2], 3) == ids[:3]          # duplicates once
    with pytest.raises(ValueError, match="gallery_images"):
        report.gallery_ids(ids, 0)


def test_strongest_cam_and_argmax_label_match_brute_force():
    rng = np.random.default_rng(3)
    maps = rng.random((3, 4, 5)).astype(np.float32)
    maps[1] += 0.5
    cids = np.array([4, 9, 12])
    cam, cid = report.strongest_cam(maps, cids)
    means = [maps[k].sum() / maps[k].size for k in range(3)]
    assert cid == cids[means.index(max(means))] == 9 and np.array_equal(cam, maps[1])
    lab = report.label_from_maps(maps, cids)
    for y in range(4):
        for x in range(5):
            col = [maps[k, y, x] for k in range(3)]
            assert lab[y, x] == cids[col.index(max(col))]
    assert report.strongest_cam(np.zeros((0, 2, 2)), np.zeros(0))[1] == 0
    assert not report.label_from_maps(np.zeros((0, 2, 3)), np.zeros(0)).any()


def test_class_names_come_from_the_manifest_when_it_has_them():
    assert report.class_names({}) == list(VOC_CLASSES)
    assert report.class_names({"classes": ["background", "cat"]}) == ["background", "cat"]


def test_iou_table_has_every_class_every_stage_and_the_values():
    names = ["background", "cat", "dog"]
    stages = {"seeds": {"iou": {"background": 0.5, "cat": 0.25}, "miou": 0.375},
              "segmentation": {"iou": {"background": 0.9, "cat": 0.1, "dog": 0.123}, "miou": 0.374}}
    t = report.iou_table_html(stages, names, "demo / cam")
    rows = re.findall(r"<tr>(.*?)</tr>|<tr class='m'>(.*?)</tr>", t)
    cells = [re.findall(r">([^<>]*)</t[dh]>", a or b) for a, b in rows]
    assert cells[0] == ["id", "class", "seeds", "segmentation"]
    assert cells[1] == ["0", "background", "50.0", "90.0"]
    assert cells[3] == ["2", "dog", "–", "12.3"]                       # not reported by seeds
    assert cells[4] == ["", "mIoU", "37.5", "37.4"]
    c = report.comparison_html({"dataset": "demo", "all_background": 3.2, "rows": [
        {"method": "acr", "seeds": 41.5, "refined": None, "pseudo": 50.0, "segmentation": 12.0,
         "own_segmentation": None, "chain_minutes": 7.6}]})
    assert "<th class='l'>acr</th><td>41.5</td><td>–</td><td>50.0</td>" in c and "3.2 mIoU" in c


def test_figures_are_valid_pngs_and_writes_are_atomic(tmp_path):
    curves = {"train_cls": [{"iter": i, "loss": 1.0 / i, "cls": 0.5 / i, "lr": 0.1} for i in (1, 2, 3)],
              "train_seg": []}
    p = report.plot_curves(curves, tmp_path / "c.png", "t")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] > 400 and np.asarray(im.convert("L")).std() > 5
    img = np.full((8, 8, 3), 128, np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    lab[2:5, 2:5] = 8
    g = report.draw_gallery([("a", [("image", img), ("gt", report.overlay(img, lab))])],
                            report.legend_entries([lab], VOC_CLASSES), tmp_path / "g.png")
    with Image.open(g) as im:
        assert im.format == "PNG"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.png", "g.png"]   # no *.tmp left

    def boom(t):
        t.write_text("half")
        raise OSError("disk full")
    (tmp_path / "old.html").write_text("old")
    with pytest.raises(OSError):
        report.atomic_write(tmp_path / "old.html", boom)
    assert (tmp_path / "old.html").read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.png", "g.png", "old.html"]


def test_report_config_is_validated():
    base = {"seed": 0, "report": {"gallery_images": 3}}
    validate(base)
    with pytest.raises(ConfigError, match="report.galery_images"):
        validate({"report": {"galery_images": 3}})
    with pytest.raises(ConfigError, match="positive integer"):
        validate({"report": {"gallery_images": 0}})


def test_cli_names_the_missing_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stages.report_figures", "--manifest",
                        str(tmp_path / "dataset.json"), "--chain", str(tmp_path), "--out-dir",
                        str(tmp_path / "report")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2
    assert "ERROR [report_figures]" in r.stderr and "dataset.json is missing" in r.stderr
    assert not (tmp_path / "report").exists()
