"""Mix Transformer (MiT, SegFormer's encoder; Xie et al., NeurIPS 2021) as AFA's official code
builds it, on timm's PVTv2 implementation.

AFA (Ru et al., CVPR 2022) trains on MiT-B1: official ``wetr/mix_transformer.py`` (``mit_b1``:
embed dims 64/128/320/512, heads 1/2/5/8, depths 2/2/2/2, MLP ratio 4, spatial reduction
8/4/2/1, ``qkv_bias``, block norms ``LayerNorm(eps=1e-6)``, drop path 0.1) with the stage
strides of ``configs/voc_attn_reg.yaml`` (``backbone.stride: [4, 2, 2, 1]``: the last stage
keeps stride 16, so its attention is ``(h w) x (h w)`` at 1/16). That network is timm's
``PyramidVisionTransformerV2`` (PVTv2 and MiT share the overlapping patch embedding, the
spatial-reduction attention and the depth-wise-conv MLP; PVTv2-B1 differs from MiT-B1 only
in its MLP ratios 8/8/4/4), built here with MiT's arguments — no network code is written or
copied: :func:`create_mit` sets timm's arguments and the conv strides, and
:class:`CapturingSRAttention` re-runs timm's attention with timm's own sub-modules to keep
the attention that AFA's affinity head reads.

Pretrained weights: SegFormer's ImageNet-1k ``mit_b1.pth`` (the file the official code loads
from ``pretrained/``; download it from github.com/NVlabs/SegFormer, "ImageNet-1K
pre-trained weights") or a timm-format file of the same network; keys converted by timm's
``pvt_v2.checkpoint_filter_fn`` and loaded strictly (every tensor by name, shapes equal), the
classifier ``head.*`` dropped. There is no timm hub tag for MiT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn as nn

from pipeline.models.backbones import WeightsError

#: ``name -> (embed_dims, depths)`` of SegFormer's MiT-B0..B5 (official
#: ``wetr/mix_transformer.py``; all: heads 1/2/5/8, MLP ratio 4, sr 8/4/2/1).
MIT_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
#: AFA's ``backbone.stride`` (``configs/voc_attn_reg.yaml``); SegFormer's own is (4, 2, 2, 2)
AFA_STRIDES = (4, 2, 2, 1)
#: where :func:`create_mit`'s error points users for the official ImageNet weights
MIT_WEIGHTS_URL = "https://github.com/NVlabs/SegFormer#training (ImageNet-1K pre-trained mit_b*.pth)"


def is_mit(name: str) -> bool:
    """True for the MiT names of :data:`MIT_VARIANTS`."""
    return str(name) in MIT_VARIANTS


class CapturingSRAttention(nn.Module):
    """Wraps timm ``pvt_v2.Attention`` (spatial-reduction attention) and recomputes its forward
    with the wrapped module's own layers, keeping the attention of the last forward.

    With ``capture`` on: ``last_logits`` = the **unscaled** ``q kᵀ`` ``(B, heads, N, M)`` (the
    official ``attn_`` / ``attn_copy`` of ``wetr/mix_transformer.py: Attention.forward``, before
    ``* scale``; ``M = N / sr²``) and ``last_attn`` = ``softmax(q kᵀ · scale)``. Only
    ``sr_ratio`` 1 blocks give a square map (the official ``attn_copy`` average-pools the query
    side of the others, which AFA never reads). The output equals timm's forward up to float
    rounding (``(q kᵀ)·scale`` here, ``(q·scale) kᵀ`` or SDPA in timm).
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        if getattr(attn, "pool", None) is not None:
            raise ValueError("linear (pooled) PVTv2 attention is not MiT's")
        self.inner = attn
        self.capture = False
        self.last_logits: torch.Tensor | None = None
        self.last_attn: torch.Tensor | None = None

    @property
    def sr_ratio(self) -> int:
        """1 when keys and queries share the grid (no ``sr`` conv)."""
        return 1 if self.inner.sr is None else int(self.inner.sr.stride[0])

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        m = self.inner
        B, N, C = x.shape
        H, W = feat_size
        q = m.q(x).reshape(B, N, m.num_heads, -1).permute(0, 2, 1, 3)
        if m.sr is not None:
            x = m.norm(m.sr(x.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1))
        k, v = m.kv(x).reshape(B, -1, 2, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        logits = q @ k.transpose(-2, -1)
        attn = (logits * m.scale).softmax(dim=-1)
        self.last_logits = logits if self.capture else None
        self.last_attn = attn if self.capture else None
        out = (m.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        return m.proj_drop(m.proj(out))


def mit_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a :func:`create_mit` network in forward order (stage 1
    first); ``blocks[-1]`` is the last stage's last block."""
    return [b for s in model.stages for b in s.blocks]


def create_mit(name: str = "mit_b1", pretrained: str | None = None,
               strides: Sequence[int] = AFA_STRIDES, drop_path_rate: float = 0.1,
               overrides: dict | None = None) -> nn.Module:
    """MiT encoder ``name`` as AFA's official code builds it (module docstring).

    Args:
        name: a key of :data:`MIT_VARIANTS` (AFA: ``mit_b1``).
        pretrained: ``None`` / ``"none"`` (random init, timm's), or a local ``.pth`` / ``.pt``
            / ``.bin`` / ``.safetensors`` file in SegFormer's (official) or timm's key format.
        strides: the four stages' patch-embedding strides (official ``backbone.stride``;
            default (4, 2, 2, 1): output stride 16, the last stage at 1/16).
        drop_path_rate: stochastic depth, linear over all blocks (official 0.1).
        overrides: more ``PyramidVisionTransformerV2`` arguments (tests: smaller nets).
    Returns:
        timm ``PyramidVisionTransformerV2`` without classifier (``num_classes=0``); every
        block's ``attn`` a :class:`CapturingSRAttention` (capture off); ``forward_intermediates
        (x, intermediates_only=True)`` gives the four stage maps ``(B, C_i, H_i, W_i)``.
    Raises:
        ValueError: unknown ``name`` or not four strides.
        WeightsError: the weights file is missing, or its tensors do not fit by name / shape
            (the message names the file and the first keys).
    """
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    if not is_mit(name):
        raise ValueError(f"unknown MiT backbone {name!r}; one of {sorted(MIT_VARIANTS)}")
    strides = tuple(int(s) for s in strides)
    if len(strides) != 4 or min(strides) < 1:
        raise ValueError(f"MiT backbone.stride needs four strides >= 1, got {strides}")
    dims, depths = MIT_VARIANTS[name]
    kw: dict[str, Any] = dict(depths=depths, embed_dims=dims, num_heads=(1, 2, 5, 8),
                              sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4), qkv_bias=True,
                              drop_path_rate=float(drop_path_rate), num_classes=0)
    kw.update(overrides or {})
    model = PyramidVisionTransformerV2(**kw)
    embeds = [model.patch_embed] + [s.downsample for s in model.stages[1:]]
    for emb, s in zip(embeds, strides):      # padding = kernel // 2 at any stride (official)
        emb.proj.stride = (s, s)
    model.strides, model.mit_name = strides, name
    model.embed_dims = tuple(kw["embed_dims"])
    if pretrained not in (None, "", "none", False):
        load_mit_weights(model, pretrained)
    for b in mit_blocks(model):
        b.attn = CapturingSRAttention(b.attn)
    return model


def load_mit_weights(model: nn.Module, path: str | Path) -> None:
    """Load a SegFormer (official) or timm-format MiT checkpoint into ``model`` strictly.

    The official keys (``patch_embed1.proj``, ``block1.0.attn.kv``, ``block1.0.mlp.dwconv.
    dwconv``, ``norm1`` ...) are renamed by timm's ``pvt_v2.checkpoint_filter_fn``; a
    ``state_dict`` / ``model`` wrapper and the classifier ``head.*`` are dropped.

    Raises:
        WeightsError: no file, or keys / shapes that do not fit (names the file and the fix).
    """
    from timm.models.pvt_v2 import checkpoint_filter_fn
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise WeightsError(
            f"MiT weights file {p} does not exist. MiT has no timm hub weights: download "
            f"SegFormer's ImageNet-1k `{getattr(model, 'mit_name', 'mit_b1')}.pth` ({MIT_WEIGHTS_URL}), "
            f"place it at {p} (e.g. data/weights/mit_b1.pth), or set `pretrained: none`.")
    # timm reads .pth / .safetensors and unwraps a `state_dict` / `model` entry
    sd = timm.models.load_state_dict(str(p), use_ema=False, weights_only=True)
    sd = {k: v for k, v in checkpoint_filter_fn(dict(sd), model).items() if not k.startswith("head.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or extra or shape:
        raise WeightsError(
            f"MiT weights {p} do not fit the network ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(extra)} unexpected, e.g. {extra[:3]}; {len(shape)} of another "
            f"shape, e.g. {shape[:3]}): use SegFormer's ImageNet mit_b*.pth of the same "
            f"variant as backbone.name ({MIT_WEIGHTS_URL}).")
    model.load_state_dict(sd, strict=True)
