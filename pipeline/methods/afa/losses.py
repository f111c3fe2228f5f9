"""AFA losses (Ru et al., CVPR 2022; package docstring of :mod:`pipeline.methods.afa`):
the affinity loss L_aff (Eq. 5; official ``get_aff_loss`` form and the paper's) and the
segmentation loss (the official code's balanced form, default, or the paper's cross-entropy).
L_reg (Eq. 12) is the dense CRF energy shared with MCC, :mod:`pipeline.methods.common.energy`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


AFF_LOSS_FORMS = ("code", "paper")


def affinity_loss_afa(aff_logits: torch.Tensor, aff_label: torch.Tensor,
                      form: str = "code") -> torch.Tensor:
    """AFA's affinity loss L_aff (paper Eq. 5; official ``utils/losses.py: get_aff_loss``).

    With ``s = σ(A)``, ``R+`` the pairs labelled 1 and ``R-`` those labelled 0:

    * ``form="code"`` (default, official ``get_aff_loss``, half of Eq. 5):
      ``½ Σ_{R+}(1 - s) / (N+ + 1) + ½ Σ_{R-} s / (N- + 1)`` — each term halved, and the
      official counts carry ``+ 1`` (so a term without pairs is 0, never a division by 0);
    * ``form="paper"`` (Eq. 5 as printed, this project's old default):
      ``Σ_{R+}(1 - s) / N+ + Σ_{R-} s / N-`` (a term without pairs is 0).

    Args:
        aff_logits: ``(B, n, n)`` float, predicted affinity A before the sigmoid (the
            official head applies the sigmoid inside the network; same thing).
        aff_label: ``(B, n, n)`` int, 1 positive, 0 negative, anything else (255) ignored.
        form: ``"code"`` | ``"paper"``.
    Returns:
        scalar float tensor; ``code`` in [0, 1), ``paper`` in [0, 2].
    Raises:
        ValueError: unknown ``form`` or shapes differ.
    """
    if form not in AFF_LOSS_FORMS:
        raise ValueError(f"methods.afa aff_loss must be one of {AFF_LOSS_FORMS}, got {form!r}")
    if aff_logits.shape != aff_label.shape:
        raise ValueError(f"affinity_loss_afa: logits {tuple(aff_logits.shape)} vs labels "
                         f"{tuple(aff_label.shape)}")
    s = torch.sigmoid(aff_logits)
    pos, neg = (aff_label == 1).to(s.dtype), (aff_label == 0).to(s.dtype)
    lp, ln = ((1 - s) * pos).sum(), (s * neg).sum()
    if form == "code":
        return 0.5 * lp / (pos.sum() + 1) + 0.5 * ln / (neg.sum() + 1)
    return lp / pos.sum().clamp_min(1) + ln / neg.sum().clamp_min(1)


def seg_loss(logits: torch.Tensor, label: torch.Tensor, mode: str = "balanced",
             ignore: int = 255) -> torch.Tensor:
    """AFA's segmentation loss on pseudo labels.

    * ``balanced`` (default, official ``utils/losses.py: get_seg_loss``, the same function in
      ``scripts/dist_train_voc.py``): ``(CE_bg + CE_fg) / 2`` with ``CE_bg`` over the
      background pixels (label 0) and ``CE_fg`` over the foreground ones, each ignoring
      ``ignore``; a part without pixels is 0 here (the official ``F.cross_entropy`` would
      give nan);
    * ``ce`` (paper: "commonly used cross-entropy"): one CE over all labelled pixels.

    Args:
        logits: ``(B, C+1, H, W)`` float; label: ``(B, H, W)`` int64 (0 background,
            ``ignore`` unlabelled).
    Returns:
        scalar >= 0; 0 (with a graph) if no pixel is labelled.
    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in ("ce", "balanced"):
        raise ValueError(f"methods.afa seg_loss must be ce or balanced, got {mode!r}")
    parts = [label] if mode == "ce" else [label.masked_fill(label != 0, ignore),
                                          label.masked_fill(label == 0, ignore)]
    terms = [F.cross_entropy(logits, lab, ignore_index=ignore) if bool((lab != ignore).any())
             else logits.sum() * 0 for lab in parts]
    return sum(terms) / len(terms)
