"""MS COCO 2014 as a VOC-layout semantic-segmentation dataset (80 classes + background).

The rest of the pipeline reads a VOC layout (``JPEGImages/<id>.jpg``,
``<label_dir>/<id>.png``, ``ImageSets/Segmentation/<split>.txt``), so the official COCO
download is converted once (:func:`convert_coco`, stage ``prepare_coco``)::

    <source>/annotations/instances_train2014.json, instances_val2014.json   (official zips)
    <source>/train2014/COCO_train2014_<12 digits>.jpg   (82,783 files; 82,081 with annotations)
    <source>/val2014/COCO_val2014_<12 digits>.jpg       (40,504 files; 40,137 with annotations)
      ->
    <root>/JPEGImages/<id>.jpg               relative symlinks to the files above (no copy)
    <root>/SegmentationClass/<id>.png        palette PNGs (VOC palette), uint8 class indices
    <root>/ImageSets/Segmentation/train.txt, val.txt

``<id>`` is the file name without ``.jpg`` (``COCO_train2014_000000000009``), unique over both
splits, as in the COCO split lists of the WSSS repositories. Split = the images of the
annotation file that have at least one annotation (82,081 / 40,137, the counts of
MCTformer / AFA / ToCo's ``train.txt`` / ``val.txt``); ``keep_empty=True`` keeps every image.

Label rendering (documented choices; exposed as ``datasets.coco.crowd``)
------------------------------------------------------------------------
* class index = rank of the category id among the 80 official ids sorted ascending
  (:data:`pipeline.data.classes.COCO_ID_TO_INDEX`: 1 person ... 80 toothbrush), 0 background;
* masks from pycocotools ``annToMask`` (polygons and RLE alike);
* crowd regions (``iscrowd=1``, RLE) are painted FIRST with 255 (``crowd: ignore``, default:
  their extent is coarse and they mark many overlapping instances, so losses and metrics
  skip them), or with their class (``crowd: class``), or not at all (``crowd: background``).
  I could not determine from the distributed MCTformer/AFA PNGs how they treat crowds, so
  the common "ignore" is the default;
* non-crowd instances are then painted in order of decreasing rendered pixel area (ties:
  ascending annotation id), so smaller instances lie on top of larger ones and an instance
  inside a crowd region keeps its own class;
* image-level labels (``prepare_dataset`` derives them from the PNGs, as for VOC) are thus
  the categories of the non-crowd annotations with at least one visible pixel: a crowd-only
  category does NOT count as present (with ``crowd: class`` it does). The converter counts
  images whose annotation categories differ from the PNG's (fully occluded / sub-pixel
  instances) in its summary.

Rendering streams one image at a time (tqdm), writes each PNG (and image symlink, and list)
with :func:`pipeline.io.storage.atomic_write` (to ``<id>.png.tmp``, then renamed), skips PNGs
that already exist (resumable; a change of the rendering settings, kept in
``ImageSets/Segmentation/coco_convert.json``, re-renders everything), and writes the split
lists last, so an interrupted conversion never looks complete.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.classes import COCO_ID_TO_INDEX
from pipeline.io.storage import atomic_write
from pipeline.data.voc import IGNORE_INDEX, DatasetError, save_mask_png

#: split name -> official image folder / annotation file stem
COCO_SPLITS = {"train": "train2014", "val": "val2014"}
#: the official 2014 archives (images.cocodataset.org publishes no checksums; the zip CRCs
#: are verified on extraction)
COCO_URLS = {
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",               # 13 GB
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",                   # 6.2 GB
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
}
CROWD_MODES = ("ignore", "class", "background")
FIX = ("get it with `snakemake --cores 1 download_coco` (needs internet, ~20 GB), or place the "
       "official train2014/, val2014/ and annotations/instances_{{train,val}}2014.json under {src}")


def source_paths(source: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation json, image folder)`` of ``split`` (``train`` | ``val``) under ``source``."""
    if split not in COCO_SPLITS:
        raise DatasetError(f"unknown COCO split {split!r}; expected one of {sorted(COCO_SPLITS)}")
    name = COCO_SPLITS[split]
    src = Path(source)
    return src / "annotations" / f"instances_{name}.json", src / name


