"""Dataset checks, the dataset manifest, and the VOC 2012 + SBD download.

The manifest ``results/{dataset}/dataset.json`` lists the ids of each split and the
image-level labels (classes present in the mask, 0 and 255 excluded) of every id, and the
ids whose mask has no background pixel (ViT-PCM's official background label), so later
stages never rescan masks.
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from pipeline.data.classes import dataset_classes
from pipeline.data.voc import IGNORE_INDEX, DatasetError, image_labels, load_mask, read_ids, save_mask_png
from pipeline.io.storage import atomic_write

_log = logging.getLogger("wsss")

VOC_LAYOUT = """expected layout (VOC 2012 + SBD "SegmentationClassAug"):
  {root}/JPEGImages/<id>.jpg
  {root}/{label_dir}/<id>.png          palette PNGs, 0..20 and 255
  {root}/ImageSets/SegmentationAug/train_aug.txt   (10,582 ids)
  {root}/ImageSets/Segmentation/train.txt, val.txt (1,464 / 1,449 ids)
Get it with `snakemake --cores 1 download_voc` (needs internet; torchvision's downloaders
with MD5 checksums), or place an extracted copy there / point `datasets.voc.root` at it."""


def check_layout(data: dict) -> Path:
    """Verify that the dataset root and the split files of ``data`` exist.

    Raises:
        DatasetError: with the expected layout and how to obtain it.
    """
    root = Path(data["root"])
    missing = [str(root / d) for d in ("JPEGImages", data.get("label_dir", "SegmentationClass"))
               if not (root / d).is_dir()]
    missing += [str(root / f) for f in data["splits"].values() if not (root / f).is_file()]
    if missing:
        hint = data.get("hint") or VOC_LAYOUT.format(root=root, label_dir=data.get("label_dir"))
        if (root / "JPEGImages").is_dir() and any("Aug" in m for m in missing):
            hint = ("VOC 2012 is there but the SBD augmentation is not (SegmentationClassAug/ and "
                    "train_aug.txt are built from SBD by `snakemake --cores 1 download_voc`; archives "
                    "already downloaded are reused).\n" + hint)
        raise DatasetError(f"dataset at {root} is missing or incomplete; missing: "
                           f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}\n{hint}")
    return root


def build_manifest(data: dict, verify_images: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Read every split of ``data`` and derive image-level labels from the masks.

    Checks every id: the JPEG exists (and decodes completely when ``verify_images``, which
    catches truncated files), its mask exists and is readable (RGB masks are converted via
    the VOC palette), and both have the same size. Grey and CMYK JPEGs are converted to RGB
    when loaded; they are counted in ``image_modes``. Images without a foreground class are
    kept (all-negative for the classifier, background pseudo labels) and listed. Images whose
    mask has no background (class 0) pixel are listed under ``no_background`` (ViT-PCM's
    official background label, ``seg2multihot``: background is a label only when present).

    The class set is ``data["classes"]`` (``voc`` when absent, see
    :mod:`pipeline.data.classes`); mask values ``>= len(classes)`` other than 255 are not
    image labels and every evaluation ignores those pixels (like 255). Such masks are listed
    under ``bad_gt`` (id -> sorted stray values) and a warning on the ``wsss`` logger names
    them and the fix; the manifest is still written.

    Returns:
        ``{"root", "label_dir", "splits": {name: [ids]}, "labels": {id: [class ids]},
        "counts": {name: n}, "no_foreground": [ids], "no_background": [ids],
        "image_modes": {mode: n},
        "classes": [names, background first], "bad_gt": {id: [values]}}`` (``bad_gt`` is
        ``{}`` for clean masks).
    Raises:
        DatasetError: layout problems, an empty split, a missing / undecodable image or mask,
            a mask whose size differs from its image (each naming the file).
    """
    from PIL import Image

    root = check_layout(data)
    try:
        classes = dataset_classes(data)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    label_dir = data.get("label_dir", "SegmentationClass")
    splits = {name: read_ids(root / f) for name, f in data["splits"].items()}
    all_ids = sorted({i for ids in splits.values() for i in ids})
    labels: dict[str, list[int]] = {}
    bad_gt: dict[str, list[int]] = {}
    modes: dict[str, int] = {}
    no_bg: list[str] = []
    for iid in tqdm(all_ids, desc="prepare_dataset", unit="img", mininterval=2.0):
        jpg = root / "JPEGImages" / f"{iid}.jpg"
        if not jpg.is_file():
            raise DatasetError(f"{jpg} listed in a split file is missing: the dataset is "
                               f"partially extracted; re-extract it (or remove the id).")
        try:
            with Image.open(jpg) as im:
                modes[im.mode] = modes.get(im.mode, 0) + 1
                size = (im.size[1], im.size[0])
                if verify_images:
                    im.load()
        except OSError as e:
            raise DatasetError(f"{jpg} cannot be decoded ({e}): truncated or corrupt; "
                               f"re-download it.") from e
        mask = load_mask(root, iid, label_dir)
        if mask.shape != size:
            raise DatasetError(f"{root / label_dir / (iid + '.png')} is {mask.shape[1]}x"
                               f"{mask.shape[0]} but {jpg} is {size[1]}x{size[0]}: the mask "
                               f"belongs to another image; re-extract the masks.")
        values = np.unique(mask)  # the one pass over the mask: labels and stray values
        if not (values == 0).any():
            no_bg.append(iid)
        labels[iid] = image_labels(values, len(classes)).tolist()
        stray = values[(values >= len(classes)) & (values != IGNORE_INDEX)]
        if stray.size:
            bad_gt[iid] = stray.tolist()
    no_fg = [i for i, l in labels.items() if not l]
    if no_fg:
        log(f"prepare_dataset: {len(no_fg)} images without a foreground class (kept; "
            f"they train the classifier as all-negative and get background pseudo labels)")
    if bad_gt:
        shown = "; ".join(f"{root / label_dir / (i + '.png')}: {v}"
                          for i, v in list(bad_gt.items())[:5])
        _log.warning(f"prepare_dataset: {len(bad_gt)} mask(s) hold values outside the class ids "
                     f"0..{len(classes) - 1} and 255 (listed under `bad_gt` in the manifest): "
                     f"{shown}{' ...' if len(bad_gt) > 5 else ''}. Every evaluation ignores "
                     f"those pixels like 255. Fix the masks (255 for void, else the right class "
                     f"id) or set `classes` of the dataset in params.yaml if it has more classes.")
    converted = {m: n for m, n in modes.items() if m != "RGB"}
    if converted:
        log(f"prepare_dataset: non-RGB JPEGs converted to RGB when loaded: {converted}")
    return {"root": str(root), "label_dir": label_dir, "splits": splits, "labels": labels,
            "counts": {k: len(v) for k, v in splits.items()}, "no_foreground": no_fg,
            "no_background": no_bg,
            "image_modes": modes, "classes": list(classes), "bad_gt": bad_gt}


