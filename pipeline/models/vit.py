"""timm Vision Transformers whose blocks expose their post-softmax attention.

ACR (Eq. 1, 2, 7, 8) needs every block's attention matrix ``A = softmax(QK^T/sqrt(d))``
*inside the autograd graph*. timm's ``Attention`` uses fused SDPA, which never materialises
``A``; :class:`CapturingAttention` wraps a timm ``Attention`` module and recomputes its
forward explicitly with the wrapped module's own weights, keeping ``A`` (all heads) in
``self.last_attn``. Nothing of timm is copied or vendored: the wrapper only calls the
submodules timm created (qkv, q/k norms, proj, ...).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.models.backbones import create_backbone


class CapturingAttention(nn.Module):
    """Drop-in replacement for ``timm.layers.Attention`` that records ``A``.

    After a forward, ``last_attn`` is the attention tensor ``(B, heads, N, N)``, float32,
    rows summing to 1 (before attention dropout), with ``N = 1 + n_prefix_extra + h*w``
    (class token first). It stays attached to the graph so losses and gradients can use it.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.inner = attn
        self.last_attn: torch.Tensor | None = None
        self.capture = True
        #: also keep the pre-softmax logits ``S = QK^T/sqrt(d)`` (+ mask) in ``last_logits``
        #: (AFA Eq. 1/3 use S); off by default
        self.capture_logits = False
        self.last_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        m = self.inner
        B, N, _C = x.shape
        gate = m.gate(x).sigmoid() if getattr(m, "gate", None) is not None else None
        qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = m.q_norm(q), m.k_norm(k)
        logits = (q * m.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            logits = logits + attn_mask
        attn = logits.softmax(dim=-1)
        self.last_attn = attn if self.capture else None
        self.last_logits = logits if self.capture_logits else None
        out = m.attn_drop(attn) @ v
        out = out.transpose(1, 2).reshape(B, N, -1)
        if getattr(m, "norm", None) is not None:
            out = m.norm(out)
        if gate is not None:
            out = out * gate
        return m.proj_drop(m.proj(out))


def create_vit(name: str, num_classes: int, pretrained: str | None = None,
               overrides: dict | None = None, stem: dict | None = None) -> nn.Module:
    """Create a timm ViT with attention capture on every block.

    Args:
        name: timm model name, e.g. ``vit_base_r50_s16_384`` (ACR paper, ViT-hybrid-B),
            ``deit_small_patch16_224`` (ACR Table 6), ``vit_tiny_patch16_224`` (CPU).
        num_classes: foreground classes (20 for VOC); the class-token head predicts them.
        pretrained: see :func:`pipeline.models.backbones.create_backbone` (of the ViT; with
            ``stem``, of the blocks only: ``none`` or a local file, loaded non-strictly).
        overrides: extra timm kwargs (``img_size``, ``patch_size``, ``embed_dim``, ``depth``,
            ``num_heads``...). ``dynamic_img_size=True`` is always set so multi-scale inputs
            interpolate the position embedding.
        stem: a hybrid ViT (:func:`hybrid_stem`): ``{name, pretrained, stride}`` of a timm CNN
            whose feature map at ``stride`` (default 16) replaces the patch embedding
            through timm's ``HybridEmbed`` (1x1 projection, ``patch_size`` 1), the shape of
            ACR's ViT-hybrid (ResNet-50 stem + ViT-B), e.g. ``{name: tf_efficientnet_lite0,
            pretrained: pypi:efficientnet-lite0}``.
    Returns:
        The timm model; ``model.blocks[i].attn`` is a :class:`CapturingAttention`.
    Raises:
        ValueError: the model has no ``blocks[*].attn`` (not a ViT), or the stem has no
            feature map at ``stride``.
    """
    kw = dict(overrides or {})
    kw.setdefault("dynamic_img_size", True)
    if stem:
        from functools import partial
        from timm.layers import HybridEmbed
        kw["embed_layer"] = partial(HybridEmbed, backbone=hybrid_stem(stem))
        kw["patch_size"] = 1     # every stem cell is one token (timm's hybrid default)
    model = create_backbone(name, pretrained, num_classes=num_classes, **kw)
    if not hasattr(model, "blocks") or not all(hasattr(b, "attn") for b in model.blocks):
        raise ValueError(f"timm model {name!r} is not a ViT with blocks[*].attn")
    for b in model.blocks:
        if not isinstance(b.attn, CapturingAttention):
            b.attn = CapturingAttention(b.attn)
    return model



def vit_from_params(backbone: dict, num_classes: int = 0) -> nn.Module:
    """:func:`create_vit` from a ``train_cls.backbone`` params section ``{name, pretrained,
    overrides, stem}`` (every key but ``name`` optional): the one reading of that section
    that every ViT plug-in shares, so none can drop a key (``stem`` once was)."""
    return create_vit(backbone["name"], num_classes, backbone.get("pretrained"),
                      backbone.get("overrides"), stem=backbone.get("stem"))

class _StemTo(nn.Module):
    """A timm CNN run up to its intermediate ``index`` (later stages pruned): ``x`` -> that
    feature map ``(B, C, h, w)``. ``freeze``: no gradients, BatchNorm in eval mode even under
    ``model.train()``, forward under ``torch.no_grad`` (a fixed pretrained feature extractor)."""

    def __init__(self, net: nn.Module, index: int, freeze: bool = False):
        super().__init__()
        net.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
        self.net, self.index, self.freeze = net, index, bool(freeze)
        if self.freeze:
            self.net.requires_grad_(False)
            self.net.eval()

    def train(self, mode: bool = True) -> "_StemTo":
        super().train(mode)
        if self.freeze:
            self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return self.net.forward_intermediates(x, indices=[self.index], intermediates_only=True)[-1]


def hybrid_stem(stem: dict) -> nn.Module:
    """The CNN stem of a hybrid ViT: timm ``stem["name"]`` with ``stem["pretrained"]`` weights
    (:func:`pipeline.models.backbones.create_backbone`) run up to its feature map whose
    reduction is ``stem["stride"]`` (default 16; EfficientNet-Lite0: ``blocks.4``, 112
    channels); later stages and the head are pruned (timm ``prune_intermediate_layers``).
    ``stem["freeze"]`` (default false): keep the stem fixed (no gradients, BatchNorm
    statistics of the weights; see :class:`_StemTo`), as the ``cam`` CNN's ``freeze``.
    ``stem["output_stride"]`` (default none): timm's ``output_stride`` — the stages past it
    dilated instead of strided — so that the *whole* trunk ends at ``stride``: with
    ``output_stride: 16`` and ``stride: 16``, EfficientNet-Lite0's last stage (``blocks.6``,
    320 channels) at 1/16 instead of its stride-16 intermediate ``blocks.4`` (112 channels).
    The last feature map of that reduction is taken.

    Raises:
        ValueError: no feature map of the network has that reduction.
    """
    stride = int(stem.get("stride", 16))
    kw = {"output_stride": int(stem["output_stride"])} if stem.get("output_stride") else {}
    net = create_backbone(stem["name"], stem.get("pretrained"), num_classes=0, **kw)
    red = [int(f["reduction"]) for f in net.feature_info]
    if stride not in red:
        raise ValueError(f"hybrid stem {stem['name']!r} has no feature map at stride {stride} "
                         f"(its strides: {red})")
    return _StemTo(net, len(red) - 1 - red[::-1].index(stride), freeze=stem.get("freeze", False))


def attentions(model: nn.Module) -> list[torch.Tensor]:
    """The attention tensors ``(B, heads, N, N)`` of the last forward, one per block."""
    out = [b.attn.last_attn for b in model.blocks]
    if any(a is None for a in out):
        raise RuntimeError("no attention captured: run a forward pass first")
    return out


def patch_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Token grid ``(h, w)`` for an input of ``height x width`` pixels (dynamic size, no padding)."""
    h, w = model.patch_embed.dynamic_feat_size((height, width))
    return int(h), int(w)


def token_stride(model: nn.Module) -> int:
    """Pixels per token side (16 for ViT-B/16 and the R50 hybrid)."""
    return int(model.patch_embed.feat_ratio())


def input_stride(classifier: nn.Module) -> int:
    """Pixels per map cell of a method's classifier: its ``input_stride`` (CNN trunks,
    :class:`pipeline.models.cnn_cam.CNNCAM`) or the token stride of its ``.vit``."""
    s = getattr(classifier, "input_stride", None)
    return int(s) if s is not None else token_stride(classifier.vit)


def num_prefix_tokens(model: nn.Module) -> int:
    """Number of tokens before the patch tokens (class token, registers)."""
    return int(getattr(model, "num_prefix_tokens", 1))


def patch_tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the ViT trunk and return ``(class_token (B, D), patch_tokens (B, n, D))``.

    Uses timm's ``forward_features`` (final norm applied).
    """
    feats = model.forward_features(x)
    npre = num_prefix_tokens(model)
    return feats[:, 0], feats[:, npre:]
