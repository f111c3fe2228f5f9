"""ViT-PCM's losses and label operations (supplementary Eq. 1; official deepplants/ViT-PCM
``model.py``: ``compute_mce_loss``, ``compute_cce_loss``, ``merge_class_labels``,
``merged_step``; ``utils.py``: ``affine_transform``, ``bbox_for_crop``) and the baseline
pseudo-mask. The method: :mod:`pipeline.methods.vitpcm`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.methods.common.tokens import inverse_token_permutation


def with_background(y_fg: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` multi-hot foreground labels -> ``(B, K+1)`` with ``t_0 = 1``."""
    return torch.cat([torch.ones_like(y_fg[:, :1]), y_fg], 1)


def mce_loss(y: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Eq. 1: mean over batch and the K+1 classes of ``BCE(t_k, y_k)``.

    Args:
        y: ``(B, K+1)`` pooled probabilities (Eq. 2); t: ``(B, K+1)`` targets in {0, 1}
            (background column included, see :func:`with_background`).
        eps: ``y`` is clipped to ``[eps, 1 - eps]`` (Keras' ``BinaryCrossentropy``, used by
            the official code).
    """
    y = y.clamp(eps, 1 - eps)
    return -(t * y.log() + (1 - t) * (1 - y).log()).mean()


def merge_class_labels(z: torch.Tensor, t: torch.Tensor, spatial_norm: bool = True,
                       eps: float = 1e-12) -> torch.Tensor:
    """Label-merged patch distributions (official ``merge_class_labels``).

    Args:
        z: ``(B, h, w, C)`` patch probabilities; t: ``(B, C)`` labels with background.
        spatial_norm: divide each class by its max over patches before renormalising.
    Returns:
        ``(B, h, w, C)``: absent classes 0, each patch renormalised to sum 1 (patches whose
        present-class mass is 0 stay 0, as TF's ``divide_no_nan``).
    """
    z = z * t[:, None, None, :]
    if spatial_norm:
        mx = z.flatten(1, 2).amax(1)[:, None, None, :]
        z = torch.where(mx > eps, z / mx.clamp_min(eps), torch.zeros_like(z))
    s = z.sum(-1, keepdim=True)
    return torch.where(s > eps, z / s.clamp_min(eps), torch.zeros_like(z))


def invert_patch_grid(z: torch.Tensor, t: str, grid: tuple[int, int]) -> torch.Tensor:
    """``f^{-1}`` of per-patch predictions of the view ``transform_image(x, t)``.

    Args:
        z: ``(B, h', w', C)`` predictions on the view's token grid.
        grid: ``(h, w)`` token grid of the original view (``h' x w' = h x w``; rot90/270
            swap the sides).
    Returns:
        ``(B, h, w, C)`` in the original geometry: ``out[:, r, c] = z`` at the view position
        showing original token ``(r, c)``.
    """
    h, w = grid
    inv = inverse_token_permutation(h, w, t)
    B, C = z.shape[0], z.shape[-1]
    return z.reshape(B, h * w, C)[:, inv].reshape(B, h, w, C)


def equivariance_loss(z1: torch.Tensor, z2: torch.Tensor, t_lab: torch.Tensor, transform: str,
                      spatial_norm: bool = True, eps: float = 1e-7) -> torch.Tensor:
    """Cross entropy between view-1 targets and the back-mapped view-2 predictions.

    ``L_eq = mean_{b, patch} - sum_c q_c log p_c`` with ``q = stopgrad(merge(z1, t))`` and
    ``p = f^{-1}(z2)`` (official ``compute_cce_loss``, with the inverse mapping applied to
    the view instead of the forward mapping to the target; CE per patch is invariant to
    that choice).

    Args:
        z1: ``(B, h, w, C)`` view-1 probabilities; z2: ``(B, h', w', C)`` view-2 ones.
        t_lab: ``(B, C)`` labels with background; transform: a ``SPATIAL_TRANSFORMS`` name.
    """
    return merged_cross_entropy(z1, invert_patch_grid(z2, transform, z1.shape[1:3]), t_lab,
                                spatial_norm, eps)


def merged_cross_entropy(target: torch.Tensor, pred: torch.Tensor, t_lab: torch.Tensor,
                         spatial_norm: bool = True, eps: float = 1e-7) -> torch.Tensor:
    """``mean_{b, patch} - sum_c q_c log clamp(p_c, eps, 1)`` with ``q =
    stopgrad(merge_class_labels(target, t_lab))`` (official ``compute_cce_loss``: Keras
    ``CategoricalCrossentropy`` against the label-merged, stop-gradient target).

    Args:
        target, pred: ``(B, h, w, C)`` patch probabilities on the same grid; t_lab: ``(B, C)``.
    """
    q = merge_class_labels(target.detach(), t_lab, spatial_norm)
    return -(q * pred.clamp(eps, 1.0).log()).sum(-1).mean()


#: forms of the equivariance views (:meth:`pipeline.methods.vitpcm.ViTPCM.loss`)
EQ_VIEWS = ("official", "batch")


def dihedral(a: torch.Tensor, code: tuple[bool, bool, bool], dims: tuple[int, int]) -> torch.Tensor:
    """Official ``apply_affine_transform_invertible``: left-right flip, then up-down flip, then
    transpose, each if its flag in ``code = (fliplr, flipud, transpose)`` is set.

    Args:
        a: any tensor; dims: its ``(row, column)`` dimensions (``(-2, -1)`` for
            ``(..., H, W)`` images, ``(0, 1)`` for ``(h, w, C)`` patch grids).
    """
    r, c = dims
    if code[0]:
        a = a.flip(c)
    if code[1]:
        a = a.flip(r)
    if code[2]:
        a = a.transpose(r, c)
    return a


def undo_dihedral(a: torch.Tensor, code: tuple[bool, bool, bool], dims: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`dihedral` (official ``revert_affine_transform``): transpose, then
    up-down flip, then left-right flip, each if its flag is set."""
    r, c = dims
    if code[2]:
        a = a.transpose(r, c)
    if code[1]:
        a = a.flip(r)
    if code[0]:
        a = a.flip(c)
    return a


def official_views(x: torch.Tensor, target: torch.Tensor, stride: int, crop: int, crop_p: float,
                   scale: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list]:
    """ViT-PCM's second view and its target (official ``dataloader.py``: ``affine_transform``
    with ``crop_size``/``scale_size``; ``model.py``: ``merged_step``, ``compute_cce_loss``).

    For each of the first ``4 * (B // 4)`` images, independently: with probability
    ``crop_p`` a ``crop x crop`` box whose corner is ``min(U{0, stride, ..., S}, S - crop)``
    per axis (``bbox_for_crop``), the image (or the box) resized to ``scale x scale``
    (bilinear, ``align_corners=True``: TF1 ``resize``), then the dihedral
    :func:`dihedral` with three fair coin flips. Four consecutive views are tiled into one
    ``2 scale x 2 scale`` mosaic (row-major: view ``4i + 2r + c`` at tile ``(r, c)``). The
    target is the view-1 patch distribution put through the same crop (in patches), resize
    (to ``scale / stride`` patches, bilinear, ``align_corners=True``) and dihedral.

    The code draws view 2 from the un-augmented image with its own colour jitter and
    dihedral, and un-flips view 1's predictions before mapping them: give ``x`` = that image
    (the dataset's ``base``) and ``target`` = view 1's distribution un-flipped to it
    (:func:`undo_dihedral`) - ``eq_view_source: base``, :meth:`pipeline.methods.vitpcm.ViTPCM.loss`.
    With ``x`` = view 1 itself (``eq_view_source: view1``, for profiles that crop view 1)
    view 2 carries view 1's colour jitter, and the crop corner's bias towards the last
    position lies along view 1's axes; the dihedral relative to view 1 is uniform either way.

    Args:
        x: ``(B, 3, S, S)`` images view 2 is made from, ``S`` a multiple of ``stride``.
        target: ``(B, S/stride, S/stride, C)`` patch distributions in ``x``'s frame (detached).
        crop, scale: pixels, multiples of ``stride``, ``crop <= S``.
        generator: draws of every coin, corner and flag (on ``x``'s device or CPU).
    Returns:
        ``(mosaics (B//4, 3, 2 scale, 2 scale), targets (4 (B//4), g, g, C) with
        g = scale / stride, draws)`` — ``draws``: per view ``(box or None, dihedral code)``,
        ``box = (y0, x0)`` in pixels.
    Raises:
        ValueError: fewer than 4 images, a non-square input, or sizes that are not multiples
            of the stride.
    """
    B, _, S, S2 = x.shape
    n = 4 * (B // 4)
    if n == 0 or S != S2 or S % stride or crop % stride or scale % stride or not 0 < crop <= S:
        raise ValueError(f"methods.vitpcm eq_views: official needs a batch of >= 4 square images and "
                         f"eq_crop / eq_scale multiples of the token stride {stride} (crop <= side); got "
                         f"batch {B}, {S}x{S2} px, eq_crop {crop}, eq_scale {scale}: set eq_views: batch, "
                         f"or batch_size / eq_crop / eq_scale accordingly")
    g = scale // stride
    views, targets, draws = [], [], []
    starts = torch.arange(0, S + 1, stride)
    for b in range(n):
        u = torch.rand(4, generator=generator)
        box = None
        img, tgt = x[b:b + 1], target[b:b + 1].permute(0, 3, 1, 2)
        if u[0] < crop_p:
            yx = starts[torch.randint(len(starts), (2,), generator=generator)].clamp(max=S - crop)
            box = (int(yx[0]), int(yx[1]))
            y0, x0 = box
            img = img[..., y0:y0 + crop, x0:x0 + crop]
            ty, tx, tc = y0 // stride, x0 // stride, crop // stride
            tgt = tgt[..., ty:ty + tc, tx:tx + tc]
        img = F.interpolate(img, size=(scale, scale), mode="bilinear", align_corners=True)
        tgt = F.interpolate(tgt, size=(g, g), mode="bilinear", align_corners=True)
        code = (bool(u[1] < 0.5), bool(u[2] < 0.5), bool(u[3] < 0.5))
        views.append(dihedral(img[0], code, (-2, -1)))
        targets.append(dihedral(tgt[0].permute(1, 2, 0), code, (0, 1)))
        draws.append((box, code))
    v = torch.stack(views).reshape(n // 4, 2, 2, 3, scale, scale)
    mosaics = v.permute(0, 3, 1, 4, 2, 5).reshape(n // 4, 3, 2 * scale, 2 * scale)
    return mosaics, torch.stack(targets), draws


def mosaic_tiles(z: torch.Tensor) -> torch.Tensor:
    """``(M, 2g, 2g, C)`` patch predictions of mosaics -> ``(4M, g, g, C)`` per tile, in the
    order :func:`official_views` tiled them (``extract_nonoverlapping_patches``)."""
    M, H, W, C = z.shape
    g = H // 2
    return z.reshape(M, 2, g, 2, g, C).permute(0, 1, 3, 2, 4, 5).reshape(4 * M, g, g, C)


def bpm(z: torch.Tensor, class_ids: torch.Tensor, spatial_norm: bool = False) -> torch.Tensor:
    """Baseline pseudo-mask of one image (paper Sec. 1: ``\\hat Y``).

    Args:
        z: ``(h, w, K+1)`` patch probabilities; class_ids: ``(k,)`` int64 VOC ids (1..K) of
            the present foreground classes.
        spatial_norm: official ``merge_class_labels`` normalisation before the argmax.
    Returns:
        ``(h, w)`` int64 labels in {0} + class_ids: argmax over background and the present
        classes (first index wins ties, i.e. background).
    """
    keep = torch.cat([torch.zeros(1, dtype=torch.long), class_ids.long().cpu()]).to(z.device)
    sel = z[..., keep]
    if spatial_norm:
        sel = sel / sel.flatten(0, 1).amax(0).clamp_min(1e-12)
    return keep[sel.argmax(-1)]
