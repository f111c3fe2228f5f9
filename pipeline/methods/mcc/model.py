"""MCC network (Wu et al., 2023; package docstring of :mod:`pipeline.methods.mcc`): ViT
encoder with key-masked attention, GMP classifier + auxiliary classifier, LargeFOV decoder,
the projection heads with their EMA (MoCo) update, and the no-grad multi-scale training CAMs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.vit import num_prefix_tokens, patch_grid, vit_from_params

# ---------------------------------------------------------------------- EMA (MoCo update)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """``θ_g <- m θ_g + (1 - m) θ_l`` for every parameter (Sec. III-C, MoCo). Buffers are
    copied. Raises ValueError if the two modules' parameter shapes differ."""
    tp, sp = list(teacher.parameters()), list(student.parameters())
    if len(tp) != len(sp) or any(a.shape != b.shape for a, b in zip(tp, sp)):
        raise ValueError("EMA teacher and student projectors differ in structure")
    for t, s in zip(tp, sp):
        t.mul_(m).add_(s.detach(), alpha=1.0 - m)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


# ------------------------------------------------------------------------------- modules


class Projector(nn.Module):
    """Projection head for the contrast: MLP (``layers`` linear layers, GELU between,
    ``hidden`` wide, ending at ``bottleneck``), L2 normalisation, bias-free linear to ``out``.

    ``weight_norm: true`` (default) is the official head (``model/model_seg_neg.py:
    Projector``, DINO's with ``norm_last_layer=True``): the last linear layer is weight-
    normalised (torch's ``parametrizations.weight_norm``, ``dim=0``) with its gain fixed at 1
    and not trained, so each output unit's weight row has unit L2 norm and every output lies
    in [-1, 1]; it is built after the MLP's truncated-normal init, so its direction ``v`` keeps
    ``nn.Linear``'s default init, as there. ``false`` (previous form, not the code's): a plain
    linear layer, truncated-normal init like the MLP. The paper (Sec. III-C) says only "MLP".

    ``(..., in_dim) -> (..., out)`` float32. Raises ValueError for ``layers < 1``.
    """

    def __init__(self, in_dim: int, hidden: int = 2048, bottleneck: int = 256, out: int = 1024,
                 layers: int = 3, weight_norm: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError("methods.mcc proj_layers must be >= 1")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden), nn.GELU()]
            d = hidden
        mods.append(nn.Linear(d, bottleneck))
        self.mlp = nn.Sequential(*mods)
        if not weight_norm:   # previous form: built before the init loop, which re-inits it
            self.last = nn.Linear(bottleneck, out, bias=False)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        if weight_norm:       # official order: after the init loop, nn.Linear default init
            self.last = torch.nn.utils.parametrizations.weight_norm(
                nn.Linear(bottleneck, out, bias=False), dim=0)
            gain = self.last.parametrizations.weight.original0
            with torch.no_grad():
                gain.fill_(1.0)
            gain.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class LargeFOV(nn.Module):
    """Segmentation decoder of ToCo/MCC (DeepLab LargeFOV style): 3x3 conv (dilation d) ->
    ReLU -> 3x3 conv (dilation d) -> ReLU -> 1x1 conv to the classes.

    ``(B, in_ch, h, w) -> (B, num_classes, h, w)`` logits.
    """

    def __init__(self, in_ch: int, num_classes: int, channels: int = 512, dilation: int = 5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, channels, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MCCNet(nn.Module):
    """ViT encoder + GMP classifier + auxiliary classifier + LargeFOV decoder + projectors.

    ``num_classes`` foreground classes (20 for VOC); the decoder predicts ``num_classes + 1``
    (background first). ``proj`` is the local (student) projector, ``proj_ema`` the global
    one, updated only by :func:`ema_update` (no gradients).
    """

    def __init__(self, p: dict, num_classes: int):
        super().__init__()
        bb = p["backbone"]
        self.vit = vit_from_params(bb)
        depth = len(self.vit.blocks)
        self.aux_layer = int(p.get("aux_layer", -3)) % depth
        if self.aux_layer == depth - 1:
            raise ValueError(f"methods.mcc aux_layer must be an intermediate block, got the last "
                             f"({p.get('aux_layer')}) of {depth}")
        d = self.vit.num_features
        self.classifier = nn.Linear(d, num_classes, bias=False)
        self.aux_classifier = nn.Linear(d, num_classes, bias=False)
        self.decoder = LargeFOV(d, num_classes + 1, int(p.get("decoder_channels", 512)),
                                int(p.get("decoder_dilation", 5)))
        pk = dict(hidden=int(p.get("proj_hidden", 2048)), bottleneck=int(p.get("proj_bottleneck", 256)),
                  out=int(p.get("proj_dim", 1024)), layers=int(p.get("proj_layers", 3)),
                  weight_norm=bool(p.get("proj_weight_norm", True)))
        self.proj = Projector(d, **pk)
        self.proj_ema = Projector(d, **pk)
        self.proj_ema.load_state_dict(self.proj.state_dict())
        for q in self.proj_ema.parameters():
            q.requires_grad_(False)

    def tokens(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the encoder.

        Args:
            x: ``(B, 3, H, W)`` normalised images.
            attn_bias: optional additive attention bias broadcastable to ``(B, heads, N, N)``
                (e.g. :func:`pipeline.methods.mcc.losses.key_mask_bias`), applied in every block.
        Returns:
            ``(class token (B, D), final patch tokens (B, n, D) after the final norm,
            aux-block patch tokens (B, n, D))``.
        """
        v = self.vit
        t = v.patch_embed(x)
        t = v._pos_embed(t)
        t = v.patch_drop(t)
        t = v.norm_pre(t)
        npre = num_prefix_tokens(v)
        aux = None
        for i, blk in enumerate(v.blocks):
            t = blk(t, attn_mask=attn_bias)
            if i == self.aux_layer:
                aux = t[:, npre:]
        t = v.norm(t)
        return t[:, 0], t[:, npre:], aux

    def heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward: ``logits``/``logits_aux`` (B, C), ``feat``/``feat_aux`` (B, n, D),
        ``cls`` (B, D), ``seg`` (B, C+1, h, w) at the token grid, ``grid`` (h, w)."""
        cls, f, fa = self.tokens(x)
        h, w = patch_grid(self.vit, x.shape[-2], x.shape[-1])
        seg = self.decoder(f.transpose(1, 2).reshape(f.shape[0], -1, h, w))
        return {"logits": self.classifier(f.amax(1)), "logits_aux": self.aux_classifier(fa.amax(1)),
                "feat": f, "feat_aux": fa, "cls": cls, "seg": seg, "grid": (h, w)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> classification logits ``(B, C)`` (GMP of final tokens)."""
        _, f, _ = self.tokens(x)
        return self.classifier(f.amax(1))

    def cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CAMs ``W^T Z`` (Eq. 5) of all classes, before ReLU: ``(final, aux)``, each
        ``(B, C, h, w)`` at the token grid."""
        _, f, fa = self.tokens(x)
        h, w = patch_grid(self.vit, x.shape[-2], x.shape[-1])
        B = x.shape[0]
        cam = (f @ self.classifier.weight.t()).transpose(1, 2).reshape(B, -1, h, w)
        cam_aux = (fa @ self.aux_classifier.weight.t()).transpose(1, 2).reshape(B, -1, h, w)
        return cam, cam_aux


@torch.no_grad()
def train_time_cams(model: MCCNet, x: torch.Tensor, scales=(1.0,), flip: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale CAMs used as training targets (official ``multi_scale_cam``).

    Per scale: CAMs of the image and its flip, upsampled to ``(H, W)``, merged by element-wise
    max, ReLU; summed over scales; per image and class min-max normalised
    ``(M - min) / (max - min + 1e-5)``.

    Returns:
        ``(cam, cam_aux)``, each ``(B, C, H, W)`` float32 in [0, 1] (all classes; mask by the
        image labels before use).
    """
    from pipeline.engine.inference import OFFICIAL_MS_CAM, multiscale_flip

    def forward(inp: torch.Tensor) -> dict[str, torch.Tensor]:
        c, ca = model.cams(inp)
        return {"cam": c, "aux": ca}
    out = multiscale_flip(forward, x, scales, flips=(False, True) if flip else (False,),
                          flip_batch=True, **OFFICIAL_MS_CAM)
    return out["cam"], out["aux"]
