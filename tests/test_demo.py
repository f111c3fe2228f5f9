"""Tests of the synthetic demo dataset generator (pipeline/data/demo.py: dataset writing;
pipeline/data/demo_shapes.py: class appearance and rendering)."""
from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.random import PCG64, Generator
from PIL import Image
from skimage.morphology import diamond, dilation

from pipeline.data import demo, demo_shapes
from pipeline.data.voc import (IGNORE_INDEX, image_labels, load_image, load_mask, read_ids)

SMALL = dict(num_train=16, num_val=8, size=64)


@pytest.fixture(scope="module")
def default_ds(tmp_path_factory):
    """The default-parameter dataset (160 train / 48 val, 96 px), generated once."""
    root = tmp_path_factory.mktemp("demo") / "VOC2012"
    t0 = time.perf_counter()
    summary = demo.make_demo_dataset(root)
    return root, summary, time.perf_counter() - t0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _split_ids(root: Path, split: str) -> list[str]:
    return read_ids(root / "ImageSets" / "Segmentation" / f"{split}.txt")


def _dilate4(m: np.ndarray) -> np.ndarray:
    """4-neighbour dilation by scikit-image (independent of the generator's own helper)."""
    return dilation(m, footprint=diamond(1))


def _chroma(px: np.ndarray) -> np.ndarray:
    """Distance of RGB values (..., 3) to the grey axis."""
    g = np.ones(3) / math.sqrt(3)
    return np.linalg.norm(px - (px @ g)[..., None] * g, axis=-1)


def _check_layout(root: Path, allowed: set[int]) -> None:
    train, val = _split_ids(root, "train"), _split_ids(root, "val")
    assert _split_ids(root, "trainval") == train + val
    assert not set(train) & set(val)
    for iid in train + val:
        jpg = root / "JPEGImages" / f"{iid}.jpg"
        png = root / "SegmentationClass" / f"{iid}.png"
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            img_size = im.size
        with Image.open(png) as im:
            assert im.format == "PNG" and im.mode == "P"
            assert im.size == img_size
        values = set(np.unique(load_mask(root, iid)).tolist())
        assert values <= allowed, (iid, values)
    assert (root / "README.txt").read_text().startswith("Synthetic WSSS demo dataset")
    assert not root.with_name(root.name + ".tmp").exists()


def test_layout(default_ds):
    root, summary, _ = default_ds
    assert len(_split_ids(root, "train")) == summary["num_train"] == 160
    assert len(_split_ids(root, "val")) == summary["num_val"] == 48
    assert load_image(root, "demo_00000").shape == (96, 96, 3)
    _check_layout(root, set(range(21)))


def test_layout_void_border(tmp_path):
    root = tmp_path / "void"
    demo.make_demo_dataset(root, void_border=True, **SMALL)
    _check_layout(root, set(range(21)) | {IGNORE_INDEX})
    masks = [load_mask(root, i) for i in _split_ids(root, "trainval")]
    assert all((m == IGNORE_INDEX).any() for m in masks)
    # the void ring hugs the objects: every 255 pixel is within 2 px of an object pixel
    for m in masks:
        void = m == IGNORE_INDEX
        assert _dilate4(_dilate4((m > 0) & (m < 21)))[void].all()
        assert void.mean() < 0.2


def test_determinism(tmp_path):
    a = demo.make_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = demo.make_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    c = demo.make_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(fa) == 2 * 24 + 5  # jpg + png per image, 3 split files, README, marker
    assert fa == fb
    assert {k: v for k, v in a.items() if k != "root"} == {k: v for k, v in b.items() if k != "root"}
    jpgs = [k for k in fa if k.endswith(".jpg")]
    assert sum(fa[k] != fc[k] for k in jpgs) == len(jpgs)
    assert a["class_images"] != c["class_images"] or fa != fc


def test_labels_and_class_coverage(default_ds):
    root, summary, _ = default_ds
    for split in ("train", "val"):
        seen = np.zeros(21, dtype=int)
        for iid in _split_ids(root, split):
            labels = image_labels(load_mask(root, iid))
            assert 1 <= len(labels) <= 3, (iid, labels)
            seen[labels] += 1
        assert (seen[1:] >= 2).all(), (split, seen)
        assert seen[1:].tolist() == summary["class_images"][split][1:]
        # balanced sampling: no class more than ~2x as frequent as another
        assert seen[1:].max() <= 2 * seen[1:].min() + 1, (split, seen)
    counts = summary["objects_per_image"]
    assert set(counts) == {"1", "2", "3"} and sum(counts.values()) == 208


def test_mask_region_has_class_colour(default_ds):
    """On the written JPEGs, per class region of every image:

    * its mean colour is nearest its class's base colour (textures are zero-mean);
    * the mask is exact: >= 95 % of its pixels lie near the class colour's grey line
      {colour + k (1,1,1)} (textures change lightness only) while the 1-px ring just outside
      it almost never does, and shifting the mask by 1 px lowers that agreement.
    """
    root, _, _ = default_ds
    colors = demo_shapes.class_colors()
    inside, ring_frac, regions = [], [], 0
    for iid in _split_ids(root, "trainval"):
        img = load_image(root, iid).astype(np.float64)
        mask = load_mask(root, iid)
        for c in image_labels(mask):
            region = mask == c
            mean = img[region].mean(0)
            dist = np.linalg.norm(colors[1:] - mean, axis=1)
            assert int(np.argmin(dist)) + 1 == c, (iid, c, mean, dist.min())
            assert dist[c - 1] < 30, (iid, c, dist[c - 1])
            on_line = _chroma(img - colors[c]) < 25
            inside.append(on_line[region].mean())
            ring_frac.append(on_line[_dilate4(region) & ~region].mean())
            assert inside[-1] >= 0.95, (iid, c, inside[-1])
            assert ring_frac[-1] <= 0.5, (iid, c, ring_frac[-1])
            for shift, axis in itertools.product((1, -1), (0, 1)):
                assert on_line[np.roll(region, shift, axis=axis)].mean() < inside[-1], (iid, c)
            regions += 1
    assert regions > 300
    assert np.mean(inside) > 0.99 and np.mean(ring_frac) < 0.02, (np.mean(inside), np.mean(ring_frac))


