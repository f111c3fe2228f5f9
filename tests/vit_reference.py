"""Tiny timm ViTs for the method tests, and independent references on them: the one tiny-ViT
backbone config (:func:`tiny_vit`), the tiny MCC / AFA network settings on it
(:func:`tiny_mcc`, :func:`tiny_afa`; tests/test_mcc.py, tests/test_afa.py,
tests/test_inference.py) and attention-gradient maps by central finite differences (no
autograd), shared by tests/test_acr.py (paper form of Eq. 7) and tests/test_acr_official.py
(official form)."""
from __future__ import annotations

import torch


def tiny_vit(patch: int = 8, dim: int = 24, depth: int = 3, heads: int = 2, img: int = 32) -> dict:
    """The ``backbone:`` params of a randomly initialised tiny ``vit_tiny_patch16_224``
    (``img`` px input, ``patch`` px patches, ``depth`` blocks of width ``dim``)."""
    return {"name": "vit_tiny_patch16_224", "pretrained": None,
            "overrides": {"img_size": img, "patch_size": patch, "embed_dim": dim, "depth": depth,
                          "num_heads": heads}}


def tiny_mcc() -> dict:
    """``methods.mcc.train_cls`` network settings of a tiny MCCNet (fresh dict): 4 px patches,
    width 16, 3 blocks, aux classifier on block -2, small decoder and projectors."""
    return {"backbone": tiny_vit(patch=4, dim=16, depth=3),
            "aux_layer": -2, "decoder_channels": 8, "proj_hidden": 16, "proj_bottleneck": 8,
            "proj_dim": 12, "proj_layers": 2}


def tiny_afa() -> dict:
    """``methods.afa.train_cls`` network settings of a tiny AFANet (fresh dict): 4 px patches,
    width 16, 3 blocks, affinity from the last two blocks, small decoder, PAR on dilations
    1, 2."""
    return {"backbone": tiny_vit(patch=4, dim=16, depth=3),
            "decoder_dim": 8, "aff_layers": [-2, -1],
            "par": {"dilations": [1, 2], "num_iter": 2}}


def fd_grad_per_head(model, x: torch.Tensor, block: int, c: int, eps: float = 1e-6) -> torch.Tensor:
    """``d y_c / d A_block[h, 0, 1 + j]`` for every head ``h`` and patch ``j``, float64
    ``(heads, n_patches)``, by central finite differences: the block's post-softmax attention
    gets ``+-eps`` at one entry of one head (recomputed explicitly as
    ``softmax(q k^T * scale) + delta``; no autograd). ``model`` is a float64
    ``ViTClassifier`` in eval mode, ``x`` one image ``(1, 3, H, W)``."""
    blk = model.vit.blocks[block].attn
    heads = blk.inner.num_heads
    n = model.vit.patch_embed.num_patches
    out = torch.zeros(heads, n, dtype=torch.float64)

    def patched(xx, attn_mask=None, **kw):
        m = blk.inner
        B, N, _ = xx.shape
        qkv = m.qkv(xx).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q * m.scale) @ k.transpose(-2, -1)).softmax(-1) + blk.delta
        blk.last_attn = a
        return m.proj((a @ v).transpose(1, 2).reshape(B, N, -1))

    saved = blk.forward
    blk.forward = patched
    try:
        for h in range(heads):
            for j in range(n):
                vals = []
                for s in (1, -1):
                    d = torch.zeros(1, heads, n + 1, n + 1, dtype=torch.float64)
                    d[0, h, 0, 1 + j] = s * eps
                    blk.delta = d
                    with torch.no_grad():
                        vals.append(float(model(x)[0, c]))
                out[h, j] = (vals[0] - vals[1]) / (2 * eps)
    finally:
        blk.forward = saved
    return out
