"""Token geometry of spatial transforms shared by the equivariance methods (ACR, ViT-PCM):
the token-permuting image transforms (flips, 90-degree rotations) and the inverse permutation
that maps a transformed view's tokens back to the original row-major token order.
"""
from __future__ import annotations

import torch

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
