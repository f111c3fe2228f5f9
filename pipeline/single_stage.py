"""Building blocks of the single-stage transformer WSSS methods (AFA, MCC/ToCo), shared library.

Pure functions (plus the stateless :class:`PAR` module), no global state. Sources:

* AFA: Ru et al., "Learning Affinity from Attention: End-to-End Weakly-Supervised Semantic
  Segmentation with Transformers", CVPR 2022 (``shared/papers/afa-affinity-from-attention.txt``)
  — Eq. 4 (pseudo labels with two background scores), Eq. 5 window (affinity labels), Eq. 6-7
  (propagation), Eq. 8-10 (PAR).
* The official AFA code (github.com/rulixiang/afa, read as a reference only, nothing copied):
  the "high/low" combination of the two refined labels, the 2x-downsampled PAR input, the
  replicate padding and the unbiased std over the neighbours (digest
  ``shared/reference/official-settings.md``, "AFA (code facts)").

Conventions: ``C`` foreground classes (20 for VOC), label maps use 0 = background,
``c + 1`` = foreground class ``c`` (0-based channel ``c``), ``ignore`` (255) = uncertain.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# 8-neighbourhood offsets (dy, dx) in row-major order of a 3x3 window without its centre.
NEIGHBOURS_8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


# ------------------------------------------------------------------------------------ PAR

def dilated_neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Values of the 8 neighbours of every pixel at each dilation, replicate-padded.

    Args:
        x: ``(B, K, H, W)`` float.
        dilations: positive ints; neighbour ``(dy, dx) * d`` for every ``d`` and every
            offset of :data:`NEIGHBOURS_8`; outside the image the nearest border pixel is used
            (replicate padding, as the official code).
    Returns:
        ``(B, K, 8 * len(dilations), H, W)``; index ``8 * i + j`` = dilation ``i``, offset ``j``.
    """
    B, K, H, W = x.shape
    out = []
    for d in dilations:
        d = int(d)
        xp = F.pad(x, (d, d, d, d), mode="replicate")
        for dy, dx in NEIGHBOURS_8:
            out.append(xp[:, :, d + dy * d: d + dy * d + H, d + dx * d: d + dx * d + W])
    return torch.stack(out, 2)


def neighbour_distances(dilations: Sequence[int]) -> torch.Tensor:
    """Euclidean length ``|P_ij - P_kl|`` of each neighbour offset of :func:`dilated_neighbours`:
    ``(8 * len(dilations),)`` float32 (``d`` for axis neighbours, ``d * sqrt(2)`` diagonal)."""
    return torch.tensor([d * math.hypot(dy, dx) for d in dilations for dy, dx in NEIGHBOURS_8],
                        dtype=torch.float32)


