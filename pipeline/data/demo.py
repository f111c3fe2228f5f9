"""Synthetic "demo" dataset in the exact PASCAL VOC 2012 layout, deterministic from a seed.

It exists so that the whole WSSS chain (classifier trained from image-level labels only, CAM
seeds, affinity refinement, CRF, DeepLab) can run end to end on 2 CPU cores in minutes and
*visibly work*: images are small and the 20 object classes are easy to tell apart from
image-level labels alone, while the background is cluttered enough that "anything that is not
flat" is not a good seed.

This module samples the classes of each image (1..3 per image by default, distinct, class
sampling balanced over each split) and writes the dataset; the appearance (class colours,
shapes, textures, cluttered background, overlaps) and the renderer of one image + exact mask
live in :mod:`pipeline.data.demo_shapes`.

Layout written under ``root``::

    JPEGImages/demo_00000.jpg             RGB, JPEG quality 95, 4:4:4 (no chroma subsampling)
    SegmentationClass/demo_00000.png      VOC palette PNG, 0 = background, 1..20, 255 = void
    ImageSets/Segmentation/{train,val,trainval}.txt
    README.txt                            generator parameters and the class table
    .complete                             JSON marker (params + summary), written last

Command line: ``python -m pipeline.data.demo ROOT [--num-train N ...] [--preview PNG]``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from numpy.random import PCG64, Generator, SeedSequence
from PIL import Image

from pipeline.data.demo_shapes import (CLASS_SPECS, GAIN_RANGE, JITTER, MIN_VISIBLE, SENSOR_NOISE,
                                       SIZE_RANGE, TEXTURE_AMPLITUDE, render_sample)
from pipeline.data.voc import (NUM_CLASSES, VOC_CLASSES, VOC_PALETTE, image_labels, load_image,
                               load_mask, read_ids, save_mask_png)
from pipeline.io.storage import atomic_directory, atomic_write

GENERATOR_VERSION = 1
ID_PREFIX = "demo_"
MARKER = ".complete"
JPEG_QUALITY = 95


# --------------------------------------------------------------------------- class sampling
def _assign_classes(rng: Generator, n: int, kmin: int, kmax: int) -> list[list[int]]:
    """Distinct classes per image, balanced over the split (stream of random permutations).

    Every class appears at least once when the split holds >= 20 objects in total.
    """
    ks = rng.integers(kmin, kmax + 1, n)
    pool: list[int] = []
    out = []
    for k in ks:
        picked: list[int] = []
        i = 0
        while len(picked) < k:
            if i >= len(pool):
                pool.extend((rng.permutation(20) + 1).tolist())
            if pool[i] not in picked:
                picked.append(pool.pop(i))
            else:
                i += 1
        out.append(picked)
    # repair coverage (rarely needed): swap a missing class in for an over-represented one
    counts = np.bincount([c for p in out for c in p], minlength=21)
    for c in (int(x) for x in np.flatnonzero(counts[1:] == 0) + 1):
        for p in out:
            donors = [d for d in p if counts[d] > 1]
            if donors:
                d = max(donors, key=lambda x: counts[x])
                p[p.index(d)] = c
                counts[d] -= 1
                counts[c] += 1
                break
    return out


# --------------------------------------------------------------------------- dataset
def _params(num_train, num_val, size, seed, min_objects, max_objects, void_border) -> dict:
    return dict(generator_version=GENERATOR_VERSION, num_train=int(num_train),
                num_val=int(num_val), size=int(size), seed=int(seed),
                min_objects=int(min_objects), max_objects=int(max_objects),
                void_border=bool(void_border), jpeg_quality=JPEG_QUALITY)


def _readme(params: dict, summary: dict) -> str:
    lines = [
        "Synthetic WSSS demo dataset (PASCAL VOC 2012 layout), written by pipeline/data/demo.py",
        "",
        "Generator parameters:",
        *[f"  {k} = {v}" for k, v in params.items()],
        f"  object size = {SIZE_RANGE[0]:.0%}..{SIZE_RANGE[1]:.0%} of the image side, random "
        f"position / rotation, colour gain {GAIN_RANGE}, jitter +-{JITTER:g}/channel",
        f"  texture amplitude = +-{TEXTURE_AMPLITUDE:g} (lightness only, zero mean), "
        f"sensor noise std = {SENSOR_NOISE:g}",
        f"  overlap: later objects on top, each keeps >= {MIN_VISIBLE:.0%} of its area visible",
        "  background: neutral colour gradient + low-frequency and pixel noise + neutral",
        "  distractor blobs/lines (all class 0)",
        "",
        f"Images: {summary['num_train']} train + {summary['num_val']} val "
        f"(ids demo_00000.. train first), {params['size']}x{params['size']} px, "
        f"JPEG quality {JPEG_QUALITY} 4:4:4; masks: VOC palette PNG, 0 background, "
        f"1..20 objects" + (", 255 void 1-px ring" if params["void_border"] else "") + ".",
        "Image-level labels are the class ids present in each mask.",
        "",
        "Classes (id, VOC name reused, shape, colour RGB, texture, #train/#val images):",
    ]
    for s in CLASS_SPECS:
        tex = s.texture if s.texture == "solid" else (
            f"{s.texture} p={s.period:g}px" + (f" {s.angle:g}deg" if s.texture == "stripes" else ""))
        lines.append(f"  {s.class_id:2d} {VOC_CLASSES[s.class_id]:<12} {s.shape:<12} "
                     f"{s.color_name:<13} {str(s.color):<16} {tex:<20} "
                     f"{summary['class_images']['train'][s.class_id]:4d}/"
                     f"{summary['class_images']['val'][s.class_id]:d}")
    return "\n".join(lines) + "\n"


def _is_complete(root: Path, params: dict) -> dict | None:
    marker = root / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("params") == params and "summary" in data:
        return data["summary"]
    return None


def make_demo_dataset(root: str | Path, num_train: int = 160, num_val: int = 48, size: int = 96,
                      seed: int = 0, min_objects: int = 1, max_objects: int = 3,
                      void_border: bool = False) -> dict:
    """Write the synthetic demo dataset under ``root`` (VOC 2012 layout), atomically.

    The dataset is built in the sibling folder ``<root>.tmp`` and renamed to ``root`` at the end
    (:func:`pipeline.io.storage.atomic_directory`; on a failure ``<root>.tmp`` is removed).
    If ``root`` already holds a complete dataset made with the same parameters (its
    ``.complete`` marker), nothing is written. A ``root`` made with other parameters, or one
    holding no file at all (only empty folders), is replaced.

    Args:
        root: dataset folder (created, with its parents).
        num_train, num_val: number of images of each split (>= 1). Ids are ``demo_00000`` ...,
            train first, then val; ``trainval.txt`` lists both.
        size: image side in pixels (>= 32). Images are RGB ``(size, size, 3)`` JPEGs.
        seed: generator seed; identical arguments give byte-identical files.
        min_objects, max_objects: objects per image, 1 <= min <= max <= 6; each image holds
            distinct classes. Every class 1..20 appears in a split whose object total is >= 20
            (always the case when ``num * min_objects >= 20``).
        void_border: add a 1-px 255 ring around objects in the masks (like VOC boundaries).

    Returns:
        Summary dict: ``root`` (str), ``regenerated`` (bool: files were written by this call),
        ``num_train``, ``num_val``, ``num_images``, ``size``, ``seed``, ``num_objects``,
        ``objects_per_image`` ({"1": n, ...}), ``class_images`` ({"train"/"val": list of 21
        ints, images containing each class id; index 0 = images with visible background}),
        ``class_pixel_fraction`` (list of 21 floats over all images, void excluded).

    Raises:
        ValueError: invalid argument.
        FileExistsError: ``root`` holds files that are not a demo dataset (never deleted).
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if not 1 <= min_objects <= max_objects <= 6:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 6, "
                         f"got {min_objects}, {max_objects}")
    root = Path(root)
    params = _params(num_train, num_val, size, seed, min_objects, max_objects, void_border)
    summary = _is_complete(root, params)
    if summary is not None:
        return {**summary, "root": str(root), "regenerated": False}
    if root.exists() and not (root / MARKER).exists() and any(
            p.is_file() or p.is_symlink() for p in root.rglob("*")):
        raise FileExistsError(f"{root} exists and is not a demo dataset (no {MARKER} marker); "
                              f"remove it or choose another root")

    try:
        with atomic_directory(root) as tmp:
            (tmp / "JPEGImages").mkdir()
            (tmp / "SegmentationClass").mkdir()
            (tmp / "ImageSets" / "Segmentation").mkdir(parents=True)

            seeds = SeedSequence(seed).spawn(3 + num_train + num_val)
            splits = {"train": _assign_classes(Generator(PCG64(seeds[0])), num_train, min_objects,
                                               max_objects),
                      "val": _assign_classes(Generator(PCG64(seeds[1])), num_val, min_objects,
                                             max_objects)}
            ids: dict[str, list[str]] = {"train": [], "val": []}
            class_images = {"train": [0] * NUM_CLASSES, "val": [0] * NUM_CLASSES}
            pixels = np.zeros(256, dtype=np.int64)
            per_image: dict[str, int] = {}
            idx = 0
            for split in ("train", "val"):
                for classes in splits[split]:
                    rng = Generator(PCG64(seeds[3 + idx]))
                    s = render_sample(rng, classes, size, void_border)
                    iid = f"{ID_PREFIX}{idx:05d}"
                    Image.fromarray(s["image"], mode="RGB").save(
                        tmp / "JPEGImages" / f"{iid}.jpg", quality=JPEG_QUALITY, subsampling=0)
                    save_mask_png(tmp / "SegmentationClass" / f"{iid}.png", s["mask"])
                    ids[split].append(iid)
                    present = np.unique(s["mask"])
                    for c in present[present < NUM_CLASSES]:
                        class_images[split][int(c)] += 1
                    pixels += np.bincount(s["mask"].ravel(), minlength=256)
                    k = str(len(image_labels(s["mask"])))
                    per_image[k] = per_image.get(k, 0) + 1
                    idx += 1
            seg = tmp / "ImageSets" / "Segmentation"
            (seg / "train.txt").write_text("\n".join(ids["train"]) + "\n")
            (seg / "val.txt").write_text("\n".join(ids["val"]) + "\n")
            (seg / "trainval.txt").write_text("\n".join(ids["train"] + ids["val"]) + "\n")
            valid = pixels[:NUM_CLASSES]
            summary = dict(num_train=num_train, num_val=num_val, num_images=num_train + num_val,
                           size=size, seed=seed,
                           num_objects=int(sum(len(c) for sp in splits.values() for c in sp)),
                           objects_per_image=dict(sorted(per_image.items())),
                           class_images=class_images,
                           class_pixel_fraction=[round(float(x), 6) for x in valid / valid.sum()])
            (tmp / "README.txt").write_text(_readme(params, summary))
            (tmp / MARKER).write_text(json.dumps({"params": params, "summary": summary},
                                                 indent=1, sort_keys=True) + "\n")
    except OSError:
        # another process published the same dataset first (ours is already removed)
        done = _is_complete(root, params)
        if done is None:
            raise
        summary = done
    return {**summary, "root": str(root), "regenerated": True}