def check_source(source: str | Path, splits: Sequence[str] = ("train", "val")) -> None:
    """Fail fast, in one line, when the raw COCO 2014 download is missing or incomplete.

    Raises:
        DatasetError: names the first missing annotation file / image folder (and how many
            more are missing) and the command that fixes it.
    """
    missing = []
    for s in splits:
        ann, img = source_paths(source, s)
        missing += [str(p) for p, ok in ((ann, ann.is_file()), (img, img.is_dir())) if not ok]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"COCO 2014 is missing or incomplete: {missing[0]} not found{more}; "
                           + FIX.format(src=source))


def load_coco(ann_file: str | Path):
    """``pycocotools.coco.COCO`` of an instances json, its stdout chatter silenced.

    Raises:
        DatasetError: the file is not valid JSON (truncated download / extraction).
    """
    from pycocotools.coco import COCO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file} is not valid JSON ({e}): truncated download or "
                           f"extraction; re-extract annotations_trainval2014.zip.") from None


def render_label(coco, image_id: int, crowd: str = "ignore",
                 ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, list[int]]:
    """Semantic label of one COCO image (rules in the module docstring).

    Args:
        coco: ``pycocotools.coco.COCO`` holding the image and its annotations.
        image_id: COCO image id.
        crowd: ``ignore`` (crowd pixels = ``ignore_index``) | ``class`` | ``background``.
    Returns:
        ``(label (H, W) uint8 with 0 = background, 1..80 classes, ignore_index = crowd,
        classes: sorted class indices of the image's non-crowd annotations)``.
    Raises:
        DatasetError: an annotation with a category id outside the 80 official ones, or an
            unknown ``crowd`` mode.
    """
    if crowd not in CROWD_MODES:
        raise DatasetError(f"datasets.coco.crowd must be one of {CROWD_MODES}, got {crowd!r}")
    info = coco.imgs[image_id]
    label = np.zeros((int(info["height"]), int(info["width"])), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    painted = []
    for a in anns:
        if a["category_id"] not in COCO_ID_TO_INDEX:
            raise DatasetError(f"annotation {a['id']} of image {info.get('file_name')} has "
                               f"category id {a['category_id']}, not one of the 80 COCO "
                               f"categories; is this a COCO instances file?")
        m = coco.annToMask(a).astype(bool)
        if a.get("iscrowd", 0) and crowd != "class":
            if crowd == "ignore":
                label[m] = ignore_index       # crowds first: instances are painted over them
            continue
        painted.append((-int(m.sum()), int(a["id"]), COCO_ID_TO_INDEX[a["category_id"]], m))
    for _, _, idx, m in sorted(painted, key=lambda t: (t[0], t[1])):  # large first, small on top
        label[m] = idx
    classes = sorted({COCO_ID_TO_INDEX[a["category_id"]] for a in anns if not a.get("iscrowd", 0)})
    return label, classes


def convert_coco(source: str | Path, root: str | Path, splits: Sequence[str] = ("train", "val"),
                 label_dir: str = "SegmentationClass", crowd: str = "ignore",
                 keep_empty: bool = False, log: Callable[[str], None] = print) -> dict:
    """Convert the official COCO 2014 download at ``source`` into a VOC layout at ``root``.

    See the module docstring for the layout and rendering rules.

    Args:
        source: folder with ``annotations/`` and ``train2014/`` / ``val2014/``.
        root: output dataset root (``datasets.coco.root``).
        splits: which of ``train`` / ``val`` to convert.
        label_dir: PNG folder under ``root`` (``datasets.coco.label_dir``).
        crowd: crowd-region rule (``ignore`` | ``class`` | ``background``).
        keep_empty: also list images without any annotation.
    Returns:
        ``{"counts": {split: n}, "rendered": n, "skipped_existing": n, "labels_differ": n}``
        (``labels_differ``: images whose non-crowd annotation categories are not exactly the
        classes visible in the PNG).
    Raises:
        DatasetError: missing / partial download (one line with the path and the fix),
            invalid annotation json, unknown category id.
    """
    check_source(source, splits)
    root = Path(root)
    jpeg, labels, sets = root / "JPEGImages", root / label_dir, root / "ImageSets" / "Segmentation"
    for d in (jpeg, labels, sets):
        d.mkdir(parents=True, exist_ok=True)
    settings = {"format": 1, "crowd": crowd, "ignore_index": IGNORE_INDEX,
                "order": "crowd first, then non-crowd by decreasing area"}
    sfile = sets / "coco_convert.json"
    redo = sfile.is_file() and json.loads(sfile.read_text()) != settings
    atomic_write(sfile, lambda t: t.write_text(json.dumps(settings, indent=1) + "\n"))
    counts, rendered, skipped, differ = {}, 0, 0, 0
    for split in splits:
        ann_file, img_dir = source_paths(source, split)
        coco = load_coco(ann_file)
        imgs = sorted(coco.imgs.values(), key=lambda i: i["file_name"])
        if not keep_empty:
            imgs = [i for i in imgs if coco.getAnnIds(imgIds=[i["id"]], iscrowd=None)]
        absent = [img_dir / i["file_name"] for i in imgs if not (img_dir / i["file_name"]).is_file()]
        if absent:
            raise DatasetError(f"COCO 2014 is partially extracted: {absent[0]} not found "
                               f"({len(absent)} of {len(imgs)} {split} images missing); "
                               f"re-extract {COCO_SPLITS[split]}.zip or " + FIX.format(src=source))
        ids = []
        for info in tqdm(imgs, desc=f"prepare_coco[{split}]", unit="img", mininterval=2.0):
            iid = Path(info["file_name"]).stem
            ids.append(iid)
            link = jpeg / f"{iid}.jpg"
            if not link.is_symlink() and not link.exists():
                rel = os.path.relpath((img_dir / info["file_name"]).resolve(), jpeg.resolve())
                atomic_write(link, lambda t: t.symlink_to(rel))
            png = labels / f"{iid}.png"
            if png.is_file() and not redo:
                skipped += 1
                continue
            label, classes = render_label(coco, info["id"], crowd)
            visible = np.unique(label)
            if sorted(int(c) for c in visible if 0 < c < 255) != classes:
                differ += 1
            atomic_write(png, lambda t: save_mask_png(t, label))
            rendered += 1
        atomic_write(sets / f"{split}.txt", lambda t: t.write_text("\n".join(ids) + "\n"))
        counts[split] = len(ids)
        log(f"prepare_coco: {split}: {len(ids)} images listed in {sets / (split + '.txt')}")
    return {"counts": counts, "rendered": rendered, "skipped_existing": skipped,
            "labels_differ": differ}


def download_coco(dest: str | Path = "data/coco", log: Callable[[str], None] = print) -> Path:
    """Download and extract the official COCO 2014 train/val images and instance annotations
    (:data:`COCO_URLS`) into ``dest`` with torchvision's ``download_and_extract_archive``.

    Raises:
        DatasetError: offline (fails within seconds, naming where to place the files).
    """
    from pipeline.data.prepare import _online
    dest = Path(dest)
    if not _online("images.cocodataset.org"):
        raise DatasetError("cannot reach images.cocodataset.org: no internet here, so COCO 2014 "
                           "cannot be downloaded; place the official train2014/, val2014/ and "
                           f"annotations/instances_{{train,val}}2014.json under {dest}.")
    from torchvision.datasets.utils import download_and_extract_archive  # heavy, only here
    for name, url in COCO_URLS.items():
        done = dest / ("annotations/instances_val2014.json" if name == "annotations" else name)
        if done.exists():
            log(f"download_coco: {done} exists, skipping {url}")
            continue
        download_and_extract_archive(url, download_root=str(dest), remove_finished=True)
    check_source(dest)
    log(f"download_coco: COCO 2014 under {dest}")
    return dest