class PAR(nn.Module):
    """Pixel-Adaptive Refinement, AFA Eq. 8-10.

    For every pixel ``i`` and its neighbours ``j`` (8-neighbours at each dilation):

    * Eq. 8  ``k_rgb(i, j) = -( |I_i - I_j| / (w1 σ_rgb(i)) )²`` and
      ``k_pos(i, j) = -( |P_i - P_j| / (w2 σ_pos) )²``;
    * Eq. 9  ``k(i, j) = softmax_j k_rgb + w3 softmax_j k_pos`` (softmax over the neighbours);
    * Eq. 10 ``M_t(i) = Σ_j k(i, j) M_{t-1}(j)``, ``num_iter`` times.

    Paper-silent details follow the official code: σ_rgb(i) is the per-channel unbiased std
    of the neighbours' colours (= std of the colour differences), the squared ratio is
    averaged over the colour channels; σ_pos is the std of the neighbour distances;
    replicate padding; the centre pixel is not a neighbour.

    Args:
        dilations: paper [1, 2, 4, 8, 12, 24].
        num_iter: paper 10.
        w1, w2, w3: paper (0.3, 0.3, 0.01).
        variant: ``"paper"`` — scale ``w2`` for the position kernel (Eq. 8); ``"code"`` — the
            official code's single scale ``w1`` for both kernels (identical when w1 == w2).
        eps: added to the std before dividing (official 1e-8).
    Raises:
        ValueError: unknown ``variant``, empty ``dilations`` or a non-positive dilation.
    """

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iter: int = 10,
                 w1: float = 0.3, w2: float = 0.3, w3: float = 0.01, variant: str = "paper",
                 eps: float = 1e-8):
        super().__init__()
        if variant not in ("paper", "code"):
            raise ValueError(f"par.variant must be paper or code, got {variant!r}")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"par.dilations must be positive ints, got {dilations!r}")
        self.dilations = [int(d) for d in dilations]
        self.num_iter = int(num_iter)
        self.w1, self.w2, self.w3 = float(w1), float(w2), float(w3)
        self.variant = variant
        self.eps = float(eps)
        self.register_buffer("dist", neighbour_distances(self.dilations), persistent=False)

    def kernel(self, img: torch.Tensor) -> torch.Tensor:
        """Eq. 9 kernel ``(B, 1, N, H, W)`` (N = 8 * len(dilations)), rows summing to 1 + w3.

        Args:
            img: ``(B, 3, H, W)`` float image (any scale: σ_rgb normalises it).
        """
        nb = dilated_neighbours(img, self.dilations)                        # (B, 3, N, H, W)
        diff = (nb - img.unsqueeze(2)).abs()
        std = nb.std(dim=2, keepdim=True)                                   # unbiased
        k_rgb = -((diff / (std + self.eps) / self.w1) ** 2).mean(1, keepdim=True)
        dist = self.dist.to(img.device, img.dtype)
        w_pos = self.w2 if self.variant == "paper" else self.w1
        k_pos = -((dist / (dist.std() + self.eps) / w_pos) ** 2)           # (N,)
        k_pos = k_pos.view(1, 1, -1, 1, 1)
        return F.softmax(k_rgb, dim=2) + self.w3 * F.softmax(k_pos, dim=2)

    def forward(self, img: torch.Tensor, masks: torch.Tensor,
                kernel: torch.Tensor | None = None) -> torch.Tensor:
        """Refine maps with the image's local appearance.

        Args:
            img: ``(B, 3, H, W)`` float image.
            masks: ``(B, K, h, w)`` float maps (CAMs, probabilities); bilinearly resized to
                ``(H, W)`` (align_corners=True, official) when the size differs.
            kernel: optional precomputed ``self.kernel(img)`` (reuse for several calls).
        Returns:
            ``(B, K, H, W)`` refined maps (same dtype as ``masks``).
        Raises:
            ValueError: batch sizes differ.
        """
        if img.shape[0] != masks.shape[0]:
            raise ValueError(f"PAR: image batch {img.shape[0]} != mask batch {masks.shape[0]}")
        if masks.shape[-2:] != img.shape[-2:]:
            masks = F.interpolate(masks, size=img.shape[-2:], mode="bilinear", align_corners=True)
        k = self.kernel(img.to(masks.dtype)) if kernel is None else kernel.to(masks.dtype)
        H, W = masks.shape[-2:]
        for _ in range(self.num_iter):
            # Σ_n k_n * neighbour_n without materialising the (B, K, N, H, W) stack
            acc = torch.zeros_like(masks)
            n = 0
            for d in self.dilations:
                xp = F.pad(masks, (d, d, d, d), mode="replicate")
                for dy, dx in NEIGHBOURS_8:
                    acc.addcmul_(k[:, :, n], xp[:, :, d + dy * d: d + dy * d + H, d + dx * d: d + dx * d + W])
                    n += 1
            masks = acc
        return masks


# ---------------------------------------------------------------- pseudo labels (AFA Eq. 4)

