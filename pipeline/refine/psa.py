"""PSA: AffinityNet training and random-walk refinement of CAM seeds.

Ahn & Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision for Weakly
Supervised Semantic Segmentation", CVPR 2018 (below "PSA"). Where the paper and the official
code (jiwoon-ahn/psa) differ, the official code is the default and the paper's literal reading
an option (project issue 14); every setting is tabulated in ``docs/methods/psa.md``.

Pipeline
--------
1. **Affinity labels** (:func:`crf_scores`, :func:`pool_affinity_label`,
   :func:`window_affinity_labels`): two dense-CRF score maps from the seeds with background
   ``(1 - max cam)^alpha`` at ``alpha_low`` (4, strong background -> only confident
   foreground) and ``alpha_high`` (32, weak background -> only confident background).
   Official code (``train_aff.py`` + ``voc12/data.py: VOC12AffDataset``), default
   ``label_pooling="avgpool"``: the two score maps are cropped / flipped with the image,
   **average-pooled over 8x8 cells** (``imutils.AvgPool2d(8)`` = ``block_reduce`` with zero
   padding), and only then argmax-ed and combined at the cell grid::

       L = argmax(low);  L[argmax(low) == 0] = 255;  L[argmax(high) == 0] = 0
       L[cells without any score (outside the image)] = 255

   Option ``label_pooling="centre"`` (the project's former form): combine at full resolution
   (:func:`make_affinity_label`) and take each cell's centre pixel (:func:`downsample_label`).
2. **Pairs** (:func:`pair_indices`): pixel pairs of the stride-8 grid closer than ``radius``
   (PSA eq. 4), enumerated once with PSA's half-disk search offsets (:func:`search_offsets`).
   Default ``pairs="official"`` (``tool/pyutils.py: get_indices_of_pairs``, used by the
   training labels ``ExtractAffinityLabelInRadius`` and by ``infer_aff.py``): pairs start only
   from pixels in ``[:-(r-1), r-1:-(r-1)]`` (the last ``r-1`` rows and the first / last ``r-1``
   columns start none, so pairs inside those border bands are missing); ``pairs="all"``: every
   pair within the radius (paper). Pair labels (:func:`pair_labels`): bg-bg and same-class
   fg-fg positive, different labels negative, pairs touching 255 ignored.
3. **AffinityNet** (:class:`AffinityNet`): timm backbone at output stride 8, 1x1 convs on the
   last three feature maps, concatenated, 1x1 conv -> ``feature_dim`` channels.
   Affinity ``a_ij = exp(-mean_d |f_i - f_j|)`` (PSA eq. 3; the code uses the channel mean
   instead of the paper's L1 norm). Loss (:func:`affinity_loss`) PSA eqs. 5-8. Training
   augmentation as official ``train_aff.py``: colour jitter, random crop, horizontal flip, no
   rescale (``resize_long`` / ``scale_range`` are options).
4. **Random walk** (:func:`random_walk`, :func:`random_walk_dense`): ``W = a^beta`` over the
   same pairs (symmetrised with the transpose, diagonal 1, zero elsewhere; official
   ``resnet38_aff.Net.forward(to_dense=True)``), ``T = W D^-1`` (column-normalised, PSA
   eq. 9-10), refined maps ``vec(M) T^t`` with ``t = 2^logt`` (PSA eq. 11).
5. :func:`refine_maps` / :func:`refine_seeds`: per image, background ``(1 - max)^bg_alpha``,
   8x8 average pooling, random walk, bilinear upsampling, per-pixel normalisation.
"""
from __future__ import annotations

import warnings

import io
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipeline.data.transforms import to_tensor
from pipeline.data.voc import IGNORE_INDEX, VOC_CLASSES, load_image
from pipeline.models.backbones import create_backbone
from pipeline.refine.crf import (CRF_KEYS, PSA_CRF, background_from_cams, crf_label_from_cams,
                                 dense_crf)
from pipeline.storage import MapReader, MapWriter
from pipeline.utils import ResumeFile, atomic_torch_save

#: Stride of the affinity feature grid (PSA: 8).
STRIDE = 8

#: Affinity-label forms: ``avgpool`` (official ``train_aff.py``: 8x8 average pooling of the two
#: CRF score maps, then argmax and the high/low combination per cell) | ``centre`` (combine at
#: full resolution, take each cell's centre pixel; the project's former default).
LABEL_POOLING = ("avgpool", "centre")
#: Pair sets: ``official`` (``get_indices_of_pairs``: border pixels start no pairs) | ``all``
#: (every pair closer than the radius, PSA eq. 4).
PAIR_MODES = ("official", "all")

#: Paper-scale defaults (PSA with a ResNet-50 backbone instead of ResNet-38). Augmentation as
#: official ``train_aff.py``: colour jitter, random crop 448, horizontal flip, no rescale
#: (``RandomResizeLong(448, 768)`` is in ``train_cls.py`` only).
DEFAULT_TRAIN_PARAMS: dict[str, Any] = dict(
    backbone="resnet50", pretrained="hub", feature_dim=448, freeze_bn=True,
    crop=448, resize_long=None, scale_range=None, color_jitter=[0.3, 0.3, 0.3, 0.1],
    batch_size=8, iters=None, epochs=8, lr=0.1, head_lr_mult=10.0, weight_decay=5e-4,
    # official PSA ``PolyOptimizer`` calls ``SGD(params, lr, weight_decay)``: the positional
    # third argument is SGD's *momentum* (= 5e-4), so the released code trains with
    # (practically) no momentum; weight decay is set per parameter group.
    momentum=0.0, poly_power=0.9, radius=5, alpha_low=4, alpha_high=32, crf=dict(PSA_CRF),
    label_pooling="avgpool", pairs="official",
    seed=0, num_workers=4, log_every=10, checkpoint_every=0,
)

#: Random-walk defaults (PSA / official code).
DEFAULT_REFINE_PARAMS: dict[str, Any] = dict(radius=5, beta=8, logt=8, bg_alpha=16,
                                             pairs="official")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------
