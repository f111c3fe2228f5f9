"""Dense CRF energy loss on segmentation probabilities (L_reg of AFA Eq. 12 and of the MCC /
ToCo official training), shared by the single-stage plug-ins.

Source: Tang et al., ECCV 2018 ("On regularized losses for weakly-supervised CNN
segmentation", rloss), as the official code of AFA (``rulixiang/afa utils/losses.py:
get_energy_loss``, ``DenseEnergyLoss``) and MCC (``fwu11/MCC model/losses.py``, the same
functions; ``scripts/dist_train_voc_seg_neg.py``: ``DenseEnergyLoss(weight=1e-7,
sigma_rgb=15, sigma_xy=100, scale_factor=0.5)``, ``--w_reg 0.05``) call it:

1. image back to 0..255 RGB, softmax of the segmentation logits, a region-of-interest mask
   (the crop box) and the pseudo label; image, ROI and label resized by ``scale_factor``
   (nearest), the probabilities bilinearly (``align_corners=False``), ``sigma_xy`` scaled by
   ``scale_factor`` too;
2. ``S = probs * ROI``; the gate ``G = ROI - max_k probs`` per pixel, set to 1 where the label
   is 255 (unlabelled), clipped at 0;
3. ``AS = G * (W S)`` with the bilateral Gaussian ``W_ij = exp(-|p_i - p_j|^2 / 2 sigma_xy^2
   - |I_i - I_j|^2 / 2 sigma_rgb^2)`` per image and class;
4. loss ``= weight * (-sum S * AS) / B``; its backward is the official one, ``-2 weight AS / B
   * ROI`` into the probabilities (not the exact derivative of the forward value, since the
   gate is not symmetric: the official ``DenseEnergyLossFunction.backward``).

The one remaining difference: the official ``bilateralfilter`` is a compiled permutohedral
lattice (Adams et al. 2010), an approximation of the Gaussian sum; here ``W S`` is the exact
sum over all pixel pairs (self pair included, ``W_ii = 1``; weights below ``e^-70`` are
raised to it), computed in row blocks
(``O(n^2)`` time, ``O(block * n)`` memory; ``n`` = pixels after scaling). Not timed on a
GPU here; the official setting (a 448 crop at scale 0.5: 50k pixels, 2.5e9 pairs per image and
class) is far beyond a CPU, so the CPU profiles keep the scaled image small (demo: scale 0.25).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: rows of the pairwise block (block x n floats at a time)
BLOCK = 2048
#: kernel weights below exp(-FAR) (~4e-31) are raised to it (float32 subnormals start at e^-87)
FAR = 70.0


def bilateral_filter_dense(image: torch.Tensor, values: torch.Tensor, sigma_rgb: float,
                           sigma_xy: float, block: int = BLOCK) -> torch.Tensor:
    """Exact bilateral Gaussian sum ``out[b, k, i] = sum_j W_ij values[b, k, j]``.

    Args:
        image: ``(B, 3, H, W)`` float, in the units of ``sigma_rgb`` (0..255 for rloss).
        values: ``(B, K, H, W)`` float.
        sigma_rgb, sigma_xy: kernel widths (> 0; ``sigma_xy`` in pixels of ``image``).
        block: rows of ``W`` formed at a time.

    Returns:
        ``(B, K, H, W)`` float (dtype of ``values``).

    Raises:
        ValueError: shapes disagree or a sigma is not positive.
    """
    if image.dim() != 4 or values.dim() != 4 or image.shape[0] != values.shape[0] \
            or image.shape[2:] != values.shape[2:]:
        raise ValueError(f"image (B, 3, H, W) and values (B, K, H, W) must share B, H, W; got "
                         f"{tuple(image.shape)} and {tuple(values.shape)}")
    if sigma_rgb <= 0 or sigma_xy <= 0:
        raise ValueError(f"sigma_rgb and sigma_xy must be > 0, got {sigma_rgb}, {sigma_xy}")
    B, K, H, W = values.shape
    n = H * W
    dt, dev = values.dtype, values.device
    ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=dt) / sigma_xy,
                            torch.arange(W, device=dev, dtype=dt) / sigma_xy, indexing="ij")
    pos = [ys.reshape(n), xs.reshape(n)]                     # the same for every image
    col = (image.to(dt) / sigma_rgb).reshape(B, image.shape[1], n)
    v = values.reshape(B, K, n)
    out = torch.empty_like(v)
    for s in range(0, n, block):
        e = slice(s, min(n, s + block))
        d2 = sum((p[e, None] - p[None, :]).pow_(2) for p in pos)      # (block, n)
        d2 = d2.expand(B, -1, -1).clone()
        for c in range(col.shape[1]):             # broadcast differences (a batched matmul
            d2 += (col[:, c, e, None] - col[:, c, None, :]).pow_(2)   # over 5 dims is slower)
        # weights below e^-FAR are raised to e^-FAR (< 4e-31 per pair): float32 subnormals
        # make the matrix product ~50x slower on CPUs
        g = d2.mul_(-0.5).clamp_min_(-FAR).exp_()
        out[:, :, e] = torch.bmm(v, g.transpose(1, 2))   # (B, K, block)
    return out.reshape(B, K, H, W)


class _DenseEnergy(torch.autograd.Function):
    """rloss ``DenseEnergyLossFunction``: forward ``-sum S * G * (W S) / B``, backward the
    official ``-2 grad * G * (W S) / B * ROI`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, probs, image, roi, unlabelled, sigma_rgb, sigma_xy):
        B = probs.shape[0]
        gate = roi - probs.amax(1)
        gate = torch.where(unlabelled, torch.ones_like(gate), gate).clamp_min(0)[:, None]
        s = probs * roi[:, None]
        a_s = gate * bilateral_filter_dense(image, s, sigma_rgb, sigma_xy)
        ctx.save_for_backward(a_s, roi)
        ctx.batch = B
        return -(s * a_s).sum() / B

    @staticmethod
    def backward(ctx, grad):
        a_s, roi = ctx.saved_tensors
        return -2 * grad * a_s / ctx.batch * roi[:, None], None, None, None, None, None


def dense_energy_loss(image: torch.Tensor, probs: torch.Tensor, label: torch.Tensor,
                      roi: torch.Tensor | None = None, weight: float = 1e-7,
                      sigma_rgb: float = 15.0, sigma_xy: float = 100.0,
                      scale_factor: float = 0.5, ignore_index: int = 255) -> torch.Tensor:
    """rloss dense CRF energy of segmentation probabilities (official ``get_energy_loss`` /
    ``DenseEnergyLoss``; the module docstring lists the steps).

    Args:
        image: ``(B, 3, H, W)`` float RGB in 0..255.
        probs: ``(B, K, H, W)`` softmax probabilities (all classes, background included);
            gradients flow into them.
        label: ``(B, H, W)`` int pseudo label; ``ignore_index`` marks unlabelled pixels.
        roi: ``(B, H, W)`` {0, 1} mask of the valid image (the crop box); None = all ones.
        weight: rloss weight (official 1e-7; the plug-ins' loss weight multiplies the result).
        sigma_rgb, sigma_xy: kernel widths in 0..255 units and pixels of the unscaled image.
        scale_factor: resize before the energy (official 0.5).
        ignore_index: unlabelled value of ``label``.

    Returns:
        scalar float tensor (<= 0: a sum of products of non-negative terms, negated).

    Raises:
        ValueError: shapes disagree, a sigma is not positive or ``scale_factor <= 0``.
    """
    if probs.dim() != 4 or image.shape[0] != probs.shape[0] or image.shape[2:] != probs.shape[2:] \
            or label.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"image (B, 3, H, W), probs (B, K, H, W) and label (B, H, W) must "
                         f"agree; got {tuple(image.shape)}, {tuple(probs.shape)}, "
                         f"{tuple(label.shape)}")
    if scale_factor <= 0:
        raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
    if roi is None:
        roi = torch.ones_like(probs[:, 0])
    kw = dict(scale_factor=scale_factor, recompute_scale_factor=True)
    # the sums run over up to n^2 weights: at least float32, never under autocast (the
    # official filter runs in float32 on the CPU)
    dt = torch.promote_types(probs.dtype, torch.float32)
    with torch.autocast(probs.device.type, enabled=False):
        img = F.interpolate(image.to(dt), **kw)
        p = F.interpolate(probs.to(dt), mode="bilinear", align_corners=False, **kw)
        r = F.interpolate(roi[:, None].to(dt), **kw)[:, 0]
        lab = F.interpolate(label[:, None].float(), mode="nearest", **kw)[:, 0]
        unlabelled = lab.long() == ignore_index
        return weight * _DenseEnergy.apply(p, img, r, unlabelled, float(sigma_rgb),
                                           float(sigma_xy) * scale_factor)


def dense_energy_loss_from_params(image: torch.Tensor, probs: torch.Tensor, label: torch.Tensor,
                                  p: dict) -> torch.Tensor:
    """:func:`dense_energy_loss` with the plug-ins' ``train_cls`` keys (one place that reads
    them for AFA and MCC): ``reg_weight`` (default 1e-7), ``reg_sigma_rgb`` (15),
    ``reg_sigma_xy`` (100), ``reg_scale`` (0.5) — the official
    ``DenseEnergyLoss(weight=1e-7, sigma_rgb=15, sigma_xy=100, scale_factor=0.5)`` of
    ``rulixiang/afa scripts/dist_train_voc.py`` and ``fwu11/MCC scripts/dist_train_voc_seg_neg.py``.

    Args / Returns / Raises: as :func:`dense_energy_loss` (``image`` 0..255 RGB ``(B, 3, H, W)``,
    ``probs`` ``(B, K, H, W)``, ``label`` ``(B, H, W)``; a scalar float tensor <= 0).
    """
    return dense_energy_loss(image, probs, label,
                             weight=float(p.get("reg_weight", 1e-7)),
                             sigma_rgb=float(p.get("reg_sigma_rgb", 15.0)),
                             sigma_xy=float(p.get("reg_sigma_xy", 100.0)),
                             scale_factor=float(p.get("reg_scale", 0.5)))