def cam_to_label(cams: torch.Tensor, labels: torch.Tensor, bg_high: float = 0.55,
                 bg_low: float = 0.35, ignore: int = 255) -> torch.Tensor:
    """Pseudo label with an uncertain band (AFA Eq. 4; ToCo/MCC use (0.7, 0.25)).

    ``v = max_c (y_c M_c)``: ``argmax + 1`` where ``v >= bg_high``, 0 where ``v <= bg_low``
    (background wins when the two overlap), ``ignore`` otherwise.

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
    out[v >= bg_high] = idx[v >= bg_high] + 1
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


def par_input(img: torch.Tensor, down_scale: int = 2) -> torch.Tensor:
    """The image PAR runs on: ``(B, 3, H // s, W // s)`` bilinear (official: s = 2)."""
    H, W = img.shape[-2:]
    if down_scale <= 1:
        return img
    return F.interpolate(img, size=(max(1, H // down_scale), max(1, W // down_scale)),
                         mode="bilinear", align_corners=False)


def maps_to_par_label(par: PAR, img: torch.Tensor, maps, labels: torch.Tensor,
                      softmax: bool, down_scale: int = 2, kernel: torch.Tensor | None = None):
    """Label from background-first maps refined by PAR on the image's valid channels.

    Per image: keep channel 0 (background) and the present classes, softmax over them if
    ``softmax`` (raw CAMs + constant background), PAR on the image downsampled by
    ``down_scale`` (bilinear), upsample to ``(H, W)`` (bilinear), argmax (official
    ``_refine_cams``).

    Batched: each image's valid channels are gathered into ``K_max`` slots (unused slots are
    0 before PAR and -inf before the argmax); several map sets of the same images (e.g. the
    two background scores) are concatenated along channels into ONE PAR call, so the Eq. 9
    kernel is computed once per image (PAR is linear and per channel).

    Args:
        img: ``(B, 3, H, W)`` float image (e.g. de-normalised to [0, 1]).
        maps: ``(B, C + 1, h, w)`` background-first maps, or a list of such tensors.
        labels: ``(B, C)`` multi-hot.
        kernel: optional ``par.kernel`` of the downsampled image (:func:`par_input`), reused.
    Returns:
        ``(B, H, W)`` int64 labels in {0..C} (a list of them if ``maps`` is a list).
    """
    single = torch.is_tensor(maps)
    maps_list = [maps] if single else list(maps)
    B, _, H, W = img.shape
    small = par_input(img, down_scale)
    valid = torch.cat([torch.ones_like(labels[:, :1]), labels], 1) > 0          # (B, C+1)
    kmax = int(valid.sum(1).max())
    # valid channel indices first (stable), padded with invalid ones
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :kmax]  # (B, kmax)
    ok = torch.gather(valid, 1, order)[:, :, None, None]                          # (B, kmax, 1, 1)
    slots = []
    for mp in maps_list:
        mp = F.interpolate(mp, size=small.shape[-2:], mode="bilinear", align_corners=False)
        m = torch.gather(mp, 1, order[:, :, None, None].expand(-1, -1, *mp.shape[-2:]))
        if softmax:
            m = m.masked_fill(~ok, float("-inf")).softmax(1)
        slots.append(m.masked_fill(~ok, 0.0))
    r = par(small, torch.cat(slots, 1), kernel)
    r = F.interpolate(r, size=(H, W), mode="bilinear", align_corners=False)
    out = []
    for i in range(len(maps_list)):
        ri = r[:, i * kmax:(i + 1) * kmax].masked_fill(~ok, float("-inf"))
        out.append(torch.gather(order, 1, ri.argmax(1).reshape(B, -1)).reshape(B, H, W))
    return out[0] if single else out


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


# ------------------------------------------------------------------- L_reg (AFA Eq. 12)

def local_consistency_loss(img: torch.Tensor, probs: torch.Tensor, sigma_rgb: float = 15.0,
                           sigma_xy: float = 100.0, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                           roi: torch.Tensor | None = None) -> torch.Tensor:
    """Local consistency of segmentation predictions, a pure-PyTorch stand-in for the dense
    CRF energy (Tang et al. ECCV 2018, "rloss") that AFA's L_reg uses (Eq. 12, refs [41, 53,
    54, 57]) through a compiled bilateral filter.

    Relaxed Potts energy on a sparse neighbourhood (the 8-neighbours of PAR's dilations):
    ``L = 1/P Σ_i Σ_{j ∈ N(i)} W_ij (1 - s_i · s_j)`` with the bilateral Gaussian
    ``W_ij = exp(-|p_i - p_j|² / 2σ_xy² - |I_i - I_j|² / 2σ_rgb²)``, over the pixels ``i`` in
    ``roi`` (P = their count); pairs leaving the image are dropped. Its gradient equals the
    dense energy's ``-s^T W s`` restricted to these pairs (up to the constant ``Σ W``).

    Args:
        img: ``(B, 3, H, W)`` float image in 0..255 (σ_rgb in those units).
        probs: ``(B, K, H, W)`` softmax probabilities (gradients flow into them).
        sigma_rgb, sigma_xy: rloss defaults 15 and 100 (pixels of ``img``).
        roi: optional ``(B, H, W)`` bool/float mask of pixels that count.
    Returns:
        scalar >= 0.
    """
    B, K, H, W = probs.shape
    total = probs.new_zeros(())
    valid_i = probs.new_ones(B, H, W) if roi is None else roi.to(probs.dtype)
    for d in dilations:
        d = int(d)
        for dy, dx in NEIGHBOURS_8:
            oy, ox = dy * d, dx * d
            # slices of i and j = i + (oy, ox), both inside the image
            yi = slice(max(0, -oy), H - max(0, oy))
            xi = slice(max(0, -ox), W - max(0, ox))
            yj = slice(max(0, oy), H - max(0, -oy))
            xj = slice(max(0, ox), W - max(0, -ox))
            if yi.start >= yi.stop or xi.start >= xi.stop:
                continue
            w_xy = math.exp(-(oy * oy + ox * ox) / (2 * sigma_xy ** 2))
            dc = ((img[:, :, yi, xi] - img[:, :, yj, xj]) ** 2).sum(1)
            wij = w_xy * torch.exp(-dc / (2 * sigma_rgb ** 2))
            agree = (probs[:, :, yi, xi] * probs[:, :, yj, xj]).sum(1)
            total = total + (wij * (1 - agree) * valid_i[:, yi, xi]).sum()
    return total / valid_i.sum().clamp_min(1)