# affinity labels
# --------------------------------------------------------------------------------------
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
        crf: :func:`pipeline.refine.crf.dense_crf` keywords (PSA defaults when ``None``).

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
    ``ceil(H/stride) x ceil(W/stride)`` cells, the size of :class:`AffinityNet`'s output.
    The official code (``train_aff.py``) instead average-pools the two CRF *score* maps over
    each cell and combines the per-cell argmaxes (:func:`pool_affinity_label`).

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


# --------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------
def search_offsets(radius: int) -> list[tuple[int, int]]:
    """PSA half-disk search offsets ``(dy, dx)``.

    ``dy == 0, 0 < dx < radius`` and ``0 < dy < radius, |dx| < radius`` with
    ``dx^2 + dy^2 < radius^2``: from every pixel, these offsets visit each unordered pair of
    distinct pixels closer than ``radius`` exactly once (``pairs="all"``; the official code
    starts them from interior pixels only, see :func:`pair_indices`). ``radius=5`` gives 34
    offsets.

    Raises:
        ValueError: ``radius < 1``.

    Source: official PSA code (``get_indices_of_pairs``); PSA eq. 4.
    """
    radius = int(radius)
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    offs = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dx * dx + dy * dy < radius * radius:
                offs.append((dy, dx))
    return offs


