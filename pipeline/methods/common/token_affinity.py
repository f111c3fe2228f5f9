"""Token affinity: pairwise affinity labels from a label map at the token grid (AFA Sec. 3.3;
ToCo/MCC without a window) and the random walk of maps with a learned affinity (AFA Eq. 6-7).

Sources: AFA (Ru et al., CVPR 2022, ``shared/papers/afa-affinity-from-attention.txt``) Eq. 5
window (affinity labels) and Eq. 6-7 (propagation); the official AFA code (read as a
reference only, nothing copied) for the propagation details (digest
``shared/reference/official-settings.md``, "AFA (code facts)").

Conventions: label maps use 0 = background, ``c + 1`` = foreground class ``c``, ``ignore``
(255) = uncertain; affinity matrices are ``(B, h*w, h*w)`` in row-major token order.
"""
from __future__ import annotations

import torch


# ------------------------------------------------------------ affinity labels (AFA Sec. 3.3)


def radius_mask(h: int, w: int, radius: int | None) -> torch.Tensor:
    """Pairs of an ``h x w`` grid within a square window (Chebyshev distance <= radius).

    Vectorised (the official code loops over all pairs in Python).

    Returns:
        ``(h*w, h*w)`` bool, symmetric, True on the diagonal; all True if ``radius`` is None.
    Raises:
        ValueError: negative radius.
    """
    if radius is None:
        return torch.ones(h * w, h * w, dtype=torch.bool)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    ry = (torch.arange(h)[:, None] - torch.arange(h)[None, :]).abs() <= radius   # (h, h)
    rx = (torch.arange(w)[:, None] - torch.arange(w)[None, :]).abs() <= radius   # (w, w)
    # pair ((y1, x1), (y2, x2)) is inside iff rows and columns are: an outer AND (Kronecker)
    return (ry[:, None, :, None] & rx[None, :, None, :]).reshape(h * w, h * w)


def affinity_label_from_seg(seg_label: torch.Tensor, radius: int | None = None,
                            ignore: int = 255, ignore_diagonal: bool = True) -> torch.Tensor:
    """Pairwise affinity labels from a label map at the feature grid (AFA Sec. 3.3, "Pseudo
    Affinity Label Generation"; ToCo/MCC with ``radius=None``).

    Args:
        seg_label: ``(B, h, w)`` int labels (0 background, classes, ``ignore``), already at the
            token/feature grid (downsample with nearest interpolation first).
        radius: window radius in tokens (AFA 8); pairs farther apart (Chebyshev) are ignored;
            None = all pairs.
        ignore_diagonal: also ignore the pairs (i, i) (ToCo code; the AFA code keeps them).
    Returns:
        ``(B, h*w, h*w)`` int64: 1 same label, 0 different, ``ignore`` if either pixel is
        ``ignore``, out of the window, or (optionally) on the diagonal.
    """
    B, h, w = seg_label.shape
    flat = seg_label.reshape(B, -1)
    aff = (flat[:, :, None] == flat[:, None, :]).long()
    bad = (flat == ignore)
    aff[bad[:, :, None] | bad[:, None, :]] = ignore
    if radius is not None:
        aff[:, ~radius_mask(h, w, radius).to(seg_label.device)] = ignore
    if ignore_diagonal:
        i = torch.arange(h * w, device=seg_label.device)
        aff[:, i, i] = ignore
    return aff


# ------------------------------------------------------------- propagation (AFA Eq. 6, 7)


def transition_matrix(affinity: torch.Tensor, alpha: float = 2.0, mask: torch.Tensor | None = None,
                      eps: float = 0.0) -> torch.Tensor:
    """AFA Eq. 6: ``T = D^-1 A^α`` with ``D_ii = Σ_k A_ik^α`` (row-normalised).

    Args:
        affinity: ``(B, n, n)`` non-negative affinities (e.g. sigmoid of the AFA prediction).
        alpha: power α (paper 2).
        mask: optional ``(n, n)`` bool; pairs outside it get affinity 0 (official: radius 8).
        eps: added to ``D`` (paper 0; official code 0.1, which also damps weakly connected
            nodes).
    Returns:
        ``(B, n, n)``; rows sum to 1 (eps=0, at least one non-zero entry per row).
    """
    a = affinity.clamp_min(0) ** alpha
    if mask is not None:
        a = a * mask.to(a.dtype)
    return a / (a.sum(-1, keepdim=True) + eps).clamp_min(1e-12)


def propagate_affinity(cams: torch.Tensor, affinity: torch.Tensor, alpha: float = 2.0,
                       iters: int = 1, mask: torch.Tensor | None = None,
                       eps: float = 0.0) -> torch.Tensor:
    """Random walk of maps with the learned affinity, AFA Eq. 6-7: ``vec(M) <- T vec(M)``,
    applied ``iters`` times (paper and official code: once).

    For a symmetric A (AFA's ``S + S^T``) this equals the official ``cams @ (A / colsum)``.

    Args:
        cams: ``(B, K, h, w)`` maps (any channels, e.g. background-first).
        affinity: ``(B, h*w, h*w)`` non-negative.
        alpha, mask, eps: see :func:`transition_matrix`.
    Returns:
        ``(B, K, h, w)``.
    Raises:
        ValueError: ``h*w`` does not match the affinity size, or ``iters < 1``.
    """
    B, K, h, w = cams.shape
    if affinity.shape[-1] != h * w or affinity.shape[-2] != h * w:
        raise ValueError(f"propagate_affinity: maps {h}x{w} vs affinity {tuple(affinity.shape)}")
    if iters < 1:
        raise ValueError("propagate_affinity: iters must be >= 1")
    t = transition_matrix(affinity, alpha, mask, eps)
    m = cams.reshape(B, K, -1).transpose(1, 2)                      # (B, n, K)
    for _ in range(int(iters)):
        m = t @ m
    return m.transpose(1, 2).reshape(B, K, h, w)


def propagate_cams_with_bkg(cams: torch.Tensor, labels: torch.Tensor, affinity: torch.Tensor,
                            bg: float, alpha: float = 2.0, iters: int = 1,
                            mask: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """AFA's propagation of a CAM with a constant background (official
    ``propagte_aff_cam_with_bkg``): maps ``[bg; M]``, softmax over background + present
    classes, :func:`propagate_affinity`; absent classes stay 0.

    Args:
        cams: ``(B, C, h, w)`` normalised CAMs at the affinity grid.
        labels: ``(B, C)`` multi-hot.
        affinity: ``(B, h*w, h*w)``.
    Returns:
        ``(B, C + 1, h, w)`` background-first propagated maps.
    """
    full = torch.cat([torch.full_like(cams[:, :1], float(bg)), cams], 1)
    valid = torch.cat([torch.ones_like(labels[:, :1]), labels], 1)[:, :, None, None] > 0
    prob = full.masked_fill(~valid, float("-inf")).softmax(1).masked_fill(~valid, 0.0)
    return propagate_affinity(prob, affinity, alpha, iters, mask, eps) * valid