def test_background_is_neutral(default_ds):
    """Background clutter (gradient, noise, distractors) never takes a class colour: pixels
    >= 2 px away from any object are near-grey, class colours are far from grey."""
    root, _, _ = default_ds
    assert _chroma(demo_shapes.CLASS_COLORS).min() > 60
    chroma = []
    for iid in _split_ids(root, "trainval"):
        img = load_image(root, iid).astype(np.float64)
        near_obj = _dilate4(_dilate4(load_mask(root, iid) > 0))
        chroma.append(_chroma(img[~near_obj]))
    chroma = np.concatenate(chroma)
    assert chroma.size > 100_000
    assert chroma.max() < 52 and np.percentile(chroma, 99) < 35, (chroma.max(), np.percentile(chroma, 99))


def test_render_sample_masks_are_exact():
    """Without sensor noise an object pixel is its colour plus a grey offset; nothing else is."""
    for k in range(20):
        rng = Generator(PCG64(k))
        classes = [int(c) for c in rng.choice(np.arange(1, 21), size=3, replace=False)]
        state = rng.bit_generator.state
        s = demo_shapes.render_sample(rng, classes, size=80, noise=False)
        img, mask = s["image"].astype(np.float64), s["mask"]
        assert img.shape == (80, 80, 3) and mask.shape == (80, 80) and mask.dtype == np.uint8
        for o in s["objects"]:
            d = img - o["color"]
            grey = (d.max(-1) - d.min(-1)) <= 1.0 + 1e-9
            region = mask == o["class_id"]
            assert o["visible"] == region.sum() >= demo_shapes.MIN_VISIBLE * o["area"] - 1
            assert grey[region].all()
            assert not grey[mask == 0].any()
            assert np.abs(d[region]).max() <= demo_shapes.TEXTURE_AMPLITUDE * 1.5 + 1
        rng.bit_generator.state = state  # same geometry, now with noise and a void ring
        noisy = demo_shapes.render_sample(rng, classes, size=80, void_border=True)
        assert set(np.unique(noisy["mask"])) <= set(classes) | {0, IGNORE_INDEX}
        top = noisy["mask"] == classes[-1]
        assert (top == (mask == classes[-1])).all()  # the top object is never voided


def test_class_specs_are_distinct():
    colors = demo_shapes.CLASS_COLORS
    d = np.linalg.norm(colors[:, None] - colors[None], axis=-1) + np.eye(20) * 1e9
    assert d.min() >= 80
    assert (colors.max(1) - colors.min(1)).min() >= 80  # far from the grey axis
    assert len({s.shape for s in demo_shapes.CLASS_SPECS}) == 20
    assert [s.class_id for s in demo_shapes.CLASS_SPECS] == list(range(1, 21))
    yy, xx = np.mgrid[-1.2:1.2:96j, -1.2:1.2:96j]
    masks = {}
    for name, f in demo_shapes.SHAPES.items():
        m = f(xx, yy)
        assert 0.1 < m.mean() < 0.6, name
        masks[name] = m
    for (a, ma), (b, mb) in itertools.combinations(masks.items(), 2):
        iou = (ma & mb).sum() / (ma | mb).sum()
        assert iou < 0.92, (a, b, iou)  # circle vs hexagon is the closest pair (0.91)


def test_idempotent_and_replacement(default_ds, tmp_path):
    root, summary, _ = default_ds
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = demo.make_demo_dataset(root)
    assert again["regenerated"] is False and summary["regenerated"] is True
    assert {k: v for k, v in again.items() if k != "regenerated"} == \
        {k: v for k, v in summary.items() if k != "regenerated"}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before

    small = tmp_path / "ds"
    demo.make_demo_dataset(small, **SMALL)
    other = demo.make_demo_dataset(small, seed=1, **SMALL)   # other params: replaced
    assert other["regenerated"] is True
    assert json.loads((small / demo.MARKER).read_text())["params"]["seed"] == 1
    assert not small.with_name("ds.tmp").exists()

    (tmp_path / "empty" / "ImageSets" / "Segmentation").mkdir(parents=True)  # e.g. made by a DAG tool
    assert demo.make_demo_dataset(tmp_path / "empty", **SMALL)["regenerated"] is True

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError):
        demo.make_demo_dataset(foreign, **SMALL)
    assert (foreign / "precious.txt").read_text() == "x"


@pytest.mark.parametrize("kwargs", [dict(num_train=0), dict(num_val=0), dict(size=16),
                                    dict(min_objects=0), dict(min_objects=3, max_objects=2),
                                    dict(max_objects=7)])
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        demo.make_demo_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_generation_speed(default_ds):
    _, _, seconds = default_ds
    assert seconds < 20, f"208 images took {seconds:.1f}s (budget: 200 images < 10s on one core)"
