"""PASCAL VOC 2012 (+SBD) layout: class names, palette, id lists, images, masks, labels.

Conventions used by the whole pipeline
-------------------------------------
* Class index 0 is background, 1..20 the VOC object classes, 255 (``IGNORE_INDEX``) is
  void / boundary and is ignored by every loss and metric.
* Image-level labels are derived from the segmentation masks: every class id present,
  excluding 0 and 255 (the common practice of the WSSS repositories; the sample data has no
  ``Annotations/*.xml``).
* Masks are palette ("P" mode) PNGs with the VOC colour map.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.data.classes import VOC_CLASSES  # noqa: F401  (re-exported: the VOC class names)

IGNORE_INDEX = 255

NUM_CLASSES = len(VOC_CLASSES)  # 21 including background (VOC only: other datasets take it
# from their manifest, pipeline.data.classes.manifest_classes)


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map (bit-interleaved), shape ``(n, 3)`` uint8.

    Index 255 maps to (224, 224, 192), the void colour of the official masks.
    Source: the VOCdevkit ``labelcolormap.m``.
    """
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


VOC_PALETTE = voc_palette()


class DatasetError(RuntimeError):
    """A dataset file or folder is missing or malformed; the message names the path and the fix."""


def read_ids(split_file: str | Path) -> list[str]:
    """Read an image-id list (one id per line; blank lines ignored).

    Raises:
        DatasetError: the file does not exist or lists no id.
    """
    p = Path(split_file)
    if not p.is_file():
        raise DatasetError(f"split file {p} does not exist. Check `datasets.<name>.root` and "
                           f"`splits` in params.yaml, or run the dataset's download/make rule.")
    ids = [ln.split()[0] for ln in p.read_text().splitlines() if ln.strip()]
    if not ids:
        raise DatasetError(f"split file {p} is empty: it must list one image id per line.")
    return ids


def load_image(root: str | Path, image_id: str) -> np.ndarray:
    """Load ``<root>/JPEGImages/<id>.jpg`` as RGB, shape ``(H, W, 3)`` uint8.

    Raises:
        DatasetError: the file is missing or cannot be decoded.
    """
    p = Path(root) / "JPEGImages" / f"{image_id}.jpg"
    if not p.is_file():
        raise DatasetError(f"image {p} is missing; the dataset at {root} is incomplete "
                           f"(re-extract it, or remove the id from the split list).")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except OSError as e:  # truncated / corrupt JPEG
        raise DatasetError(f"image {p} cannot be decoded ({e}); re-download it.") from e


def rgb_mask_to_index(rgb: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Convert an RGB-coloured VOC mask to class indices via the VOC palette.

    Colours of classes ``0..num_classes-1`` map to their index, the void colour
    ``(224, 224, 192)`` (palette entry 255) to 255.

    Args:
        rgb: ``(H, W, 3)`` uint8.
    Returns:
        ``(H, W)`` uint8.
    Raises:
        ValueError: a colour that is not in the palette (lists up to 5 of them).
    """
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    pal = VOC_PALETTE.astype(np.int32)
    keys = {int((pal[i, 0] << 16) | (pal[i, 1] << 8) | pal[i, 2]): i
            for i in list(range(num_classes)) + [255]}
    uniq, inv = np.unique(code, return_inverse=True)
    bad = [u for u in uniq.tolist() if u not in keys]
    if bad:
        cols = [((u >> 16) & 255, (u >> 8) & 255, u & 255) for u in bad[:5]]
        raise ValueError(f"colours not in the VOC palette: {cols}")
    lut = np.array([keys[u] for u in uniq.tolist()], np.uint8)
    return lut[inv].reshape(code.shape)


def load_mask(root: str | Path, image_id: str, label_dir: str = "SegmentationClass") -> np.ndarray:
    """Load ``<root>/<label_dir>/<id>.png`` as class indices, shape ``(H, W)`` uint8.

    Values are 0..20 and 255 (void). Palette (``P``) and grey (``L``) PNGs are read as
    indices; an RGB-coloured mask is converted through the VOC palette
    (:func:`rgb_mask_to_index`) when every colour is a VOC colour.

    Raises:
        DatasetError: file missing or unreadable, an RGB mask with non-VOC colours, or
            another image mode.
    """
    p = Path(root) / label_dir / f"{image_id}.png"
    if not p.is_file():
        raise DatasetError(f"mask {p} is missing; check `label_dir` in params.yaml "
                           f"(VOC+SBD uses SegmentationClassAug).")
    try:
        with Image.open(p) as im:
            if im.mode in ("P", "L"):
                return np.asarray(im, dtype=np.uint8).copy()
            if im.mode in ("RGB", "RGBA"):
                try:
                    return rgb_mask_to_index(np.asarray(im.convert("RGB"), dtype=np.uint8))
                except ValueError as e:
                    raise DatasetError(f"mask {p} is an RGB image with {e}; save it as a palette "
                                       f"PNG of class indices (0..20, 255 = void).") from None
    except OSError as e:
        raise DatasetError(f"mask {p} cannot be decoded ({e}); re-extract the dataset.") from e
    raise DatasetError(f"mask {p} has mode {im.mode}; expected a palette (P) or grey (L) PNG "
                       f"of class indices.")


def image_size(root: str | Path, image_id: str) -> tuple[int, int]:
    """``(H, W)`` of ``<root>/JPEGImages/<id>.jpg`` from its header (no decoding).

    Raises:
        DatasetError: missing or not an image.
    """
    p = Path(root) / "JPEGImages" / f"{image_id}.jpg"
    try:
        with Image.open(p) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise DatasetError(f"image {p} is missing; the dataset at {root} is incomplete "
                           f"(re-extract it, or remove the id from the split list).") from None
    except OSError as e:
        raise DatasetError(f"image {p} cannot be read ({e}); re-download it.") from e


def image_labels(mask: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Foreground class ids present in a mask (0 and 255 excluded), sorted, int64 ``(k,)``."""
    u = np.unique(mask)
    return u[(u > 0) & (u < num_classes)].astype(np.int64)


def labels_to_multihot(class_ids: Sequence[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Foreground class ids (1..C-1) -> multi-hot float32 vector of length ``C-1``."""
    v = np.zeros(num_classes - 1, dtype=np.float32)
    for c in class_ids:
        v[int(c) - 1] = 1.0
    return v


def save_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """Write a ``(H, W)`` uint8 class-index mask as a VOC palette PNG (PNG whatever the
    suffix of ``path``, so it can write the ``<name>.png.tmp`` of
    :func:`pipeline.io.storage.atomic_write`)."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(VOC_PALETTE.reshape(-1).tolist())
    im.save(path, format="PNG")
