"""Pixel-Adaptive Refinement (PAR, AFA Eq. 8-10) and its use on background-first maps, shared
by the single-stage transformer methods (AFA, MCC/ToCo).

Pure functions plus the stateless :class:`PAR` module, no global state. Sources:

* AFA: Ru et al., "Learning Affinity from Attention: End-to-End Weakly-Supervised Semantic
  Segmentation with Transformers", CVPR 2022 (``shared/papers/afa-affinity-from-attention.txt``)
  — Eq. 8-10 (PAR).
* The official AFA code (github.com/rulixiang/afa, read as a reference only, nothing copied):
  the 2x-downsampled PAR input, the replicate padding and the unbiased std over the
  neighbours (digest ``shared/reference/official-settings.md``, "AFA (code facts)").

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


# ------------------------------------------------- applying PAR to background-first maps


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
