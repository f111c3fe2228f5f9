"""Pseudo labels from CAMs (AFA Eq. 4 with two background scores, the "high/low" combination,
PAR-refined labels), shared by the single-stage transformer methods (AFA, MCC/ToCo).

Sources: AFA (Ru et al., CVPR 2022, ``shared/papers/afa-affinity-from-attention.txt``) Eq. 4
and Sec. 3.4; the official AFA code (read as a reference only, nothing copied) for the
"high/low" combination of the two refined labels (digest
``shared/reference/official-settings.md``, "AFA (code facts)").

Conventions: ``C`` foreground classes, label maps use 0 = background, ``c + 1`` = foreground
class ``c``, ``ignore`` (255) = uncertain.
"""
from __future__ import annotations

import torch

from pipeline.methods.common.par import PAR, maps_to_par_label


# ---------------------------------------------------------------- pseudo labels (AFA Eq. 4)


def cam_to_label(cams: torch.Tensor, labels: torch.Tensor, bg_high: float = 0.55,
                 bg_low: float = 0.35, ignore: int = 255) -> torch.Tensor:
    """Pseudo label with an uncertain band (AFA Eq. 4; ToCo/MCC use (0.7, 0.25)).

    ``v = max_c (y_c M_c)``: ``argmax + 1`` where ``v > bg_high``, 0 where ``v <= bg_low``,
    ``ignore`` otherwise. The tie ``v == bg_high`` is uncertain, as in the official
    ``cam_to_label`` of AFA (``utils/camutils.py``) and ToCo / MCC (``utils/camutils.py``:
    ``_pseudo_label[cam_value<=high_thre] = ignore_index``, then ``<=low_thre`` → 0); AFA
    Eq. 4 reads ``v >= β_h`` as foreground, which only differs at that exact tie.

    Args:
        cams: ``(B, C, h, w)`` float maps in [0, 1] (normalised CAMs).
        labels: ``(B, C)`` multi-hot image labels (absent classes are masked to 0).
        bg_high, bg_low: β_h >= β_l.
    Returns:
        ``(B, h, w)`` int64 in {0, 1..C, ignore}.
    Raises:
        ValueError: ``bg_low > bg_high`` or shape mismatch.
    """
    if bg_low > bg_high:
        raise ValueError(f"cam_to_label: bg_low {bg_low} > bg_high {bg_high}")
    if cams.shape[:2] != labels.shape:
        raise ValueError(f"cam_to_label: cams {tuple(cams.shape)} vs labels {tuple(labels.shape)}")
    v, idx = (cams * labels[:, :, None, None].to(cams.dtype)).max(1)
    out = torch.full_like(idx, ignore)
    out[v > bg_high] = idx[v > bg_high] + 1
    out[v <= bg_low] = 0
    return out


def combine_high_low(label_high: torch.Tensor, label_low: torch.Tensor,
                     ignore: int = 255) -> torch.Tensor:
    """"High/low" combination (PSA / AFA code): ``L = L_h``; where ``L_h`` is background it is
    uncertain (``ignore``) unless ``L_l`` is background too (then 0).

    Args:
        label_high: ``(...)`` int labels from the high background score (conservative fg).
        label_low: same shape, from the low background score.
    Returns:
        same shape/dtype as ``label_high``.
    """
    out = label_high.clone()
    out[label_high == 0] = ignore
    out[(label_high == 0) & (label_low == 0)] = 0
    return out


def refine_cams_with_bkg(par: PAR, img: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor,
                         bg_high: float = 0.55, bg_low: float = 0.35, down_scale: int = 2,
                         ignore: int = 255, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """PAR-refined pseudo label of CAMs (AFA Sec. 3.4 + official ``refine_cams_with_bkg_v2``).

    For each background score β in (β_h, β_l): maps ``[β; y ⊙ M]``, softmax over the valid
    channels, PAR, argmax (:func:`maps_to_par_label`); the two labels are merged by
    :func:`combine_high_low`.

    Args:
        img: ``(B, 3, H, W)`` float image.
        cams: ``(B, C, h, w)`` normalised CAMs in [0, 1] (resized to the PAR grid).
        labels: ``(B, C)`` multi-hot.
    Returns:
        ``(B, H, W)`` int64 in {0..C, ignore}.
    """
    maps = [torch.cat([torch.full_like(cams[:, :1], float(bg)), cams], 1) for bg in (bg_high, bg_low)]
    lab_h, lab_l = maps_to_par_label(par, img, maps, labels, True, down_scale, kernel)
    return combine_high_low(lab_h, lab_l, ignore)
