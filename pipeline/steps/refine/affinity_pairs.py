"""PSA pixel pairs on the stride-8 feature grid, their affinities and labels, and the
affinity loss.

Ahn & Kwak, CVPR 2018 ("PSA"; official code jiwoon-ahn/psa), step 2 of the PSA modules (map in
:mod:`pipeline.steps.refine.affinity_train`; settings in ``docs/methods/psa.md``).

* Pairs (:func:`pair_indices`): pixel pairs of the stride-8 grid closer than ``radius`` (PSA
  eq. 4), enumerated once with PSA's half-disk search offsets (:func:`search_offsets`).
  Default ``pairs="official"`` (``tool/pyutils.py: get_indices_of_pairs``, used by the
  training labels ``ExtractAffinityLabelInRadius`` and by ``infer_aff.py``): pairs start only
  from pixels in ``[:-(r-1), r-1:-(r-1)]`` (the last ``r-1`` rows and the first / last ``r-1``
  columns start none, so pairs inside those border bands are missing); ``pairs="all"``: every
  pair within the radius (paper).
* Pair labels (:func:`pair_labels`): bg-bg and same-class fg-fg positive, different labels
  negative, pairs touching 255 ignored.
* Affinity (:func:`pairwise_affinity`) ``a_ij = exp(-mean_d |f_i - f_j|)`` (PSA eq. 3; the
  code uses the channel mean instead of the paper's L1 norm); loss (:func:`affinity_loss`)
  PSA eqs. 5-8.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from pipeline.data.voc import IGNORE_INDEX

#: Pair sets: ``official`` (``get_indices_of_pairs``: border pixels start no pairs) | ``all``
#: (every pair closer than the radius, PSA eq. 4).
PAIR_MODES = ("official", "all")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


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
        f: ``(B, D, h, w)`` float affinity features (output of
            :class:`pipeline.steps.refine.affinity_net.AffinityNet`).
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
