"""ACR: All-pairs Consistency Regularization (Sun et al., CVPR 2023,
``shared/papers/acr-all-pairs-consistency-regularization.txt``).

Training (Sec. 3.2): a Siamese ViT sees an image and a transformed view; for the chosen
blocks, the head-averaged post-softmax attention ``A`` of view 1 is compared with the
token-reordered attention ``f^{-1}(A')`` of view 2:

* Eq. 1  ``L_act = || A[0,1:] - f^{-1}(A'[0,1:]) ||_1``  (class-to-patch attention)
* Eq. 2  ``L_aff = || A[1:,1:] - f^{-1}(A'[1:,1:]) ||_1`` (patch-to-patch attention)
* Eq. 3-5 flips are token permutations, rotations a transpose (commutation matrix) plus a
  flip; resize is undone by resizing the token grids.
* Eq. 6  ``L = L_cls + alpha L_act + beta L_aff`` (L_cls on both views).

Seeds (Sec. 3.3):

* Eq. 7 (ACR*): ``M*_c = ReLU( mean_{i in layers} dy_c / dA_i[0,1:] )``;
* Eq. 8 (ACR):  ``M_c = M*_c x mean_{i in layers} A_i[1:,1:]``.

Choices where the paper is silent (all exposed in params.yaml, ``methods.acr``):

* ``reduction`` of the L1 norms: ``row`` (default) sums |.| over the keys of each attention
  row and averages over rows, layers and batch — Eq. 1/2's norm per attention row, which
  keeps both terms O(1) for any token count; ``sum`` is the literal matrix norm averaged
  over the batch; ``mean`` is the element mean.
* Multi-head attention is averaged over heads (the issue's "head-averaged"); for Eq. 7 the
  gradient w.r.t. each head's attention is averaged over heads.
* ReLU is applied after averaging the layers' gradients (``relu: after_mean``) or to each
  layer (``per_layer``).
* Eq. 8 is the row vector times the matrix as printed (``M_j = sum_i M*_i A[i, j]``);
  ``affinity_transpose: true`` uses ``A^T`` (MCTformer's ``A @ cam``).
* Resized views: the grid of ``A'`` is bilinearly resized and multiplied by ``n'/n`` along
  key dimensions so each row keeps its attention mass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.vit import attentions, num_prefix_tokens, patch_grid, token_stride
from .base import Method, ViTClassifier, multilabel_loss

SPATIAL_TRANSFORMS = ("hflip", "vflip", "rot90", "rot270")


def transform_image(x: torch.Tensor, t: str) -> torch.Tensor:
    """Apply a token-permuting transform to the last two (spatial) dims of ``x``.

    ``hflip``: reverse columns; ``vflip``: reverse rows; ``rot90``: ``torch.rot90(k=1)``
    (counter-clockwise; a transpose followed by a row flip, Eq. 4); ``rot270``: k=3.
    """
    if t == "hflip":
        return x.flip(-1)
    if t == "vflip":
        return x.flip(-2)
    if t == "rot90":
        return torch.rot90(x, 1, dims=(-2, -1))
    if t == "rot270":
        return torch.rot90(x, 3, dims=(-2, -1))
    raise ValueError(f"unknown ACR transform {t!r}; choose from {SPATIAL_TRANSFORMS} or 'rescale'")


def inverse_token_permutation(h: int, w: int, t: str) -> torch.Tensor:
    """Index ``inv`` (int64, ``(h*w,)``) with ``f^{-1}(a')[..., j] = a'[..., inv[j]]``.

    ``h, w`` is the token grid of the ORIGINAL view (row-major token order). The view's token
    at position ``p`` shows original token ``transform_image(arange(n).view(h, w))[p]``, so
    the inverse is the argsort of that grid.
    """
    idx = torch.arange(h * w).view(h, w)
    return torch.argsort(transform_image(idx, t).reshape(-1))


def invert_class_attention(a: torch.Tensor, t: str, grid: tuple[int, int],
                           view_grid: tuple[int, int]) -> torch.Tensor:
    """``f^{-1}`` of class-to-patch attention rows (Eq. 1, 5).

    Args:
        a: ``(B, n')`` attention of the view's class token to its patch tokens.
        t: a ``SPATIAL_TRANSFORMS`` name or ``"rescale"``.
        grid: token grid ``(h, w)`` of the original view; ``view_grid`` that of the view.
    Returns:
        ``(B, h*w)`` in the original token order.
    """
    h, w = grid
    if t == "rescale":
        hv, wv = view_grid
        r = F.interpolate(a.reshape(-1, 1, hv, wv), size=(h, w), mode="bilinear", align_corners=False)
        return r.reshape(a.shape[0], h * w) * (hv * wv) / (h * w)
    return a[:, inverse_token_permutation(h, w, t)]


def invert_patch_attention(A: torch.Tensor, t: str, grid: tuple[int, int],
                           view_grid: tuple[int, int]) -> torch.Tensor:
    """``f^{-1}`` of patch-to-patch attention (Eq. 2, 5): ``P^T A' P`` for permutations.

    Args:
        A: ``(B, n', n')`` (rows: queries, columns: keys).
    Returns:
        ``(B, h*w, h*w)`` in the original token order.
    """
    h, w = grid
    B = A.shape[0]
    if t == "rescale":
        hv, wv = view_grid
        # keys: (B*n', 1, hv, wv) -> (B, n', h*w), mass preserving
        k = F.interpolate(A.reshape(B * hv * wv, 1, hv, wv), size=(h, w), mode="bilinear",
                          align_corners=False).reshape(B, hv * wv, h * w) * (hv * wv) / (h * w)
        # queries: (B, h*w(keys), hv, wv) -> (B, h*w, h, w)
        q = F.interpolate(k.transpose(1, 2).reshape(B, h * w, hv, wv), size=(h, w),
                          mode="bilinear", align_corners=False)
        return q.reshape(B, h * w, h * w).transpose(1, 2)
    inv = inverse_token_permutation(h, w, t)
    return A[:, inv][:, :, inv]


def _l1(d: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``|d|`` of shape ``(B, rows, n)`` per the ACR ``reduction`` option."""
    a = d.abs()
    if reduction == "row":
        return a.sum(-1).mean()
    if reduction == "sum":
        return a.sum((-2, -1)).mean()
    if reduction == "mean":
        return a.mean()
    raise ValueError(f"methods.acr reduction must be row, sum or mean, got {reduction!r}")


def select_layers(n_blocks: int, layers) -> list[int]:
    """``"all"`` or a list of block indices (negative allowed) -> sorted positive indices."""
    if layers in (None, "all"):
        return list(range(n_blocks))
    out = sorted({int(i) % n_blocks for i in layers})
    if not out:
        raise ValueError("methods.acr layers must not be empty")
    return out


def consistency_losses(attn1: list[torch.Tensor], attn2: list[torch.Tensor], t: str,
                       grid: tuple[int, int], view_grid: tuple[int, int], npre: int = 1,
                       reduction: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_act, L_aff)`` of Eq. 1-2 averaged over the given blocks.

    Args:
        attn1, attn2: per block, ``(B, heads, N, N)`` attention of the original and of the
            transformed view (``N = npre + n``); heads are averaged here.
    """
    l_act, l_aff = [], []
    for A1, A2 in zip(attn1, attn2):
        a1, a2 = A1.mean(1), A2.mean(1)
        c1 = a1[:, 0, npre:]
        c2 = invert_class_attention(a2[:, 0, npre:], t, grid, view_grid)
        p1 = a1[:, npre:, npre:]
        p2 = invert_patch_attention(a2[:, npre:, npre:], t, grid, view_grid)
        l_act.append(_l1((c1 - c2).unsqueeze(1), reduction))
        l_aff.append(_l1(p1 - p2, reduction))
    return torch.stack(l_act).mean(), torch.stack(l_aff).mean()


class ACR(Method):
    name = "acr"
    seed_keys = ("cams", "cams_star")   # ACR (Eq. 8) is evaluated; ACR* (Eq. 7) kept too
    affinity_key = "cams_star"          # the paper trains PSA on ACR* ...
    refine_key = "cams"                 # ... and refines the ACR seeds with it (Sec. 4.2.2)

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        return ViTClassifier({**p, "head": "cls_token"}, num_classes)

    def loss(self, model, x, y, p, generator):
        """Eq. 6 on a batch and one randomly drawn transform (shared by the batch)."""
        choices = list(p.get("transforms", ["hflip", "rot90", "rescale"]))
        t = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        vit = model.vit
        stride = token_stride(vit)
        if t == "rescale":
            lo, hi = p.get("rescale_range", [0.5, 1.5])
            s = lo + (hi - lo) * float(torch.rand((), generator=generator))
            side = max(stride, int(round(x.shape[-1] * s / stride)) * stride)
            x2 = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        else:
            x2 = transform_image(x, t)
        logits1 = model(x)
        attn1 = attentions(vit)
        logits2 = model(x2)
        attn2 = attentions(vit)
        layers = select_layers(len(attn1), p.get("loss_layers", "all"))
        grid = patch_grid(vit, x.shape[-2], x.shape[-1])
        vgrid = patch_grid(vit, x2.shape[-2], x2.shape[-1])
        l_act, l_aff = consistency_losses([attn1[i] for i in layers], [attn2[i] for i in layers],
                                          t, grid, vgrid, num_prefix_tokens(vit),
                                          p.get("reduction", "row"))
        l_cls = 0.5 * (multilabel_loss(logits1, y) + multilabel_loss(logits2, y))
        loss = l_cls + float(p.get("alpha", 1.0)) * l_act + float(p.get("beta", 1.0)) * l_aff
        return loss, {"cls": l_cls.item(), "act": l_act.item(), "aff": l_aff.item()}

    def maps(self, model, x, fg, p):
        """Eq. 7 (``cams_star``) and Eq. 8 (``cams``) for the classes ``fg``."""
        return acr_maps(model, x, fg, layers=p.get("seed_layers", [-2, -1]),
                        relu=p.get("relu", "after_mean"),
                        affinity_transpose=bool(p.get("affinity_transpose", False)))


def acr_maps(model: nn.Module, x: torch.Tensor, fg: torch.Tensor, layers=(-2, -1),
             relu: str = "after_mean", affinity_transpose: bool = False) -> dict[str, torch.Tensor]:
    """Gradient-based class localisation maps of ACR (Eq. 7 and 8).

    Args:
        model: :class:`ViTClassifier` with a class-token head (attention captured).
        x: ``(1, 3, H, W)`` float32 image.
        fg: ``(k,)`` int64 0-based foreground class indices.
        layers: block indices ``l`` averaged (paper Fig. 8: the last two are best).
        relu: ``after_mean`` or ``per_layer``.
    Returns:
        ``{"cams_star": (k, h, w), "cams": (k, h, w)}`` float32, >= 0, at token resolution.
    """
    vit = model.vit
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        x = x.detach().requires_grad_(False)
        logits = model(x)                                   # (1, C)
        attn = attentions(vit)
        idx = select_layers(len(attn), layers)
        chosen = [attn[i] for i in idx]                     # (1, heads, N, N)
        npre = num_prefix_tokens(vit)
        h, w = patch_grid(vit, x.shape[-2], x.shape[-1])
        grads = []
        for c in fg.tolist():
            g = torch.autograd.grad(logits[0, c], chosen, retain_graph=True)
            per_layer = torch.stack([gi[0, :, 0, npre:].mean(0) for gi in g])  # (l, n)
            if relu == "per_layer":
                per_layer = per_layer.clamp_min(0)
            elif relu != "after_mean":
                raise ValueError(f"methods.acr relu must be after_mean or per_layer, got {relu!r}")
            grads.append(per_layer.mean(0).clamp_min(0))
        mstar = torch.stack(grads) if grads else torch.zeros(0, h * w)
        aff = torch.stack([a[0].mean(0)[npre:, npre:] for a in chosen]).mean(0).detach()  # (n, n)
        if affinity_transpose:
            aff = aff.t()
        m = mstar @ aff
    model.train(was_training)
    k = len(fg)
    return {"cams_star": mstar.detach().reshape(k, h, w), "cams": m.detach().reshape(k, h, w)}
