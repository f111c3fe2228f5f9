"""Segmentation metrics with the VOC definition.

Confusion matrix by one ``bincount`` over all pixels whose ground truth is a valid class
(``0 <= gt < C``; 255 ignored); IoU_c = TP / (TP + FP + FN); mIoU is the mean over classes
that occur in GT or prediction (``nanmean``), as in every official repository (the digest in
``shared/reference/official-settings.md``).

Predictions must hold class ids in ``[0, C)`` or the ignore index 255 (ignored, e.g. the
uncertain pixels of pseudo labels); any other value raises :class:`PredictionRangeError`
naming the prediction. Ground truth outside ``[0, C)`` is ignored like 255 (values other
than 255 are listed and warned about by ``prepare_dataset``, manifest key ``bad_gt``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.data.voc import IGNORE_INDEX  # 255, ignored in predictions and ground truth


class PredictionRangeError(ValueError):
    """A prediction holds values outside ``[0, C)`` other than the ignore index 255; the
    message names the prediction (image id or file) and the values."""


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     name: str | None = None) -> np.ndarray:
    """Pixel confusion matrix ``M[g, p]`` (rows: ground truth, columns: prediction).

    Args:
        pred: integer array, any shape, predicted class ids in ``[0, num_classes)``; pixels
            equal to 255 (the ignore index) are ignored.
        gt: integer array, same shape, ground truth ids; pixels with ``gt`` outside
            ``[0, num_classes)`` (255, or stray values that ``prepare_dataset`` lists under
            ``bad_gt``) are ignored.
        num_classes: C.
        name: what ``pred`` is (image id or file), used in the error message.
    Returns:
        int64 array ``(C, C)``; ``M.sum()`` is the number of pixels with valid GT and a
        prediction other than 255.
    Raises:
        ValueError: shapes differ.
        PredictionRangeError (a ValueError): ``pred`` holds a value outside ``[0, C)`` other
            than 255; the message lists the values and names ``name``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}"
                         + (f" ({name})" if name else ""))
    g, p = gt.ravel(), pred.ravel()
    _check_prediction(p, num_classes, name)
    keep = (g < num_classes) & (p < num_classes)
    if g.dtype.kind == "i":
        keep &= g >= 0
    if p.dtype.kind == "i":
        keep &= p >= 0
    # small index dtype: uint8 masks stay cheap (4x faster than int64 over 10M pixels)
    small = np.uint16 if num_classes * num_classes <= 65536 else np.int64
    idx = g[keep].astype(small) * small(num_classes) + p[keep].astype(small)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _check_prediction(p: np.ndarray, num_classes: int, name: str | None) -> None:
    """Raise :class:`PredictionRangeError` if flat ``p`` holds a value outside
    ``[0, num_classes)`` other than 255. Clean input costs one min and one max."""
    if p.size == 0 or (p.min() >= 0 and p.max() < num_classes):
        return
    bad = ((p < 0) | (p >= num_classes)) & (p != IGNORE_INDEX)
    if not bad.any():
        return
    vals = np.unique(p[bad])
    shown = ", ".join(str(v.item()) for v in vals[:10]) + (" ..." if len(vals) > 10 else "")
    raise PredictionRangeError(
        f"prediction {name or '(unnamed)'} holds values [{shown}] ({int(bad.sum())} pixels) "
        f"outside the class ids 0..{num_classes - 1} (255 = ignore): it was made for another "
        f"class set or is corrupt; rerun the stage that wrote it.")


def scores_from_confusion(conf: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """mIoU, per-class IoU, pixel accuracy from a ``(C, C)`` confusion matrix.

    Returns a JSON-serialisable dict: ``miou`` (in [0, 1], nanmean over classes with
    TP+FP+FN > 0), ``iou`` (name -> IoU or None where the class never occurs),
    ``pixel_accuracy``, ``mean_accuracy``.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
        acc_c = np.where(conf.sum(1) > 0, tp / conf.sum(1), np.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    total = conf.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "mean_accuracy": float(np.nanmean(acc_c)) if np.isfinite(acc_c).any() else 0.0,
        "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
    }


def threshold_sweep_confusion(maps: np.ndarray, class_ids: Sequence[int], gt: np.ndarray,
                              thresholds: Sequence[float], num_classes: int,
                              name: str | None = None) -> np.ndarray:
    """Confusion matrices of a background-threshold sweep over one image, in one pass.

    For every ``t`` in ``thresholds`` this equals
    ``confusion_matrix(maps_to_label(maps, class_ids, t), gt, num_classes)``
    (:func:`pipeline.engine.labels.maps_to_label`: a pixel is background (0) where
    ``max_c maps <= t``, ties to background, else the class id of the first arg-max channel),
    but the pixels are visited once whatever the number of thresholds: each pixel falls in the
    bin ``n = #{t : t < max_c maps}`` (compared in the maps' dtype, as ``maps_to_label`` does)
    and counts as its arg-max class for the ``n`` smallest thresholds, as background for the
    others.

    Args:
        maps: ``(k, H, W)`` float foreground maps (``k`` may be 0: everything background).
        class_ids: ``(k,)`` class ids of the channels, in ``[0, num_classes)``.
        gt: ``(H, W)`` ground truth (values outside ``[0, num_classes)`` ignored).
        thresholds: ascending background thresholds.
        num_classes: C.
        name: what the maps are (image id), used in error messages.
    Returns:
        int64 ``(len(thresholds), C, C)``, one ``M[g, p]`` per threshold.
    Raises:
        ValueError: shapes differ or thresholds not ascending.
        PredictionRangeError: a channel's class id predicted somewhere is outside ``[0, C)``.
    """
    maps = np.asarray(maps)
    gt = np.asarray(gt)
    C = int(num_classes)
    ts = np.asarray(thresholds, dtype=np.float64)
    if ts.ndim != 1 or (len(ts) > 1 and np.any(np.diff(ts) < 0)):
        raise ValueError(f"thresholds must be an ascending list, got {list(thresholds)}")
    if maps.ndim != 3 or maps.shape[1:] != gt.shape:
        raise ValueError(f"maps of shape {maps.shape} do not match ground truth {gt.shape}"
                         + (f" ({name})" if name else ""))
    T = len(ts)
    g = gt.ravel()
    keep = (g < C) & (g >= 0) if g.dtype.kind == "i" else g < C
    g = g[keep].astype(np.int64)
    if maps.shape[0] == 0:
        n = np.zeros(g.shape, np.int64)
        a = np.zeros(g.shape, np.int64)
    else:
        dt = maps.dtype if maps.dtype.kind == "f" else np.float64
        v = maps.max(0).ravel()[keep]
        a = np.asarray(class_ids, np.int64)[maps.argmax(0).ravel()[keep]]
        n = np.searchsorted(ts.astype(dt), v.astype(dt), side="left")
        a[n == 0] = 0                             # background at every threshold
        bad = (a < 0) | (a >= C)
        if bad.any():
            raise PredictionRangeError(
                f"maps {name or '(unnamed)'} have channels of class ids "
                f"{sorted(set(a[bad].tolist()))} outside 0..{C - 1}: they were made for "
                f"another class set; rerun the stage that wrote them.")
    h = np.bincount((n * C + g) * C + a, minlength=(T + 1) * C * C).reshape(T + 1, C, C)
    above = np.cumsum(h[::-1], 0)[::-1]          # above[i] = sum_{n >= i} h[n]
    out = above[1:].copy()                        # threshold i: fg where n > i
    below = np.cumsum(h.sum(2), 0)[:T]            # (T, C): pixels with n <= i, per gt row
    out[:, :, 0] += below
    return out