# --------------------------------------------------------------------------- preview / CLI
def save_preview(root: str | Path, out: str | Path, n: int = 8, split: str = "train") -> Path:
    """Save a mosaic of the first ``n`` images of ``split`` (top row) and their coloured masks
    (bottom row, VOC palette) as a PNG (or the format of ``out``'s suffix), published with
    :func:`pipeline.io.storage.atomic_write`; returns ``Path(out)``.

    Raises:
        DatasetError: missing split file / image / mask.
        ValueError: ``out`` has a suffix PIL cannot write.
    """
    ids = read_ids(Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt")[:n]
    imgs = [load_image(root, i) for i in ids]
    masks = [VOC_PALETTE[load_mask(root, i)] for i in ids]
    gap = np.full((imgs[0].shape[0], 2, 3), 255, np.uint8)

    def row(xs):
        return np.concatenate([a for x in xs for a in (x, gap)][:-1], axis=1)

    top, bottom = row(imgs), row(masks)
    sep = np.full((2, top.shape[1], 3), 255, np.uint8)
    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower())   # the temporary ends in .tmp
    if fmt is None:
        raise ValueError(f"unknown file extension: {out.suffix!r}")
    mosaic = Image.fromarray(np.concatenate([top, sep, bottom], axis=0))
    return atomic_write(out, lambda t: mosaic.save(t, format=fmt))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root")
    ap.add_argument("--num-train", type=int, default=160)
    ap.add_argument("--num-val", type=int, default=48)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-objects", type=int, default=1)
    ap.add_argument("--max-objects", type=int, default=3)
    ap.add_argument("--void-border", action="store_true")
    ap.add_argument("--preview", default=None, help="also save a mosaic PNG of 8 train images")
    a = ap.parse_args(argv)
    summary = make_demo_dataset(a.root, a.num_train, a.num_val, a.size, a.seed,
                                a.min_objects, a.max_objects, a.void_border)
    if a.preview:
        save_preview(a.root, a.preview)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