def _online(host: str = "host.robots.ox.ac.uk", port: int = 80, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def download_voc(dest: str | Path = "data/voc", log: Callable[[str], None] = print) -> Path:
    """Download PASCAL VOC 2012 and SBD with torchvision (MD5-checked) and build
    ``SegmentationClassAug`` + ``ImageSets/SegmentationAug/train_aug.txt``.

    ``train_aug`` = (SBD train ∪ SBD val ∪ VOC train) − VOC val, 10,582 ids (the list used by
    PSA/IRN/AFA/ACR). SBD ``.mat`` boundaries are converted to palette PNGs; VOC's own masks
    win where both exist. Every PNG and the list are published with
    :func:`pipeline.io.storage.atomic_write` (``<name>.tmp``, then renamed).

    Raises:
        DatasetError: offline (fails within seconds, naming the expected layout).
    """
    dest = Path(dest)
    root = dest / "VOCdevkit" / "VOC2012"
    if not _online():
        raise DatasetError("cannot reach host.robots.ox.ac.uk: no internet here, so VOC/SBD "
                           "cannot be downloaded.\n" + VOC_LAYOUT.format(
                               root=root, label_dir="SegmentationClassAug"))
    from torchvision.datasets import SBDataset, VOCSegmentation  # heavy import, only here

    VOCSegmentation(str(dest), year="2012", image_set="trainval", download=True)
    aug = root / "SegmentationClassAug"
    aug.mkdir(exist_ok=True)
    voc_train = read_ids(root / "ImageSets/Segmentation/train.txt")
    voc_val = set(read_ids(root / "ImageSets/Segmentation/val.txt"))
    sbd_ids: list[str] = []
    for i, split in enumerate(("train", "val")):
        sbd = SBDataset(str(dest / "SBD"), image_set=split, mode="segmentation", download=(i == 0))
        ids = [Path(p).stem for p in sbd.images]
        sbd_ids += ids
        for iid, (_, mask) in tqdm(zip(ids, sbd), total=len(ids), desc=f"SBD {split} -> PNG"):
            m = np.asarray(mask, np.uint8)
            atomic_write(aug / f"{iid}.png", lambda t: save_mask_png(t, m))
    for iid in voc_train + sorted(voc_val):
        m = load_mask(root, iid, "SegmentationClass")
        atomic_write(aug / f"{iid}.png", lambda t: save_mask_png(t, m))
    train_aug = sorted((set(sbd_ids) | set(voc_train)) - voc_val)
    atomic_write(root / "ImageSets/SegmentationAug/train_aug.txt",
                 lambda t: t.write_text("\n".join(train_aug) + "\n"))
    log(f"download_voc: {len(train_aug)} train_aug ids written under {root}")
    return root
