"""MS COCO 2014 support (pipeline/data/coco.py, pipeline/data/classes.py) on a tiny COCO-format
fixture built here: 4 JPEGs written with PIL, instances jsons with polygon AND uncompressed-RLE
crowd segmentations, two overlapping instances listed in the "wrong" order, a non-convex
polygon, an image without annotations, and the non-contiguous category ids 1, 18, 90.

Expected label PNGs are set by hand with array slices under COCO's pixel convention (pixel
(r, c) covers [c, c+1) x [r, r+1): the polygon x 2..20 / y 2..16 holds rows 2..15, columns
2..19); crowd RLEs are encoded here by hand (column-major run lengths), not by pycocotools.
"""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.data.classes import COCO_CLASSES, COCO_ID_TO_INDEX, VOC_CLASSES, manifest_classes
from pipeline.data.coco import check_source, convert_coco
from pipeline.data.prepare import build_manifest
from pipeline.data.voc import DatasetError, load_mask
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2

PERSON, DOG, BRUSH = COCO_ID_TO_INDEX[1], COCO_ID_TO_INDEX[18], COCO_ID_TO_INDEX[90]
V4 = "COCO_val2014_000000000004"
T1, T2, T3 = (f"COCO_train2014_{i:012d}" for i in (1, 2, 3))
SIZES = {T1: (20, 24), T2: (16, 16), T3: (10, 12), V4: (12, 12)}   # (H, W)


def rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE, written independently of pycocotools: run lengths of the
    column-major flattened mask, starting with a run of zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(n)
            cur, n = v, 0
        n += 1
    counts.append(n)
    return {"counts": counts, "size": list(mask.shape)}


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def expected_labels(crowd: str = "ignore") -> dict:
    e = {k: np.zeros(s, np.uint8) for k, s in SIZES.items()}
    m = e[T1]
    m[17:20, 0:6] = 255 if crowd == "ignore" else (BRUSH if crowd == "class" else 0)
    m[2:16, 2:20] = PERSON            # larger instance first ...
    m[6:12, 8:14] = DOG               # ... smaller on top although listed first
    m = e[T2]
    m[0:10, 0:10] = 255 if crowd == "ignore" else (PERSON if crowd == "class" else 0)
    m[4:8, 4:12] = BRUSH              # L-shaped polygon over the crowd region
    m[8:14, 4:8] = BRUSH
    e[V4][0:6, 0:6] = DOG
    return e


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("coco_src")
    cats = [{"id": 1, "name": "person", "supercategory": "person"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]
    crowd1 = np.zeros(SIZES[T1], bool)
    crowd1[17:20, 0:6] = True
    crowd2 = np.zeros(SIZES[T2], bool)
    crowd2[0:10, 0:10] = True
    anns = {"train": [
        {"id": 5, "image_id": 1, "category_id": 18, "iscrowd": 0, "segmentation": rect(8, 6, 14, 12),
         "area": 36.0, "bbox": [8, 6, 6, 6]},
        {"id": 6, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rect(2, 2, 20, 16),
         "area": 252.0, "bbox": [2, 2, 18, 14]},
        {"id": 7, "image_id": 1, "category_id": 90, "iscrowd": 1, "segmentation": rle(crowd1),
         "area": 18.0, "bbox": [0, 17, 6, 3]},
        {"id": 8, "image_id": 2, "category_id": 1, "iscrowd": 1, "segmentation": rle(crowd2),
         "area": 100.0, "bbox": [0, 0, 10, 10]},
        {"id": 9, "image_id": 2, "category_id": 90, "iscrowd": 0,
         "segmentation": [[4, 4, 12, 4, 12, 8, 8, 8, 8, 14, 4, 14]], "area": 56.0, "bbox": [4, 4, 8, 10]},
    ], "val": [
        {"id": 20, "image_id": 4, "category_id": 18, "iscrowd": 0, "segmentation": rect(0, 0, 6, 6),
         "area": 36.0, "bbox": [0, 0, 6, 6]},
    ]}
    (src / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for split, folder, ids in (("train", "train2014", (1, 2, 3)), ("val", "val2014", (4,))):
        (src / folder).mkdir()
        images = []
        for i in ids:
            name = f"COCO_{folder}_{i:012d}"
            h, w = SIZES[name]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / folder / f"{name}.jpg")
            images.append({"id": i, "file_name": f"{name}.jpg", "height": h, "width": w})
        (src / "annotations" / f"instances_{folder}.json").write_text(json.dumps(
            {"images": images, "annotations": anns[split], "categories": cats}))
    return src


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_out") / "COCO2014"
    summary = convert_coco(source, root, log=lambda s: None)
    return root, summary


def test_class_sets():
    assert len(COCO_CLASSES) == 81 and COCO_CLASSES[0] == "background"
    assert (COCO_CLASSES[PERSON], COCO_CLASSES[DOG], COCO_CLASSES[BRUSH]) == ("person", "dog", "toothbrush")
    assert (PERSON, DOG, BRUSH) == (1, 17, 80)       # rank among the sorted official ids
    assert sorted(COCO_ID_TO_INDEX) == list(COCO_ID_TO_INDEX) and len(set(COCO_CLASSES)) == 81
    assert manifest_classes({}) == VOC_CLASSES       # manifests from before the key: VOC


def test_labels_splits_and_links(converted, source):
    root, summary = converted
    assert (root / "ImageSets/Segmentation/train.txt").read_text().split() == [T1, T2]  # T3: no annotation
    assert (root / "ImageSets/Segmentation/val.txt").read_text().split() == [V4]
    assert summary["counts"] == {"train": 2, "val": 1} and summary["rendered"] == 3
    assert summary["labels_differ"] == 0
    for iid, exp in expected_labels().items():
        if iid == T3:
            assert not (root / "SegmentationClass" / f"{iid}.png").exists()
            continue
        with Image.open(root / "SegmentationClass" / f"{iid}.png") as im:
            assert im.mode == "P"
        np.testing.assert_array_equal(load_mask(root, iid), exp, err_msg=iid)
        folder = "val2014" if iid == V4 else "train2014"
        link = root / "JPEGImages" / f"{iid}.jpg"
        assert link.is_symlink() and link.resolve() == (source / folder / f"{iid}.jpg").resolve()
    assert not list(root.rglob("*.tmp*"))


def test_manifest_has_81_classes_and_noncrowd_image_labels(converted):
    root, _ = converted
    data = {"root": str(root), "label_dir": "SegmentationClass", "classes": "coco",
            "splits": {"train": "ImageSets/Segmentation/train.txt",
                       "val": "ImageSets/Segmentation/val.txt"}}
    m = build_manifest(data, log=lambda s: None)
    assert m["classes"] == list(COCO_CLASSES)
    # crowd-only categories (toothbrush in T1, person in T2) are not image labels
    assert m["labels"] == {T1: [PERSON, DOG], T2: [BRUSH], V4: [DOG]}
    assert m["counts"] == {"train": 2, "val": 1}


def test_rerun_skips_existing_and_a_crowd_change_rerenders(converted, source, tmp_path):
    root, _ = converted
    again = convert_coco(source, root, log=lambda s: None)
    assert again["rendered"] == 0 and again["skipped_existing"] == 3
    other = tmp_path / "COCO2014"
    convert_coco(source, other, splits=("train",), crowd="ignore", log=lambda s: None)
    s = convert_coco(source, other, splits=("train",), crowd="class", log=lambda s: None)
    assert s["rendered"] == 2
    exp = expected_labels("class")
    for iid in (T1, T2):
        np.testing.assert_array_equal(load_mask(other, iid), exp[iid], err_msg=iid)


def test_81_class_seed_evaluation_and_all_background_floor(converted, tmp_path):
    """eval_seeds' evaluate_maps on a hand-made 81-class seeds.h5, against counts done here."""
    from pipeline.steps.compare import all_background_miou
    from pipeline.steps.seeds import evaluate_maps
    from pipeline.io.storage import MapWriter
    root, _ = converted
    gt = expected_labels()
    dog = np.zeros(SIZES[T1], np.float32)
    dog[6:12, 8:17] = 1.0                  # 3 columns too wide: 18 person pixels called dog
    person = np.zeros(SIZES[T1], np.float32)
    person[2:16, 2:20] = 0.8
    brush = (gt[T2] == BRUSH).astype(np.float32)
    h5 = tmp_path / "seeds.h5"
    with MapWriter(h5, COCO_CLASSES) as w:
        w.write(T1, np.array([PERSON, DOG]), SIZES[T1], cams=np.stack([person, dog]))
        w.write(T2, np.array([BRUSH]), SIZES[T2], cams=brush[None])
    res = evaluate_maps(h5, root, [T1, T2], "SegmentationClass", "cams", 0.5)
    assert list(res["iou"]) == list(COCO_CLASSES)
    assert res["iou"]["person"] == pytest.approx((252 - 36 - 18) / (252 - 36))
    assert res["iou"]["dog"] == pytest.approx(36 / 54)
    assert res["iou"]["toothbrush"] == 1.0 and res["iou"]["background"] == 1.0
    assert res["iou"]["cat"] is None
    assert res["miou"] == pytest.approx(np.mean([1.0, (252 - 54) / 216, 36 / 54, 1.0]))
    # the all-background floor over 81 classes: bg IoU = bg / valid pixels, 0 for the others
    valid = sum(int((gt[i] != 255).sum()) for i in (T1, T2))
    bg = sum(int((gt[i] == 0).sum()) for i in (T1, T2))
    floor = all_background_miou(root, [T1, T2], "SegmentationClass", COCO_CLASSES)
    assert floor == pytest.approx((bg / valid) / 4)     # background, person, dog, toothbrush occur


def test_missing_or_partial_coco_is_one_clear_line(source, tmp_path):
    empty = tmp_path / "nothing"
    with pytest.raises(DatasetError) as e:
        check_source(empty)
    msg = str(e.value)
    assert "\n" not in msg and str(empty / "annotations" / "instances_train2014.json") in msg
    assert "snakemake --cores 1 download_coco" in msg and "3 more" in msg
    part = tmp_path / "partial"
    (part / "annotations").mkdir(parents=True)
    for f in ("instances_train2014.json", "instances_val2014.json"):
        (part / "annotations" / f).write_text((source / "annotations" / f).read_text())
    for d in ("train2014", "val2014"):
        (part / d).mkdir()
        for jpg in (source / d).iterdir():
            (part / d / jpg.name).write_bytes(jpg.read_bytes())
    (part / "train2014" / f"{T2}.jpg").unlink()
    with pytest.raises(DatasetError) as e:
        convert_coco(part, tmp_path / "out", log=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and str(part / "train2014" / f"{T2}.jpg") in msg
    assert "partially extracted" in msg and "download_coco" in msg
    assert not (tmp_path / "out/ImageSets/Segmentation/train.txt").exists()   # nothing half-written


def test_prepare_coco_cli_without_download_stops_with_the_fix(tmp_path, monkeypatch, capsys):
    """The stage CLI (in-process: a subprocess would spend ~20 s importing torch) exits 2 with
    one ERROR line naming the missing file and the command."""
    import runpy
    data = {"classes": "coco", "source": str(tmp_path / "coco"), "root": str(tmp_path / "out"),
            "label_dir": "SegmentationClass", "splits": {}}
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["prepare_coco", "--dataset", "coco",
                                      "--params-json", json.dumps({"data": data})])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("stages.prepare_coco", run_name="__main__")
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ERROR")]
    assert len(err) == 1 and str(tmp_path / "coco" / "annotations") in err[0]
    assert "snakemake --cores 1 download_coco" in err[0]
    assert not (tmp_path / "out").exists()


def test_classifier_is_built_for_the_manifest_classes(converted, tmp_path):
    """train_cls with the COCO manifest: an 80-way classifier (VOC would give 20)."""
    import torch
    from pipeline.steps.cls import train_classifier
    from pipeline.io.config import load_params, stage_params
    root, _ = converted
    p = stage_params(load_params(REPO / "params.yaml"), "demo", "cam", "train_cls")
    p.update(iters=1, batch_size=2, crop=32, log_every=1, checkpoint_every=0)
    p["backbone"]["overrides"].update(img_size=32, depth=1)
    labels = {T1: [PERSON, DOG], T2: [BRUSH]}
    train_classifier("cam", root, [T1, T2], labels, p, tmp_path / "m.pt", log=lambda s: None,
                     class_names=COCO_CLASSES)
    ck = torch.load(tmp_path / "m.pt", weights_only=False)
    assert ck["num_classes"] == 80 and ck["state_dict"]["classifier.weight"].shape[0] == 80
