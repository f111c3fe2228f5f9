"""PSA affinity labels: which stride-8 cells of an image are confident foreground (which
class), confident background, or uncertain, from two dense CRFs of the image's seeds.

Ahn & Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision for Weakly
Supervised Semantic Segmentation", CVPR 2018 (below "PSA"; official code jiwoon-ahn/psa),
step 1 of the PSA modules (the map is in :mod:`pipeline.steps.refine.affinity_train`; every setting
in ``docs/methods/psa.md``).

:func:`crf_scores`, :func:`pool_affinity_label`, :func:`window_affinity_labels`: two dense-CRF
score maps from the seeds with background ``(1 - max cam)^alpha`` at ``alpha_low`` (4, strong
background -> only confident foreground) and ``alpha_high`` (32, weak background -> only
confident background). Official code (``train_aff.py`` + ``voc12/data.py:
VOC12AffDataset``), default ``label_pooling="avgpool"``: the two score maps are cropped /
flipped with the image, **average-pooled over 8x8 cells** (``imutils.AvgPool2d(8)`` =
``block_reduce`` with zero padding), and only then argmax-ed and combined at the cell grid::

    L = argmax(low);  L[argmax(low) == 0] = 255;  L[argmax(high) == 0] = 0
    L[cells without any score (outside the image)] = 255

Option ``label_pooling="centre"`` (the project's former form): combine at full resolution
(:func:`make_affinity_label`) and take each cell's centre pixel (:func:`downsample_label`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.voc import IGNORE_INDEX
from pipeline.steps.refine.crf import (CRF_KEYS, PSA_CRF, background_from_cams, crf_label_from_cams,
                                 dense_crf)

#: Stride of the affinity feature grid (PSA: 8).
STRIDE = 8

#: Affinity-label forms: ``avgpool`` (official ``train_aff.py``: 8x8 average pooling of the two
#: CRF score maps, then argmax and the high/low combination per cell) | ``centre`` (combine at
#: full resolution, take each cell's centre pixel; the project's former default).
LABEL_POOLING = ("avgpool", "centre")


def make_affinity_label(image: np.ndarray, cams: np.ndarray, class_ids: Sequence[int],
                        alpha_low: float = 4, alpha_high: float = 32,
                        crf: Mapping[str, float] | None = None) -> np.ndarray:
    """Affinity label combined at **full resolution** (the ``label_pooling="centre"`` form).

    ``L_low = crf_label(alpha_low)`` has a strong background (``(1-max)^4``) so its
    foreground is confident; ``L_high = crf_label(alpha_high)`` has a weak background so its
    background is confident. Combination (the rule of official ``VOC12AffDataset``)::

        L = L_low;  L[L_low == 0] = 255;  L[L_high == 0] = 0

    The official code applies this rule per 8x8 cell *after* average-pooling the two CRF score
    maps (:func:`pool_affinity_label`, :func:`window_affinity_labels`, the default); this
    function applies it per pixel, and ``centre`` then samples each cell's centre pixel
    (:func:`downsample_label`).

    (Note: in threshold language, ``official-settings.md``'s "L_h at tau_high" is this
    ``L_low``: a high background threshold is a low alpha.)

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        cams: ``(k, H, W)`` float in [0, 1], the seeds of the image's foreground classes.
        class_ids: ``k`` foreground class ids (1..254) in channel order.
        alpha_low, alpha_high: background powers, ``alpha_low < alpha_high`` (PSA: 4, 32).
        crf: :func:`pipeline.steps.refine.crf.dense_crf` keywords (PSA defaults when ``None``).

    Returns:
        ``(H, W)`` uint8 with values in ``{0, 255} ∪ class_ids``.

    Raises:
        ValueError: shape / class-id mismatch (from :func:`crf_label_from_cams`) or
            ``alpha_low >= alpha_high``.
    """
    if alpha_low >= alpha_high:
        raise ValueError(f"alpha_low ({alpha_low}) must be < alpha_high ({alpha_high})")
    low = crf_label_from_cams(image, cams, class_ids, alpha_low, crf)
    high = crf_label_from_cams(image, cams, class_ids, alpha_high, crf)
    label = low.copy()
    label[low == 0] = IGNORE_INDEX
    label[high == 0] = 0
    return label


def crf_scores(image: np.ndarray, cams: np.ndarray, alpha: float,
               crf: Mapping[str, float] | None = None) -> np.ndarray:
    """Dense-CRF marginals of ``[(1 - max cam)^alpha; cams]`` (official ``infer_cls.py:
    _crf_with_alpha``, the maps saved to ``--out_la_crf`` / ``--out_ha_crf``).

    Returns:
        ``(k+1, H, W)`` float32, channel 0 background, each pixel sums to 1 (``k = 0``: ones).
    """
    cams = np.asarray(cams, dtype=np.float32)
    image = np.asarray(image)
    if cams.ndim != 3 or cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams must have shape (k, H, W) matching the image "
                         f"{image.shape[:2]}, got {cams.shape}")
    crf = dict(crf or {})
    unknown = set(crf) - set(CRF_KEYS)
    if unknown:
        raise ValueError(f"unknown crf keys {sorted(unknown)}; allowed: {list(CRF_KEYS)}")
    if cams.shape[0] == 0:
        return np.ones((1,) + image.shape[:2], np.float32)
    return dense_crf(image, background_from_cams(cams, alpha), **{**PSA_CRF, **crf})


def _combine_high_low(low_idx: np.ndarray, high_idx: np.ndarray,
                      class_ids: Sequence[int]) -> np.ndarray:
    """Official rule on channel indices (0 = background): ``L = class(low)``, 255 where
    ``low`` is background, 0 where ``high`` is background."""
    lut = np.concatenate([[0], np.asarray(class_ids, np.int64).reshape(-1)]).astype(np.uint8)
    label = lut[low_idx]
    label[low_idx == 0] = IGNORE_INDEX
    label[high_idx == 0] = 0
    return label


def pool_affinity_label(q_low: np.ndarray, q_high: np.ndarray, class_ids: Sequence[int],
                        stride: int = STRIDE) -> np.ndarray:
    """Official PSA affinity label of one (cropped) pair of CRF score maps.

    ``imutils.AvgPool2d(stride)`` (skimage ``block_reduce(..., np.mean)``: the maps are
    zero-padded at the bottom / right to a multiple of ``stride``, i.e. a ``ceil`` grid, and
    the zeros count in the mean), then per cell ``argmax`` of each map, the high/low rule of
    :func:`make_affinity_label`, and 255 for cells whose every score is ``< 1e-5`` (cells of
    the crop's zero padding). Argmax ties go to the lower channel (``np.argmax``).

    Args:
        q_low, q_high: ``(k+1, H, W)`` CRF marginals at ``alpha_low`` / ``alpha_high`` (zeros
            where the crop padded the image).
        class_ids: ``k`` foreground class ids of channels ``1..k``.
        stride: cell size (8).

    Returns:
        ``(ceil(H/stride), ceil(W/stride))`` uint8 label grid.
    """
    q = np.concatenate([np.asarray(q_low, np.float64), np.asarray(q_high, np.float64)])
    c2, h, w = q.shape
    gh, gw = -(-h // stride), -(-w // stride)
    pad = np.zeros((c2, gh * stride, gw * stride))
    pad[:, :h, :w] = q
    pooled = pad.reshape(c2, gh, stride, gw, stride).mean(axis=(2, 4))
    k1 = np.asarray(q_low).shape[0]
    label = _combine_high_low(pooled[:k1].argmax(0), pooled[k1:].argmax(0), class_ids)
    label[pooled.max(0) < 1e-5] = IGNORE_INDEX
    return label


def window_affinity_labels(q_low: np.ndarray, q_high: np.ndarray, class_ids: Sequence[int],
                           stride: int = STRIDE) -> np.ndarray:
    """:func:`pool_affinity_label` for every cell alignment at once.

    The official label of a crop depends on where the crop's ``stride``-grid falls on the
    image, so the label of every ``stride x stride`` window overlapping the image is
    precomputed: entry ``[y + stride - 1, x + stride - 1]`` is the label of the window with
    top-left pixel ``(y, x)``, ``-stride < y < H``, ``-stride < x < W`` (mean over its pixels
    inside the image -- the crop's zero padding scales every channel alike, so the argmax is
    that of :func:`pool_affinity_label`). Sampling this map at a crop's cell grid gives the
    official label of the crop exactly (crop sizes that are multiples of ``stride``; otherwise
    the last partial cell also sees image pixels beyond the crop). Computed with integral
    images (float64), ``O(k H W)``; the result is the size of a full-resolution label.

    Returns:
        ``(H + stride - 1, W + stride - 1)`` uint8; no entry is 255-by-padding (every window
        overlaps the image), 255 only from the high/low rule.
    """
    q_low, q_high = np.asarray(q_low), np.asarray(q_high)
    k1, h, w = q_low.shape
    s = int(stride)
    q = np.concatenate([q_low, q_high]).astype(np.float64)
    pad = np.zeros((q.shape[0], h + 2 * s - 1, w + 2 * s - 1))   # s-1 zeros before, s after
    pad[:, s - 1:s - 1 + h, s - 1:s - 1 + w] = q
    ii = np.zeros((q.shape[0], pad.shape[1] + 1, pad.shape[2] + 1))
    ii[:, 1:, 1:] = pad.cumsum(1).cumsum(2)
    ny, nx = h + s - 1, w + s - 1
    box = ii[:, s:s + ny, s:s + nx] - ii[:, :ny, s:s + nx] - ii[:, s:s + ny, :nx] + ii[:, :ny, :nx]
    return _combine_high_low(box[:k1].argmax(0), box[k1:].argmax(0), class_ids)


def downsample_label(label: np.ndarray | torch.Tensor, stride: int = STRIDE):
    """Nearest downsampling of a label map to the stride grid by *centre-pixel sampling*
    (the ``label_pooling="centre"`` form; not what the official code does).

    Cell ``(i, j)`` covers pixels ``[stride*i, stride*(i+1))``; it takes the label of pixel
    ``(min(stride*i + stride//2, H-1), min(stride*j + stride//2, W-1))``. The grid has
    ``ceil(H/stride) x ceil(W/stride)`` cells, the size of
    :class:`pipeline.steps.refine.affinity_net.AffinityNet`'s output. The official code
    (``train_aff.py``) instead average-pools the two CRF *score* maps over each cell and
    combines the per-cell argmaxes (:func:`pool_affinity_label`).

    Args:
        label: ``(..., H, W)`` integer array or tensor.
        stride: grid stride (>= 1).

    Returns:
        ``(..., ceil(H/stride), ceil(W/stride))`` of the same type and dtype.
    """
    h, w = label.shape[-2:]
    ys = np.minimum(np.arange(0, h, stride) + stride // 2, h - 1)
    xs = np.minimum(np.arange(0, w, stride) + stride // 2, w - 1)
    if isinstance(label, torch.Tensor):
        ys_t = torch.as_tensor(ys, device=label.device)
        xs_t = torch.as_tensor(xs, device=label.device)
        return label.index_select(-2, ys_t).index_select(-1, xs_t)
    return label[..., ys, :][..., xs]


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Seed maps at another size: bilinear (``align_corners=False``) resize.

    Args:
        maps: ``(k, h, w)`` float (any ``k`` >= 0).
        size: ``(H, W)``.
    Returns:
        ``(k, H, W)``: ``maps`` itself when already that size, float32 zeros ``(0, H, W)``
        when ``k == 0``, else the resized float32 maps.
    """
    if maps.shape[1:] == tuple(size) or maps.shape[0] == 0:
        return np.zeros((0,) + tuple(size), np.float32) if maps.shape[0] == 0 else maps
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()