@lru_cache(maxsize=64)
def _pair_indices_np(h: int, w: int, radius: int, pairs: str = "official"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.arange(h * w, dtype=np.int64).reshape(h, w)
    froms, tos, oids = [], [], []
    rf = radius - 1
    for k, (dy, dx) in enumerate(search_offsets(radius)):
        if pairs == "official":
            # get_indices_of_pairs: from = idx[:-rf, rf:-rf]; to = the same window shifted by
            # (dy, dx), which stays inside the grid for every half-disk offset
            if h - rf <= 0 or w - 2 * rf <= 0:
                continue
            f = idx[: h - rf, rf: w - rf].reshape(-1)
            t = idx[dy: dy + h - rf, rf + dx: w - rf + dx].reshape(-1)
        else:
            x0, x1 = max(0, -dx), min(w, w - dx)
            if dy >= h or x1 <= x0:
                continue
            f = idx[: h - dy, x0:x1].reshape(-1)
            t = idx[dy:, x0 + dx: x1 + dx].reshape(-1)
        froms.append(f)
        tos.append(t)
        oids.append(np.full(f.shape, k, dtype=np.int64))
    if not froms:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    out = tuple(np.concatenate(a) for a in (froms, tos, oids))
    for a in out:
        a.setflags(write=False)
    return out  # type: ignore[return-value]


def pair_indices(h: int, w: int, radius: int, device: torch.device | str = "cpu",
                 pairs: str = "official") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel pairs of an ``h x w`` grid closer than ``radius``, each at most once.

    ``pairs="official"`` (default; official ``tool/pyutils.py: get_indices_of_pairs``, the
    same slicing as the training labels' ``ExtractAffinityLabelInRadius`` and
    ``infer_aff.py``): with ``rf = radius - 1``, pairs start only from pixels
    ``(y, x)`` with ``y < h - rf`` and ``rf <= x < w - rf`` (``full_indices[:-rf, rf:-rf]``),
    one per :func:`search_offsets` offset; the end pixel may lie anywhere. Pixels in the last
    ``rf`` rows or the first / last ``rf`` columns start none, so e.g. two pixels of the
    same border column or of the bottom band are not paired (a corner cell can be isolated).
    A grid with ``h <= rf`` or ``w <= 2 rf`` has no pairs. ``pairs="all"`` (PSA eq. 4):
    every pair of distinct pixels closer than ``radius``.

    Vectorised per search offset (no loop over pixels). Pixel index = ``y * w + x``; pairs
    are ordered by offset, then row-major by start pixel (as the official concatenation).

    Returns:
        ``(from_idx, to_idx, offset_id)``, int64 tensors of shape ``(P,)``: pair ``p`` joins
        pixel ``from_idx[p]`` and ``to_idx[p] = from_idx[p] + (dy, dx)`` where
        ``(dy, dx) = search_offsets(radius)[offset_id[p]]``.

    Raises:
        ValueError: ``radius < 1`` or unknown ``pairs``.
    """
    _check_choice("pairs", pairs, PAIR_MODES)
    f, t, o = _pair_indices_np(int(h), int(w), int(radius), pairs)
    return (torch.from_numpy(f.copy()).to(device), torch.from_numpy(t.copy()).to(device),
            torch.from_numpy(o.copy()).to(device))


def pairwise_affinity(f: torch.Tensor, radius: int, pairs: str = "official"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affinities ``a_ij = exp(-mean_d |f_i - f_j|)`` of the :func:`pair_indices` pairs.

    Args:
        f: ``(B, D, h, w)`` or ``(D, h, w)`` float affinity features.
        radius: pair radius on the feature grid.
        pairs: ``official`` | ``all`` (:func:`pair_indices`).

    Returns:
        ``(a, from_idx, to_idx)``: ``a`` of shape ``(B, P)`` (or ``(P,)`` for 3-D input),
        values in (0, 1]; the pair indices as in :func:`pair_indices`.

    Source: PSA eq. 3 with the official code's channel mean.
    """
    squeeze = f.dim() == 3
    if squeeze:
        f = f.unsqueeze(0)
    if f.dim() != 4:
        raise ValueError(f"f must have shape (B, D, h, w) or (D, h, w), got {tuple(f.shape)}")
    b, d, h, w = f.shape
    fr, to, _ = pair_indices(h, w, radius, f.device, pairs)
    ff = f.reshape(b, d, h * w)
    a = torch.exp(-(ff[:, :, fr] - ff[:, :, to]).abs().mean(dim=1))
    return (a[0] if squeeze else a), fr, to


def pair_labels(labels: torch.Tensor, radius: int, pairs: str = "official"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels from a stride-grid label map.

    Args:
        labels: ``(B, h, w)`` int tensor with class ids, 0 = background, 255 = uncertain.
        radius: pair radius.
        pairs: ``official`` | ``all`` (:func:`pair_indices`).

    Returns:
        ``(bg_pos, fg_pos, neg)`` bool ``(B, P)`` masks over :func:`pair_indices` pairs:
        both background; same foreground class; different labels. Pairs with a 255 end are
        in none of them.

    Source: PSA Sec. 3.3 (eq. 4); official code ``ExtractAffinityLabelInRadius``.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must have shape (B, h, w), got {tuple(labels.shape)}")
    b, h, w = labels.shape
    fr, to, _ = pair_indices(h, w, radius, labels.device, pairs)
    flat = labels.reshape(b, h * w)
    lf, lt = flat[:, fr], flat[:, to]
    valid = (lf != IGNORE_INDEX) & (lt != IGNORE_INDEX)
    eq = lf == lt
    pos = eq & valid
    return pos & (lf == 0), pos & (lf != 0), (~eq) & valid


def affinity_loss(f: torch.Tensor, labels: torch.Tensor, radius: int = 5,
                  return_parts: bool = False, pairs: str = "official"):
    """PSA affinity loss ``L = L_bg+/4 + L_fg+/4 + L_neg/2``.

    ``L_bg+ = mean_{bg-bg pairs} -log(a + 1e-5)``, ``L_fg+`` likewise over same-class
    foreground pairs, ``L_neg = mean_{different-label pairs} -log(1 + 1e-5 - a)``; each mean
    is over all pairs of the batch in that set; an empty set contributes 0.

    Args:
        f: ``(B, D, h, w)`` float affinity features (:class:`AffinityNet` output).
        labels: ``(B, h, w)`` int labels on the same grid (0 bg, class ids, 255 ignored).
        radius: pair radius (PSA: 5).
        return_parts: also return a dict with the three terms and pair counts (floats).
        pairs: ``official`` (pairs of ``get_indices_of_pairs``, as the official
            ``ExtractAffinityLabelInRadius`` / ``resnet38_aff`` training) | ``all``.

    Returns:
        scalar loss tensor (differentiable w.r.t. ``f``), or ``(loss, parts)``.

    Raises:
        ValueError: ``labels`` shape is not ``(B, h, w)`` of ``f``.

    Source: PSA eqs. 5-8; weights 1/4, 1/4, 1/2 and the 1e-5 from the official code.
    """
    if f.dim() != 4 or labels.shape != (f.shape[0],) + tuple(f.shape[2:]):
        raise ValueError(f"labels must have shape (B, h, w) = {(f.shape[0],) + tuple(f.shape[2:])} "
                         f"matching f {tuple(f.shape)}, got {tuple(labels.shape)}")
    a, _, _ = pairwise_affinity(f, radius, pairs)
    bg, fg, neg = (m.to(a.dtype) for m in pair_labels(labels.to(f.device).long(), radius, pairs))
    pos_nll = -torch.log(a + 1e-5)
    neg_nll = -torch.log(1.0 + 1e-5 - a)
    nb, nf, nn_ = bg.sum(), fg.sum(), neg.sum()
    l_bg = (pos_nll * bg).sum() / nb.clamp_min(1)
    l_fg = (pos_nll * fg).sum() / nf.clamp_min(1)
    l_neg = (neg_nll * neg).sum() / nn_.clamp_min(1)
    loss = l_bg / 4 + l_fg / 4 + l_neg / 2
    if return_parts:
        return loss, dict(bg=float(l_bg.detach()), fg=float(l_fg.detach()),
                          neg=float(l_neg.detach()),
                          n_bg=float(nb), n_fg=float(nf), n_neg=float(nn_))
    return loss


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
class AffinityNet(nn.Module):
    """PSA AffinityNet on a timm backbone.

    ``create_backbone(backbone, pretrained, features_only=True, output_stride=8)``; the last
    three feature maps are each reduced by a bias-free 1x1 conv + ELU to
    ``feature_dim * (1, 2, 4) / 7`` channels (PSA: 64, 128, 256 of 448), resized to the
    stride-8 grid if needed, concatenated, and mixed by a bias-free 1x1 conv + ELU to
    ``feature_dim`` channels (official PSA ``resnet38_aff``: f8_3, f8_4, f8_5, f9; same
    initialisation: Kaiming normal, Xavier uniform with gain 4 for the last conv).

    Args:
        backbone: timm model name supporting ``features_only`` and ``output_stride``
            (``resnet50``; CPU profiles ``resnet18`` / ``resnet10t``).
        pretrained: see :func:`pipeline.models.backbones.create_backbone`.
        feature_dim: affinity feature channels ``D`` (PSA: 448), >= 3.
        freeze_bn: keep BatchNorm layers in eval mode with frozen affine parameters during
            training (official PSA code; use with pretrained backbones).
        **timm_kwargs: passed to timm.

    ``forward(x (B, 3, H, W)) -> (B, D, ceil(H/8), ceil(W/8))`` float.

    Raises:
        ValueError: ``feature_dim < 3``.
        pipeline.models.backbones.WeightsError: pretrained weights unavailable.
    """

    def __init__(self, backbone: str = "resnet50", pretrained: str | None = None,
                 feature_dim: int = 448, freeze_bn: bool = False, **timm_kwargs: Any):
        super().__init__()
        feature_dim = int(feature_dim)
        if feature_dim < 3:
            raise ValueError(f"feature_dim must be >= 3, got {feature_dim}")
        self.backbone = create_backbone(backbone, pretrained, features_only=True,
                                        output_stride=STRIDE, **timm_kwargs)
        chans = self.backbone.feature_info.channels()[-3:]
        split = [feature_dim // 7, 2 * feature_dim // 7]
        split.append(feature_dim - sum(split))
        self.reduce = nn.ModuleList(nn.Conv2d(c, s, 1, bias=False) for c, s in zip(chans, split))
        self.mix = nn.Conv2d(feature_dim, feature_dim, 1, bias=False)
        for m in self.reduce:
            nn.init.kaiming_normal_(m.weight)
        nn.init.xavier_uniform_(self.mix.weight, gain=4)
        self.feature_dim = feature_dim
        self.freeze_bn = bool(freeze_bn)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new 1x1 convs (trained with ``head_lr_mult`` x lr)."""
        return list(self.reduce.parameters()) + list(self.mix.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = math.ceil(x.shape[2] / STRIDE), math.ceil(x.shape[3] / STRIDE)
        feats = self.backbone(x)[-3:]
        outs = []
        for conv, ft in zip(self.reduce, feats):
            y = F.elu(conv(ft))
            if y.shape[2:] != (h, w):
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            outs.append(y)
        return F.elu(self.mix(torch.cat(outs, dim=1)))


def build_affinity_net(params: Mapping[str, Any], pretrained: Any = "from_params") -> AffinityNet:
    """:class:`AffinityNet` from a params dict (keys ``backbone``, ``pretrained``,
    ``feature_dim``, ``freeze_bn``); ``pretrained=None`` overrides the params (used when a
    checkpoint's state dict is loaded afterwards)."""
    p = {**DEFAULT_TRAIN_PARAMS, **params}
    return AffinityNet(p["backbone"], p["pretrained"] if pretrained == "from_params" else pretrained,
                       feature_dim=p["feature_dim"], freeze_bn=p["freeze_bn"])


def load_affinity_net(model_path: str | Path, device: str | torch.device = "cpu") -> AffinityNet:
    """Load a checkpoint written by :func:`train_affinity_net` (``{"state_dict", "params"}``),
    in eval mode on ``device``.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
    """
    p = Path(model_path)
    if not p.is_file():
        raise FileNotFoundError(f"affinity model {p} does not exist; run the train_affinity "
                                f"stage first.")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    model = build_affinity_net(ckpt["params"], pretrained=None)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


# --------------------------------------------------------------------------------------
# random walk
# --------------------------------------------------------------------------------------
def _check_rw_inputs(f: torch.Tensor, maps: torch.Tensor, logt: int) -> None:
    if f.dim() != 3 or maps.dim() != 3 or f.shape[1:] != maps.shape[1:]:
        raise ValueError(f"f must be (D, h, w) and maps (C, h, w) on the same grid, got "
                         f"{tuple(f.shape)} and {tuple(maps.shape)}")
    if int(logt) < 0:
        raise ValueError(f"logt must be >= 0, got {logt}")


def affinity_matrix_dense(f: torch.Tensor, radius: int = 5, beta: float = 8,
                          pairs: str = "official") -> torch.Tensor:
    """Dense ``W = a^beta``, ``(n, n)`` with ``n = h*w``: ``a`` on the :func:`pair_indices`
    pairs and their transposes, diagonal 1, 0 elsewhere (so with ``pairs="official"`` also 0
    for close pairs that no interior pixel starts). Memory O(n^2). Source: official PSA code
    (``resnet38_aff.Net.forward(to_dense=True)``: a sparse matrix of ``[(from, to), (i, i),
    (to, from)]`` with values ``[aff, 1, aff]``, made dense; then ``** beta`` in
    ``infer_aff.py``)."""
    d, h, w = f.shape
    n = h * w
    a, fr, to = pairwise_affinity(f, radius, pairs)
    wmat = torch.zeros(n, n, dtype=f.dtype, device=f.device)
    ab = a.pow(beta)
    wmat[fr, to] = ab
    wmat[to, fr] = ab
    wmat.diagonal().fill_(1.0)
    return wmat


def random_walk_dense(f: torch.Tensor, maps: torch.Tensor, radius: int = 5, beta: float = 8,
                      logt: int = 8, pairs: str = "official") -> torch.Tensor:
    """Reference PSA random walk with a dense transition matrix (O(n^2) memory, O(n^3 logt)).

    ``W = a^beta`` (:func:`affinity_matrix_dense`), ``T = W / colsum(W)``, ``T <- T @ T``
    ``logt`` times, ``out = maps.reshape(C, n) @ T``.

    Args:
        f: ``(D, h, w)`` float affinity features.
        maps: ``(C, h, w)`` float non-negative maps on the same grid (with background).
        radius, beta, logt: PSA 5, 8, 8.
        pairs: ``official`` | ``all`` (:func:`pair_indices`).

    Returns:
        ``(C, h, w)`` tensor (dtype of ``f``). Each step replaces a pixel's vector by an
        affinity-weighted average of its neighbours' (columns of ``T`` sum to 1), so constant
        maps are fixed points and per-pixel channel sums stay within the input's range; the
        output is not normalised per pixel (PSA's input ``[bg; cams]`` is not).

    Raises:
        ValueError: shape mismatch or ``logt < 0``.

    Source: PSA eqs. 9-11; official code ``infer_aff.py``.
    """
    _check_rw_inputs(f, maps, logt)
    c, h, w = maps.shape
    wmat = affinity_matrix_dense(f, radius, beta, pairs)
    t = wmat / wmat.sum(dim=0, keepdim=True)
    for _ in range(int(logt)):
        t = t @ t
    return (maps.to(t.dtype).reshape(c, h * w) @ t).reshape(c, h, w)


def affinity_neighbours(f: torch.Tensor, radius: int = 5, beta: float = 8,
                        pairs: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse local form of ``W = a^beta``: per pixel its neighbours in the full disk
    (those joined by a :func:`pair_indices` pair).

    Returns:
        ``(nbr, weight)`` of shape ``(n, K)``, ``K = 1 + 2 * len(search_offsets(radius))``:
        column 0 is the pixel itself (weight 1); columns ``1..m`` the half-disk offsets,
        ``m+1..2m`` their mirrors. Out-of-grid neighbours have ``nbr`` = the pixel itself and
        weight 0; so are offsets whose pair the ``official`` set lacks. ``weight[i, k] =
        W[i, nbr[i, k]]`` exactly (symmetric by construction).
    """
    d, h, w = f.shape
    n = h * w
    m = len(search_offsets(radius))
    a, fr, to = pairwise_affinity(f, radius, pairs)
    _, _, oid = pair_indices(h, w, radius, f.device, pairs)
    ab = a.pow(beta)
    self_idx = torch.arange(n, device=f.device)
    nbr = self_idx[:, None].repeat(1, 1 + 2 * m)
    weight = torch.zeros(n, 1 + 2 * m, dtype=f.dtype, device=f.device)
    weight[:, 0] = 1.0
    nbr[fr, 1 + oid] = to
    weight[fr, 1 + oid] = ab
    nbr[to, 1 + m + oid] = fr
    weight[to, 1 + m + oid] = ab
    return nbr, weight


def random_walk(f: torch.Tensor, maps: torch.Tensor, radius: int = 5, beta: float = 8,
                logt: int = 8, pairs: str = "official") -> torch.Tensor:
    """PSA random walk with a sparse local transition matrix (memory O(n * K)).

    Same result as :func:`random_walk_dense`: with ``W`` symmetric, column ``j`` of
    ``T = W / colsum`` holds ``W[i, j] / d_j`` for the ``K`` neighbours ``i`` of ``j``, so one
    step ``M <- M T`` is ``M[:, j] <- sum_k M[:, nbr[j, k]] * weight[j, k] / d_j``; it is
    applied ``2^logt`` times as a sparse (CSR) matrix product (cost ``2^logt * C * n * K``;
    no n x n matrix; ~24x faster than the dense power on a 64x48 grid, see ``python -m bench
    randomwalk``).

    Args:
        f: ``(D, h, w)`` float affinity features.
        maps: ``(C, h, w)`` float non-negative maps on the same grid (with background).
        radius, beta, logt: PSA 5, 8, 8.
        pairs: ``official`` | ``all`` (:func:`pair_indices`); the same edges as
            :func:`random_walk_dense`.

    Returns:
        ``(C, h, w)`` tensor (dtype of ``f``), not normalised per pixel.

    Raises:
        ValueError: shape mismatch or ``logt < 0``.

    Source: PSA eqs. 9-11 (official code ``infer_aff.py`` uses the dense form).
    """
    _check_rw_inputs(f, maps, logt)
    c, h, w = maps.shape
    n = h * w
    nbr, weight = affinity_neighbours(f, radius, beta, pairs)
    tn = weight / weight.sum(dim=1, keepdim=True)        # (n, K), rows = columns of T
    k = nbr.shape[1]
    # T^T in CSR: row j holds column j of T (K entries; out-of-grid slots have weight 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # "sparse CSR support is in beta"
        t_t = torch.sparse_csr_tensor(torch.arange(0, n * k + 1, k, device=f.device),
                                      nbr.reshape(-1), tn.reshape(-1), size=(n, n))
    x = maps.to(f.dtype).reshape(c, n).t().contiguous()  # (n, C)
    for _ in range(2 ** int(logt)):
        x = t_t @ x                                      # one step M <- M T, as (T^T M^T)
    return x.t().reshape(c, h, w)


# --------------------------------------------------------------------------------------
# refinement
# --------------------------------------------------------------------------------------
def _resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if maps.shape[1:] == tuple(size) or maps.shape[0] == 0:
        return np.zeros((0,) + tuple(size), np.float32) if maps.shape[0] == 0 else maps
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


@torch.no_grad()
def refine_maps(model: AffinityNet, image: np.ndarray, cams: np.ndarray,
                params: Mapping[str, Any] | None = None) -> np.ndarray:
    """PSA refinement of one image's CAMs.

    1. ``background_from_cams(cams, bg_alpha)`` at full resolution -> ``(k+1, H, W)``;
    2. 8x8 average pooling (``ceil_mode``, partial border cells averaged over their valid
       pixels) to the ``ceil(H/8) x ceil(W/8)`` grid of ``model(image)`` (official
       ``infer_aff.py`` zero-pads to a multiple of 8 and divides partial cells by 64: a
       remaining difference, ``docs/methods/psa.md``);
    3. :func:`random_walk` with ``radius``, ``beta``, ``logt``, ``pairs``;
    4. bilinear upsampling to ``(8h, 8w)`` (``align_corners=False``) cropped to ``(H, W)``;
    5. per-pixel normalisation: negatives (none in exact arithmetic) clipped to 0, each pixel
       divided by its channel sum. The input ``[(1-max)^bg_alpha; cams]`` does not sum to 1
       per pixel and the walk only averages, so the raw result is not a distribution; the
       official code takes the argmax, which this normalisation does not change.

    Args:
        model: trained :class:`AffinityNet` (its device is used).
        image: ``(H, W, 3)`` uint8 RGB.
        cams: ``(k, H, W)`` float in [0, 1] (other sizes are bilinearly resized to ``(H, W)``).
        params: ``radius``, ``beta``, ``logt``, ``bg_alpha``, ``pairs`` (defaults
            :data:`DEFAULT_REFINE_PARAMS`).

    Returns:
        ``(k+1, H, W)`` float32 in [0, 1], channel 0 background, each pixel sums to 1.

    Raises:
        ValueError: bad image / cams shapes.

    Source: PSA Sec. 3.4-3.5; official code ``infer_aff.py``.
    """
    p = {**DEFAULT_REFINE_PARAMS, **(params or {})}
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (k, H, W), got {cams.shape}")
    H, W = image.shape[:2]
    cams = _resize_maps(cams, (H, W))
    if cams.shape[0] == 0:
        return np.ones((1, H, W), np.float32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        f = model(to_tensor(image)[None].to(device))[0]
    finally:
        model.train(was_training)
    h, w = f.shape[1:]
    maps = torch.from_numpy(background_from_cams(cams, p["bg_alpha"]))[None].to(device)
    maps = F.avg_pool2d(maps, STRIDE, STRIDE, ceil_mode=True)[0]
    if maps.shape[1:] != (h, w):  # only for exotic backbones; keep the grids aligned
        maps = F.interpolate(maps[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    rw = random_walk(f.float(), maps.float(), p["radius"], p["beta"], p["logt"],
                     _check_choice("pairs", p["pairs"], PAIR_MODES))
    up = F.interpolate(rw[None], size=(h * STRIDE, w * STRIDE), mode="bilinear",
                       align_corners=False)[0, :, :H, :W].clamp_min(0)
    up = up / up.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return up.cpu().numpy().astype(np.float32)


def refine_seeds(root: str | Path, ids: Sequence[str], seeds_path: str | Path, seed_key: str,
                 model_path: str | Path, out_path: str | Path,
                 params: Mapping[str, Any] | None = None, device: str = "cpu",
                 log: Callable[[str], Any] = print) -> None:
    """Refine the seeds of ``ids`` with a trained AffinityNet and write ``out_path``.

    Output (:class:`pipeline.storage.MapWriter`, atomic): per image ``class_ids = [0] + fg
    ids`` and key ``probs`` = :func:`refine_maps` output ``(k+1, H, W)``; file attributes
    ``stage="refine_seeds"``, ``method="psa"``, ``params``.

    Args:
        root: dataset root (``JPEGImages``).
        ids: image ids.
        seeds_path: seeds HDF5 (:class:`MapReader`), maps ``seed_key`` of shape ``(k, h, w)``.
        seed_key: map key, e.g. ``"cams"``.
        model_path: checkpoint of :func:`train_affinity_net`.
        out_path: output HDF5.
        params: ``radius``, ``beta``, ``logt``, ``bg_alpha``, ``pairs``.
        device: torch device.
        log: message sink.

    Raises:
        pipeline.storage.StorageError, pipeline.data.voc.DatasetError, FileNotFoundError:
            missing inputs.
    """
    from tqdm import tqdm

    p = {**DEFAULT_REFINE_PARAMS, **(params or {})}
    model = load_affinity_net(model_path, device)
    t0 = time.time()
    with MapReader(seeds_path) as reader:
        reader.require(ids, root)
        names = reader.class_names or list(VOC_CLASSES)
        with MapWriter(out_path, names, {"stage": "refine_seeds", "method": "psa",
                                         "params": dict(p)}) as writer:
            for image_id in tqdm(list(ids), desc="psa random walk", leave=False):
                cams, cids, _ = reader.read(image_id, seed_key)
                image = load_image(root, image_id)
                probs = refine_maps(model, image, cams, p)
                writer.write(image_id, np.concatenate([[0], cids]).astype(np.int64),
                             image.shape[:2], probs=probs)
    log(f"refine_seeds: {len(ids)} images refined with PSA random walk in "
        f"{time.time() - t0:.1f}s -> {out_path}")


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
def _encode_png(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im, dtype=np.uint8).copy()


class _LabelSet(torch.utils.data.Dataset):
    """Computes affinity labels (two CRFs per image) in DataLoader workers.

    ``label_pooling="avgpool"``: :func:`window_affinity_labels` of the two CRF score maps,
    ``(H+7, W+7)``; ``centre``: :func:`make_affinity_label`, ``(H, W)``. Counts (bg, fg,
    ignored) are over the image's own 8x8 cells (``avgpool``) or pixels (``centre``)."""

    def __init__(self, root, ids, seeds_path, seed_key, p):
        self.root, self.ids, self.seeds_path, self.seed_key, self.p = root, list(ids), \
            str(seeds_path), seed_key, p
        self._reader = None  # opened lazily in each worker (h5py handles do not survive fork)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if self._reader is None:
            self._reader = MapReader(self.seeds_path)
        p = self.p
        image_id = self.ids[i]
        cams, cids, _ = self._reader.read(image_id, self.seed_key)
        image = load_image(self.root, image_id)
        cams = _resize_maps(cams, image.shape[:2])
        if p["label_pooling"] == "avgpool":
            if p["alpha_low"] >= p["alpha_high"]:
                raise ValueError(f"alpha_low ({p['alpha_low']}) must be < alpha_high "
                                 f"({p['alpha_high']})")
            label = window_affinity_labels(crf_scores(image, cams, p["alpha_low"], p["crf"]),
                                           crf_scores(image, cams, p["alpha_high"], p["crf"]),
                                           cids)
            stat = label[STRIDE - 1::STRIDE, STRIDE - 1::STRIDE]
        else:
            label = make_affinity_label(image, cams, cids, p["alpha_low"], p["alpha_high"],
                                        p["crf"])
            stat = label
        counts = np.bincount(np.where(stat == IGNORE_INDEX, 2, (stat > 0).astype(np.int64))
                             .reshape(-1), minlength=3)
        return image_id, _encode_png(label), counts


@lru_cache(maxsize=256)
def _nearest_source(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel of a PIL ``NEAREST`` resize ``n_in -> n_out`` (one
    axis): PIL accumulates ``x_in = scale/2 + x * scale`` step by step in double precision
    and truncates; reproduced so that ``label_pooling="centre"`` with a rescale gives the
    former labels exactly."""
    scale = n_in / n_out
    out = np.empty(n_out, np.int64)
    xx = scale * 0.5
    for x in range(n_out):
        out[x] = int(xx)
        xx += scale
    out.setflags(write=False)
    return out


def _cell_label_indices(start: int, crop: int, size_scaled: int, size_orig: int,
                        flipped: bool, pooling: str, stride: int = STRIDE) -> np.ndarray:
    """Indices into a stored label map (one axis) of the cells of a crop.

    The crop covers scaled-image coordinates ``[start, start + crop)`` (``start < 0`` or
    beyond the image = padding) of an image of ``size_scaled`` pixels along this axis, after
    an optional flip, rescaled from ``size_orig``. ``centre``: pixel ``start +
    min(stride*i + stride//2, crop-1)`` of the (flipped) scaled image, mapped back like a
    nearest resize, index into the ``(H, W)`` label. ``avgpool``: window ``[start + stride*i,
    + stride)`` mapped back (for a rescale: the ``stride`` original pixels around the mapped
    cell centre, an approximation), index ``top-left + stride - 1`` into the
    :func:`window_affinity_labels` map. Out-of-range indices are returned as -1.
    """
    n = -(-crop // stride)
    cells = stride * np.arange(n)
    r = size_orig / size_scaled
    if pooling == "centre":
        pix = start + np.minimum(cells + stride // 2, crop - 1)
        if flipped:
            pix = size_scaled - 1 - pix
        inside = (pix >= 0) & (pix < size_scaled)
        if size_scaled != size_orig:
            pix = _nearest_source(size_scaled, size_orig)[np.where(inside, pix, 0)]
        return np.where(inside, pix, -1)
    top = start + cells
    if flipped:
        top = size_scaled - top - stride
    if size_scaled != size_orig:
        top = np.floor((top + stride / 2) * r).astype(np.int64) - stride // 2
    idx = top + stride - 1
    return np.where((idx >= 0) & (idx < size_orig + stride - 1), idx, -1)


class _AffinityTrainSet(torch.utils.data.Dataset):
    """Joint augmentation of image and affinity label, label on the crop's 8x8 cell grid.

    Official ``train_aff.py``: colour jitter, random crop (smaller images padded: image 0,
    label 255), horizontal flip; optional random rescale (``resize_long`` / ``scale_range``,
    not in the official affinity training). The stored label map (see :class:`_LabelSet`) is
    sampled at the crop's cells (:func:`_cell_label_indices`); the random draws are the same
    for both ``label_pooling`` forms."""

    def __init__(self, root, ids, labels: dict[str, bytes], p):
        self.root, self.ids, self.labels, self.p = root, list(ids), labels, p
        cj = p.get("color_jitter")
        self.jitter = None
        if cj:
            from torchvision.transforms import ColorJitter
            self.jitter = ColorJitter(*cj)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        p = self.p
        image_id = self.ids[i]
        img = Image.fromarray(load_image(self.root, image_id))
        lab = _decode_png(self.labels[image_id])
        w0, h0 = img.size
        if p.get("resize_long"):
            lo, hi = p["resize_long"]
            s = float(torch.randint(int(lo), int(hi) + 1, ()).item()) / max(h0, w0)
        elif p.get("scale_range"):
            lo, hi = p["scale_range"]
            s = lo + (hi - lo) * float(torch.rand(()).item())
        else:
            s = 1.0
        if s != 1.0:
            img = img.resize((max(1, round(w0 * s)), max(1, round(h0 * s))), Image.BILINEAR)
        if self.jitter is not None:
            img = self.jitter(img)
        x = to_tensor(np.array(img, dtype=np.uint8))
        flipped = bool(torch.rand(()) < 0.5)
        if flipped:
            x = x.flip(-1)
        crop = int(p["crop"])
        h, w = x.shape[1:]
        ph, pw = max(crop - h, 0), max(crop - w, 0)
        pt = pl = 0
        if ph or pw:
            pt = int(torch.randint(0, ph + 1, ()))
            pl = int(torch.randint(0, pw + 1, ()))
            x = F.pad(x, (pl, pw - pl, pt, ph - pt), value=0.0)
        top = int(torch.randint(0, h + ph - crop + 1, ()))
        left = int(torch.randint(0, w + pw - crop + 1, ()))
        x = x[:, top:top + crop, left:left + crop]
        pooling = p["label_pooling"]
        ys = _cell_label_indices(top - pt, crop, h, h0, False, pooling)
        xs = _cell_label_indices(left - pl, crop, w, w0, flipped, pooling)
        y = np.full((len(ys), len(xs)), IGNORE_INDEX, np.int64)
        ok_y, ok_x = ys >= 0, xs >= 0
        y[np.ix_(ok_y, ok_x)] = lab[np.ix_(ys[ok_y], xs[ok_x])]
        return x.contiguous(), torch.from_numpy(y)


def train_affinity_net(root: str | Path, ids: Sequence[str], seeds_path: str | Path,
                       seed_key: str, params: Mapping[str, Any], out_path: str | Path,
                       device: str = "cpu", log: Callable[[str], Any] = print) -> dict:
    """Train a PSA AffinityNet on affinity labels derived from seeds.

    Steps: (1) affinity labels of every image (:func:`make_affinity_label`, two dense CRFs;
    computed once, in ``num_workers`` DataLoader workers, kept PNG-compressed in memory);
    (2) SGD (``momentum``, default 0 as in the official code), poly learning rate
    ``lr * (1 - it/iters)^poly_power``, backbone at
    ``lr`` and the new 1x1 convs at ``head_lr_mult * lr``, loss :func:`affinity_loss` over
    the ``pairs`` set;
    augmentation (official ``train_aff.py``): optional colour jitter, horizontal flip, random
    ``crop`` (padding: image 0, label 255), no rescale unless ``resize_long`` = [lo, hi] (long
    side) or ``scale_range`` = [lo, hi] (factor) is set; the label on the crop's 8x8 cells is
    the official average-pooled one (``label_pooling="avgpool"``,
    :func:`window_affinity_labels`) or the centre pixel of the full-resolution label
    (``centre``, :func:`downsample_label`);
    (3) checkpoint ``{"state_dict", "params"}`` published with
    :func:`pipeline.utils.atomic_torch_save` (``<out_path>.tmp``, then renamed).

    Args:
        root: dataset root (``JPEGImages``).
        ids: training image ids (must be in the seeds file).
        seeds_path, seed_key: seeds HDF5 and its map key (``(k, H, W)`` in [0, 1]).
        params: keys of :data:`DEFAULT_TRAIN_PARAMS` (missing keys take those defaults):
            backbone, pretrained, feature_dim, freeze_bn, crop, resize_long, scale_range,
            color_jitter, batch_size, iters (``None`` -> ``epochs * ceil(len(ids)/batch)``),
            epochs, lr, head_lr_mult, weight_decay, momentum, poly_power, radius,
            alpha_low, alpha_high, crf, label_pooling (``avgpool`` | ``centre``), pairs
            (``official`` | ``all``), seed, num_workers, log_every, checkpoint_every (N > 0:
            ``<out_path>.resume`` every N iterations; a rerun with the same params recomputes
            the affinity labels, replays the data stream up to the saved iteration without
            training (so every augmentation draw repeats) and continues to the same final
            weights as an uninterrupted run; removed at the end).
        out_path: checkpoint path.
        device: torch device string.
        log: message sink.

    Returns:
        metrics dict: ``iters``, ``num_images``, ``final_loss`` (mean of the last logged
        window), ``loss_curve`` (``[{"iter": i, "loss": mean loss since the previous entry,
        "bg", "fg", "neg"}]`` every ``log_every`` iterations and at the last one),
        ``label_fractions`` (fractions bg / fg / ignored of the affinity labels: of the
        images' 8x8 cells for ``avgpool``, of pixels for ``centre``),
        ``seconds_labels``, ``seconds_train``.

    Raises:
        ValueError: empty ``ids``, unknown param keys or ``label_pooling`` / ``pairs``
            values.
        pipeline.storage.StorageError, pipeline.data.voc.DatasetError: missing inputs.
    """
    from tqdm import tqdm

    unknown = set(params) - set(DEFAULT_TRAIN_PARAMS)
    if unknown:
        raise ValueError(f"unknown train_affinity params {sorted(unknown)}; allowed: "
                         f"{sorted(DEFAULT_TRAIN_PARAMS)}")
    p = {**DEFAULT_TRAIN_PARAMS, **params}
    p["crf"] = {**PSA_CRF, **(p.get("crf") or {})}
    _check_choice("label_pooling", p["label_pooling"], LABEL_POOLING)
    _check_choice("pairs", p["pairs"], PAIR_MODES)
    ids = list(ids)
    if not ids:
        raise ValueError("train_affinity_net: no training ids")
    with MapReader(seeds_path) as r:  # fail early with a clear message; closed before fork
        r.require(ids, root)
        r.read(ids[0], seed_key)
    torch.manual_seed(int(p["seed"]))
    nw = int(p["num_workers"])

    # 1) affinity labels -----------------------------------------------------------------
    t0 = time.time()
    labels: dict[str, bytes] = {}
    counts = np.zeros(3, np.int64)
    lab_loader = torch.utils.data.DataLoader(
        _LabelSet(root, ids, seeds_path, seed_key, p), batch_size=None, shuffle=False,
        num_workers=nw)
    for image_id, data, c in tqdm(lab_loader, total=len(ids), desc="affinity labels (CRF)",
                                  leave=False):
        labels[image_id] = data
        counts += np.asarray(c)
    t_labels = time.time() - t0
    fr = counts / max(1, counts.sum())
    log(f"train_affinity: labels of {len(ids)} images in {t_labels:.1f}s "
        f"(bg {fr[0]:.2f}, fg {fr[1]:.2f}, ignored {fr[2]:.2f})")

    # 2) training ------------------------------------------------------------------------
    bs = int(p["batch_size"])
    iters = int(p["iters"]) if p.get("iters") else int(p["epochs"]) * math.ceil(len(ids) / bs)
    gen = torch.Generator().manual_seed(int(p["seed"]))
    train_set = _AffinityTrainSet(root, ids, labels, p)
    sampler = torch.utils.data.RandomSampler(train_set, replacement=False,
                                             num_samples=iters * bs, generator=gen)
    loader = torch.utils.data.DataLoader(train_set, batch_size=bs, sampler=sampler,
                                         num_workers=nw, drop_last=True,
                                         generator=gen, persistent_workers=False)
    model = build_affinity_net(p).to(device)
    model.train()
    head = {id(q) for q in model.head_parameters()}
    body = [q for q in model.parameters() if id(q) not in head and q.requires_grad]
    base_lr = float(p["lr"])
    mults = [1.0, float(p["head_lr_mult"])]
    opt = torch.optim.SGD([{"params": body, "lr": base_lr},
                           {"params": model.head_parameters(), "lr": base_lr * mults[1]}],
                          lr=base_lr, momentum=float(p["momentum"] or 0.0),
                          weight_decay=float(p["weight_decay"]))
    curve: list[dict] = []
    window, parts_w = [], []
    log_every = max(1, int(p["log_every"]))
    it = 0
    resume = ResumeFile(out_path, p, int(p["checkpoint_every"] or 0), "train_affinity", log)
    st = resume.load(model, opt, map_location=device)
    if st is not None:
        it, curve, window, parts_w = st["it"], st["curve"], st["window"], st["parts"]
    t1 = time.time()
    batches = iter(loader)
    for _ in range(it):      # replay: the same sampler / augmentation draws, no training
        next(batches)
    bar = tqdm(total=iters, initial=it, desc="train affinity", leave=False)
    for x, y in batches:
        scale = (1.0 - it / iters) ** float(p["poly_power"])
        for g, m in zip(opt.param_groups, mults):
            g["lr"] = base_lr * m * scale
        f = model(x.to(device, non_blocking=True))
        loss, parts = affinity_loss(f, y.to(device), int(p["radius"]), return_parts=True,
                                    pairs=p["pairs"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_affinity: loss is {float(loss)} at iteration "
                                     f"{it + 1}; lower `lr` in params.yaml (now {base_lr}).")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        window.append(float(loss.detach()))
        parts_w.append(parts)
        if it % log_every == 0 or it == iters:
            entry = {"iter": it, "loss": float(np.mean(window))}
            for k in ("bg", "fg", "neg"):
                entry[k] = float(np.mean([q[k] for q in parts_w]))
            curve.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            window, parts_w = [], []
        if resume.due(it, iters):
            resume.save(model=model.state_dict(), opt=opt.state_dict(), it=it, curve=curve,
                        window=window, parts=parts_w)
        bar.update(1)
    bar.close()
    t_train = time.time() - t1
    final = curve[-1]["loss"] if curve else float("nan")
    log(f"train_affinity: {iters} iterations in {t_train:.1f}s, final loss {final:.4f}")

    # 3) checkpoint ----------------------------------------------------------------------
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "params": p}, out_path)
    resume.remove()
    return {"iters": iters, "num_images": len(ids), "final_loss": final, "loss_curve": curve,
            "label_fractions": {"bg": float(fr[0]), "fg": float(fr[1]),
                                "ignored": float(fr[2])},
            "seconds_labels": t_labels, "seconds_train": t_train}
