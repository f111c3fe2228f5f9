"""AFA network (Ru et al., CVPR 2022; package docstring of :mod:`pipeline.methods.afa`): an
encoder with captured attention, GMP classifier, the AFA affinity head (Eq. 3), the
SegFormer-style MLP decoder, and the no-grad forwards the training targets use (multi-scale
training CAMs, the affinity of one rescaled forward).

Two encoders, chosen by ``train_cls.backbone.name`` (:func:`build_afa_net`):

* a MiT name (``mit_b1``, the official code's: ``wetr/model_attn_aff.py`` on
  ``wetr/mix_transformer.py``) -> :class:`AFAMiTNet`: the four stages' maps feed the official
  ``SegFormerHead``, the classifier and the affinity head read the last stage (1/16);
* any timm ViT -> :class:`AFANet` (one token grid; the decoder reads ``seg_levels`` blocks).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.mit import create_mit, is_mit, mit_blocks
from pipeline.models.vit import num_prefix_tokens, patch_grid, vit_from_params

#: ``methods.afa.train_cls.aff_attention`` values (see :meth:`AFANet.affinity`)
AFF_ATTENTION = ("logits_unscaled", "logits", "softmax")


class MLPDecoder(nn.Module):
    """SegFormer-style all-MLP decoder (Xie et al. 2021, used by AFA) on ViT tokens: per level
    LayerNorm + linear to ``dim``; concatenation; 1x1 conv + BN + ReLU; dropout; 1x1 conv.

    ``[(B, n, D)] * L`` at one ``(h, w)`` grid -> ``(B, num_classes, h, w)`` logits.
    """

    def __init__(self, in_dim: int, levels: int, dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(in_dim) for _ in range(levels))
        self.proj = nn.ModuleList(nn.Linear(in_dim, dim) for _ in range(levels))
        self.fuse = nn.Sequential(nn.Conv2d(levels * dim, dim, 1, bias=False), nn.BatchNorm2d(dim),
                                  nn.ReLU(inplace=True), nn.Dropout2d(dropout))
        self.cls = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        xs = [p(n(f)).transpose(1, 2).reshape(f.shape[0], -1, h, w)
              for f, n, p in zip(feats, self.norms, self.proj)]
        return self.cls(self.fuse(torch.cat(xs, 1)))


class AFANet(nn.Module):
    """ViT encoder + GMP classifier + AFA affinity head + MLP segmentation decoder.

    ``num_classes`` foreground classes; the decoder predicts ``num_classes + 1`` (background
    first).
    """

    def __init__(self, p: dict, num_classes: int):
        super().__init__()
        bb = p["backbone"]
        self.vit = vit_from_params(bb)
        depth = len(self.vit.blocks)
        heads = self.vit.blocks[0].attn.inner.num_heads
        d = self.vit.num_features
        self.aff_layers = sorted({int(i) % depth for i in p.get("aff_layers", [-2, -1])})
        levels = p.get("seg_levels")
        if levels is None:                        # four evenly spaced blocks, like MiT's stages
            k = min(4, depth)
            levels = [round((i + 1) * depth / k) - 1 for i in range(k)]
        self.seg_levels = sorted({int(i) % depth for i in levels})
        self.aff_attention = p.get("aff_attention", "logits_unscaled")
        if self.aff_attention not in AFF_ATTENTION:
            raise ValueError(f"methods.afa aff_attention must be one of {AFF_ATTENTION}, "
                             f"got {self.aff_attention!r}")
        for i in self.aff_layers:
            self.vit.blocks[i].attn.capture_logits = self.aff_attention != "softmax"
        self.classifier = nn.Linear(d, num_classes, bias=False)
        self.aff_proj = nn.Linear(len(self.aff_layers) * heads, 1, bias=True)   # 1x1 conv (Eq. 3)
        self.decoder = MLPDecoder(d, len(self.seg_levels), int(p.get("decoder_dim", 256)),
                                  num_classes + 1, float(p.get("decoder_dropout", 0.1)))

    @property
    def npre(self) -> int:
        """Prefix tokens (class token, ...) before the patch tokens."""
        return num_prefix_tokens(self.vit)

    def run(self, x: torch.Tensor, with_heads: bool = True) -> dict:
        """One forward.

        Returns:
            ``feat`` (B, n, D) final patch tokens (final norm), ``grid`` (h, w), ``logits``
            (B, C) GMP classification, and with ``with_heads``: ``aff`` (B, n, n) affinity
            logits Â (Eq. 3, symmetric), ``seg`` (B, C+1, h, w) decoder logits.
        """
        v = self.vit
        t = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        npre = num_prefix_tokens(v)
        levels = []
        for i, blk in enumerate(v.blocks):
            t = blk(t)
            if i in self.seg_levels and i != len(v.blocks) - 1:
                levels.append(t[:, npre:])
        t = v.norm(t)
        f = t[:, npre:]
        grid = patch_grid(v, x.shape[-2], x.shape[-1])
        out = {"feat": f, "grid": grid, "logits": self.classifier(f.amax(1))}
        if with_heads:
            if len(v.blocks) - 1 in self.seg_levels:
                levels.append(f)
            out["seg"] = self.decoder(levels, grid)
            out["aff"] = self.affinity(npre)
        return out

    def affinity(self, npre: int) -> torch.Tensor:
        """Eq. 3 on the last forward's attention of the blocks ``aff_layers``.

        The per-head maps ``S`` stacked as channels are, by ``aff_attention``:

        * ``logits_unscaled`` (default, official code): ``q kᵀ`` without the ``1/√d`` —
          official ``wetr/mix_transformer.py``, ``Attention.forward``: ``attn_ = (q @
          k.transpose(-2, -1))`` is returned as ``attn_copy`` (the ``* self.scale`` is applied
          only inside the softmax), and ``wetr/model_attn_aff.py`` feeds ``attn_copy`` of the
          last two blocks to ``attn_proj``. Obtained here as the captured ``(q·scale) kᵀ``
          divided by the block's ``scale``: ``q kᵀ`` up to float rounding (none when
          ``scale`` is a power of two, e.g. head dim 64);
        * ``logits`` (the paper's Eq. 1 reading, old default): ``q kᵀ/√d``;
        * ``softmax``: the post-softmax attention.

        Args:
            npre: prefix tokens (class token, ...) to drop.
        Returns:
            ``(B, n, n)`` affinity logits Â (before the sigmoid), symmetric.
        Raises:
            RuntimeError: a block captured no attention (no forward ran).
        """
        s = []
        for i in self.aff_layers:
            a = self.vit.blocks[i].attn
            m = a.last_attn if self.aff_attention == "softmax" else a.last_logits
            if m is None:
                raise RuntimeError("AFA: no attention captured in block %d" % i)
            m = m[:, :, npre:, npre:]
            s.append(m / a.inner.scale if self.aff_attention == "logits_unscaled" else m)
        return affinity_head(s, self.aff_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> classification logits ``(B, C)``."""
        return self.run(x, with_heads=False)["logits"]

    def cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CAMs ``W^T F`` (B, C, h, w) before ReLU and the affinity logits (B, n, n)."""
        out = self.run(x)
        h, w = out["grid"]
        cam = (out["feat"] @ self.classifier.weight.t()).transpose(1, 2)
        return cam.reshape(x.shape[0], -1, h, w), out["aff"]


def affinity_head(maps: list[torch.Tensor], proj: nn.Linear) -> torch.Tensor:
    """Eq. 3 as official ``wetr/model_attn_aff.py``: the maps ``[(B, heads, n, n)] * L``
    concatenated as channels ``S``, ``S + Sᵀ``, one 1x1 conv ``proj`` (``L·heads -> 1``, with
    bias) -> ``(B, n, n)`` affinity logits Â (the sigmoid comes later), symmetric."""
    s = torch.cat(maps, 1)                                   # (B, L*heads, n, n)
    s = s + s.transpose(-1, -2)
    return torch.einsum("bknm,k->bnm", s, proj.weight[0]) + proj.bias[0]


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder as official ``wetr/segformer_head.py`` (AFA on MiT): per
    stage a linear layer to ``dim`` (no norm: the stage maps are normed by MiT), bilinearly
    upsampled (``align_corners=False``) to stage 1's grid, concatenated in the order
    ``c4, c3, c2, c1``, a bias-free 1x1 conv + BatchNorm + ReLU (mmcv ``ConvModule``),
    ``Dropout2d``, a 1x1 conv to the classes.

    ``[(B, C_i, H_i, W_i)] * 4`` -> ``(B, num_classes, H_1, W_1)`` logits (1/4 of the input).
    """

    def __init__(self, in_dims: Sequence[int], dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(int(c), dim) for c in in_dims)
        self.fuse = nn.Sequential(nn.Conv2d(len(in_dims) * dim, dim, 1, bias=False),
                                  nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        xs = [F.interpolate(p(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(
                  f.shape[0], -1, *f.shape[-2:]), size=size, mode="bilinear", align_corners=False)
              for f, p in zip(feats, self.proj)]
        return self.cls(self.dropout(self.fuse(torch.cat(xs[::-1], 1))))


class AFAMiTNet(nn.Module):
    """AFA on MiT as the official code (``wetr/model_attn_aff.py: WeTr``): MiT encoder at
    strides ``backbone.stride`` (:func:`pipeline.models.mit.create_mit`; official
    (4, 2, 2, 1)), GMP classifier (bias-free 1x1 conv) on the last stage, the affinity head
    on the unscaled ``q kᵀ`` of the blocks ``aff_layers`` (official ``_attns[-2:]``: the last
    stage's two blocks, 8 heads each = 16 channels; its ``attn_proj`` is initialised
    ``kaiming_normal_(a=√5, mode="fan_out")``, as here), :class:`SegFormerHead` on the four
    stages (``num_classes + 1`` outputs, background first) at 1/4.

    The same interface as :class:`AFANet` (``run``, ``affinity``, ``cams``, ``forward``);
    ``feat`` / ``grid`` are the last stage's, ``input_stride`` its stride (16), no prefix
    tokens. ``backbone: {name: mit_b1, pretrained: <file> | none, stride: [4, 2, 2, 1],
    drop_path_rate: 0.1, overrides: {}}``.

    Raises:
        ValueError: unknown ``aff_attention``, or an ``aff_layers`` block with spatial
            reduction (its attention is not square; the official code reads the last stage).
    """

    npre = 0

    def __init__(self, p: dict, num_classes: int):
        super().__init__()
        bb = p["backbone"]
        self.mit = create_mit(bb["name"], bb.get("pretrained"), bb.get("stride", (4, 2, 2, 1)),
                              float(bb.get("drop_path_rate", 0.1)), bb.get("overrides"))
        blocks = mit_blocks(self.mit)
        self.aff_layers = sorted({int(i) % len(blocks) for i in p.get("aff_layers", [-2, -1])})
        self.aff_attention = p.get("aff_attention", "logits_unscaled")
        if self.aff_attention not in AFF_ATTENTION:
            raise ValueError(f"methods.afa aff_attention must be one of {AFF_ATTENTION}, "
                             f"got {self.aff_attention!r}")
        heads = 0
        for i in self.aff_layers:
            a = blocks[i].attn
            if a.sr_ratio != 1:
                raise ValueError(f"methods.afa aff_layers: MiT block {i} has spatial reduction "
                                 f"{a.sr_ratio} (no square attention); use the last stage's blocks")
            a.capture = True
            heads += a.inner.num_heads
        dims = self.mit.embed_dims
        self.input_stride = int(torch.tensor(self.mit.strides).prod())
        self.classifier = nn.Linear(dims[-1], num_classes, bias=False)
        self.aff_proj = nn.Linear(heads, 1, bias=True)
        nn.init.kaiming_normal_(self.aff_proj.weight, a=5 ** 0.5, mode="fan_out")
        self.decoder = SegFormerHead(dims, int(p.get("decoder_dim", 256)), num_classes + 1,
                                     float(p.get("decoder_dropout", 0.1)))

    def run(self, x: torch.Tensor, with_heads: bool = True) -> dict:
        """One forward; returns as :meth:`AFANet.run` (``feat`` (B, n, D) = the last stage's
        map as tokens, ``grid`` its (h, w); ``seg`` at stage 1's grid, 1/4)."""
        feats = self.mit.forward_intermediates(x, intermediates_only=True)
        f4 = feats[-1]
        f = f4.flatten(2).transpose(1, 2)
        out = {"feat": f, "grid": tuple(f4.shape[-2:]), "logits": self.classifier(f.amax(1))}
        if with_heads:
            out["seg"] = self.decoder(feats)
            out["aff"] = self.affinity(0)
        return out

    def affinity(self, npre: int = 0) -> torch.Tensor:
        """Eq. 3 on the last forward's attention of ``aff_layers`` (see :meth:`AFANet.affinity`;
        the captured maps are the official unscaled ``q kᵀ`` itself).

        Raises:
            RuntimeError: a block captured no attention (no forward ran).
        """
        blocks = mit_blocks(self.mit)
        s = []
        for i in self.aff_layers:
            a = blocks[i].attn
            m = a.last_attn if self.aff_attention == "softmax" else a.last_logits
            if m is None:
                raise RuntimeError("AFA: no attention captured in block %d" % i)
            s.append(m * a.inner.scale if self.aff_attention == "logits" else m)
        return affinity_head(s, self.aff_proj)

    forward = AFANet.forward
    cams = AFANet.cams


def build_afa_net(p: dict, num_classes: int) -> nn.Module:
    """:class:`AFAMiTNet` for a MiT ``backbone.name`` (official), else :class:`AFANet`."""
    return (AFAMiTNet if is_mit(p["backbone"]["name"]) else AFANet)(p, num_classes)


def minmax(m: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per image and channel ``(M - min) / (max - min + eps)`` of ``(B, K, H, W)``."""
    mn = m.amin((2, 3), keepdim=True)
    mx = m.amax((2, 3), keepdim=True)
    return (m - mn) / (mx - mn + eps)


@torch.no_grad()
def train_time_cams(model: AFANet, x: torch.Tensor, scales=(1.0,), flip: bool = True,
                    with_affinity: bool = False):
    """Multi-scale training CAMs (official ``multi_scale_cam``): per scale the image and its
    flip, upsampled to ``(H, W)``, flip merged by max, ReLU; summed over scales; min-max.

    With ``with_affinity``, also the affinity logits of the largest scale's forward for the
    unflipped images, as official ``utils/camutils.py: multi_scale_cam_with_aff_mat`` keeps
    them (``aff_mat[np.argmax(scales)]``, the first largest scale): taken from that scale's
    concatenated image + flip forward itself, so no extra forward runs. (Until 2026-12-02 an
    extra no-grad forward of the unflipped images gave them: the same values up to float
    rounding, since attention never mixes the images of a batch.)

    Args:
        x: ``(B, 3, H, W)`` normalised images; scales: > 0, in order; flip: add the mirror.
    Returns:
        ``(B, C, H, W)`` float32 in [0, 1] (all classes; mask by the labels); with
        ``with_affinity``: ``(cams, aff (B, n, n) float logits Â (symmetric), (h, w) the token
        grid of that forward)``.
    Raises:
        ValueError: a scale ``<= 0`` or no scales.
    """
    from pipeline.engine.inference import OFFICIAL_MS_CAM, multiscale_flip

    scales = [float(s) for s in scales]
    if not scales or min(scales) <= 0:
        raise ValueError(f"methods.afa cam_scales must be > 0, got {scales}")
    largest = scales.index(max(scales))          # np.argmax: the first largest
    npre, B = model.npre, x.shape[0]
    calls, got = [0], {}

    def forward(inp: torch.Tensor) -> torch.Tensor:
        # one call per scale, in order (flip_batch, or no flip)
        out = model.run(inp, with_heads=False)
        if with_affinity and calls[0] == largest:
            got["aff"], got["grid"] = model.affinity(npre)[:B], out["grid"]   # unflipped first
        calls[0] += 1
        h, w = out["grid"]
        return (out["feat"] @ model.classifier.weight.t()).transpose(1, 2).reshape(inp.shape[0], -1, h, w)
    cams = multiscale_flip(forward, x, scales, flips=(False, True) if flip else (False,),
                           flip_batch=True, **OFFICIAL_MS_CAM)
    return (cams, got["aff"], got["grid"]) if with_affinity else cams
