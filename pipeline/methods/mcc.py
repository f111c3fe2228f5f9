"""MCC: Masked Collaborative Contrast (Wu et al., 2023,
``shared/papers/mcc-masked-collaborative-contrast.txt``; official code github.com/fwu11/MCC,
read as a reference only).

One network, ToCo-style (Ru et al., CVPR 2023), trained end to end on image-level labels:

* encoder: a timm ViT/DeiT (:func:`pipeline.models.vit.create_vit`, attention captured);
* classifier: global max pooling (GMP) of the final patch tokens + bias-free 1x1 conv
  (a linear layer), multi-label soft-margin loss (Eq. 6) -> final CAM ``F = W^T Z^(L)`` (Eq. 5);
* auxiliary classifier on an intermediate block (``aux_layer``; paper: block 10 of 12, the
  official ``aux_layer=-3``) with its own GMP + 1x1 conv -> auxiliary CAM ``F_aux``;
* segmentation decoder (LargeFOV, as in ToCo/MCC) on the final patch tokens, trained on the
  PAR-refined pseudo labels of the final CAM (Sec. III-B);
* L_aff (Eq. 11-12): aux-CAM labels (β_fg=0.7 -> class, β_bg=0.25 -> background, 255 in
  between) give pairwise labels; ``1 - cos`` for equal-label pairs and ``cos`` for
  different-label pairs of the final patch tokens;
* MCC (Eq. 1-3, 8-10): ``n_local`` Bernoulli(p) key masks drawn on a grid ``scale`` times
  coarser than the token grid and upsampled into ``scale x scale`` squares; masked key
  columns get ``-inf`` before the softmax in every block (the class token is never masked),
  which yields local class tokens; a local view is positive when the mean discretised
  aux-CAM level (Eq. 9: 0 / 1 / 2) of its remaining tokens exceeds μ (Eq. 8); InfoNCE
  (Eq. 10, τ) between the projected global class token (EMA projector, momentum m) and
  the projected positive / negative local class tokens.
* total (Eq. 7): ``L_cls + L_cls^aux + w_seg L_seg + λ_a L_aff + λ_m L_mcc``.

Choices where the paper is silent, or where paper and official code differ (all exposed
under ``methods.mcc.train_cls`` in params.yaml). Policy (project issue 14): the official
code's behaviour is the default, the paper's literal reading an option; table:
``docs/methods/mcc.md``.

* The contrast (official ``model/losses.py: MCCLoss``, default ``info_nce: code``,
  ``global_positive: true``, ``normalize: false``): per image the InfoNCE terms of every
  positive view, plus ONE extra term ``-log(1 / (1 + Σ_neg e^{q k-/τ} + ε))`` (the ``for``
  loop's ``else`` branch, run once after the loop), summed over the teacher's global views,
  divided by (#global views x (#positives + 1e-4)), averaged over ALL images; the student's
  projections of the global view(s) count as positives (``flags[:, :2] = 1`` in
  ``utils/camutils.py: cam_to_attn_mask``; the official data feeds two augmented global
  views, here the one training view); the projector outputs are used raw (the DINO head's
  own bottleneck L2 norm stays). See :func:`info_nce_code`. Paper reading (old default):
  ``info_nce: paper``, ``global_positive: false``, ``normalize: true`` (:func:`info_nce`).

* ``mask_ratio`` 0.75 (paper text and Fig. 7); the official script uses 0.95.
* Local views are the training image itself under different key masks (paper, Fig. 1); the
  official code feeds a separately colour-jittered crop of it.
* The global class token is detached before the EMA ("global") projector (official code,
  MoCo's key branch); gradients reach the encoder through the local class tokens.
* ``normalize: true`` (option): projected q and k are L2-normalised, so ``q k / τ`` is a
  cosine over τ (MoCo; Eq. 10 does not say). The official DINO-style head ends in a
  weight-normalised linear layer whose raw outputs are multiplied (``normalize: false``,
  default).
* ``info_nce: paper`` (option): Eq. 10 per image, averaged over the images with at least one
  positive; an image without positives contributes nothing (a sum over an empty set).
* L_aff: Eq. 12 as printed (``cos``, weights 1, diagonal pairs ignored, all pairs of the
  image); the official code uses ``|cos|`` (``abs_cos: true``) and halves both terms.
* w_seg = 0.1 and the segmentation loss starts at ``seg_start_iter`` (official code:
  iteration 2,000); Eq. 7 prints the segmentation loss unweighted. No L_reg (Eq. 7 has none;
  the official code adds a compiled dense-CRF energy loss with weight 0.05).
* Training-time CAMs (for the masks' positives and the segmentation labels) are computed
  without gradients over ``cam_scales`` + flip, ReLU, summed, min-max normalised per class
  (official ``multi_scale_cam``); ``mask_cam_switch_iter`` (official: 12,000; paper:
  never, null) switches Eq. 9 from the aux CAM to the final CAM.
* Padding of the random crops is not excluded from the pseudo labels (the dataset here does
  not return the crop box).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models.vit import create_vit, num_prefix_tokens, patch_grid
from .base import Method, multilabel_loss
from .common.cam_labels import cam_to_label, refine_cams_with_bkg
from .common.par import PAR
from .common.token_affinity import affinity_label_from_seg

# ----------------------------------------------------------------------------- masks (Eq. 1-3)


def draw_key_masks(n: int, h: int, w: int, ratio: float, scale: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Random key masks of MCC (Sec. III-C, "Random Masking with Keys / with Scales").

    Each cell of a grid ``ceil(h/scale) x ceil(w/scale)`` is masked independently with
    probability ``ratio`` (Bernoulli), then upsampled by ``scale`` (nearest) so a masked cell
    becomes a contiguous ``scale x scale`` square of tokens, and cropped to ``h x w``.

    Args:
        n: number of masks.
        h, w: token grid.
        ratio: masking probability p in [0, 1] (paper 0.75).
        scale: cell side in tokens (paper 4).
        generator: torch Generator on CPU (determinism).
    Returns:
        ``(n, h, w)`` bool, True = masked key.
    Raises:
        ValueError: ``ratio`` outside [0, 1] or ``scale < 1``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"methods.mcc mask_ratio must be in [0, 1], got {ratio}")
    if scale < 1:
        raise ValueError(f"methods.mcc mask_scale must be >= 1, got {scale}")
    gh, gw = math.ceil(h / scale), math.ceil(w / scale)
    coarse = torch.rand((n, gh, gw), generator=generator) < ratio
    full = coarse.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return full[:, :h, :w].contiguous()


def key_mask_bias(masks: torch.Tensor, npre: int = 1) -> torch.Tensor:
    """Additive attention bias M' of Eq. 3 for key masks.

    Args:
        masks: ``(n, h, w)`` bool, True = masked key.
        npre: prefix tokens (class token, registers) placed before the patch tokens; they are
            never masked.
    Returns:
        ``(n, 1, 1, npre + h*w)`` float32: 0 for kept keys, ``-inf`` for masked ones. Added to
        the ``(n, heads, N, N)`` attention logits it drops whole key columns for every query.
    """
    flat = masks.reshape(masks.shape[0], -1)
    bias = torch.zeros(flat.shape[0], npre + flat.shape[1], dtype=torch.float32, device=masks.device)
    bias[:, npre:][flat] = float("-inf")
    return bias[:, None, None, :]


# ----------------------------------------------------------------- positives (Eq. 8, 9)


def discretise_levels(cam_max: torch.Tensor, bg: float, fg: float) -> torch.Tensor:
    """Eq. 9: token-level label ``Y'`` from ``max_c F_aux`` (values in [0, 1]).

    Returns:
        same shape, int64: 2 where ``>= fg``, 0 where ``<= bg``, 1 otherwise.
    """
    out = torch.ones_like(cam_max, dtype=torch.long)
    out[cam_max >= fg] = 2
    out[cam_max <= bg] = 0
    return out


def positive_flags(levels: torch.Tensor, masks: torch.Tensor, mu: float) -> torch.Tensor:
    """Eq. 8: a masked view is positive iff ``Σ Y' (1 - M) > μ Σ (1 - M)``.

    (The paper's ``1/N`` on both sides cancels.) A view with every token masked is negative.

    Args:
        levels: ``(B, h, w)`` int, Eq. 9 levels in {0, 1, 2}.
        masks: ``(B, L, h, w)`` bool, True = masked.
        mu: threshold μ (paper 0.2).
    Returns:
        ``(B, L)`` bool.
    """
    keep = (~masks).float()
    lhs = (levels[:, None].float() * keep).flatten(2).sum(-1)
    rhs = mu * keep.flatten(2).sum(-1)
    return lhs > rhs


# ------------------------------------------------------------------------ InfoNCE (Eq. 10)


def info_nce(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, tau: float,
             eps: float = 1e-4) -> torch.Tensor:
    """Eq. 10, averaged over the images that have at least one positive.

    ``L_b = -1/N+ Σ_{k+} log( e^{q k+/τ} / (e^{q k+/τ} + Σ_{k-} e^{q k-/τ} + ε) )``

    Args:
        q: ``(B, d)`` projected global class tokens.
        k: ``(B, L, d)`` projected local class tokens.
        pos: ``(B, L)`` bool, positive flags (Eq. 8); the others are negatives.
        tau: temperature τ (paper 0.5).
        eps: ε of Eq. 10.
    Returns:
        scalar; 0 (with a graph) when no image has a positive.
    """
    logits = torch.einsum("bd,bld->bl", q, k) / tau            # (B, L)
    e = logits.exp()
    neg = (e * (~pos).float()).sum(1, keepdim=True)             # (B, 1)
    per = -(logits - torch.log(e + neg + eps))                  # (B, L) -log(e+/(e+ + neg + eps))
    posf = pos.float()
    n_pos = posf.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return (logits * 0).sum()
    per_img = (per * posf).sum(1)[has] / n_pos[has]
    return per_img.mean()


INFO_NCE_FORMS = ("code", "paper")


def info_nce_code(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, tau: float,
                  eps: float = 1e-4) -> torch.Tensor:
    """The contrast as the official ``model/losses.py: MCCLoss.forward`` computes it.

    With ``e_{g,j} = exp(q_g · k_j / τ)`` (teacher view ``g``, student view ``j``) and, per
    image and teacher view, ``S_g = Σ_{j negative} e_{g,j}``::

        L_b = 1/(G (P_b + 1e-4)) Σ_g [ Σ_{j positive} -log(e_{g,j} / (e_{g,j} + S_g + ε))
                                        - log(1 / (1 + S_g + ε)) ]
        L   = 1/B Σ_b L_b

    The extra ``-log(1/(1 + S_g + ε))`` is added ONCE per image and teacher view (the
    ``for ... else`` of the official loop; ``P_b`` still counts only the positives). Every
    image counts in the mean, also one without positives — then ``L_b`` is the extra term
    over ``G·1e-4`` (large), which the official code never meets because the global views
    are always positive (pass them in ``k`` with ``pos`` True: ``global_positive``).

    Args:
        q: ``(B, G, d)`` float, teacher projections of the G global views (official G = 2;
            here 1), or ``(B, d)`` for G = 1. Raw (not re-normalised) in the official code.
        k: ``(B, L, d)`` float, student projections (official: the G global views first,
            then the local views).
        pos: ``(B, L)`` bool, positive flags; the others are negatives.
        tau: temperature τ > 0 (official ``--temp`` 0.5).
        eps: ε of the official code, 1e-4 (both in the log terms and next to ``P_b``).
    Returns:
        scalar float tensor >= 0.
    Raises:
        ValueError: shapes do not match or ``tau <= 0``.
    """
    if q.dim() == 2:
        q = q[:, None]
    if tau <= 0:
        raise ValueError(f"methods.mcc tau must be > 0, got {tau}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or pos.shape != k.shape[:2]:
        raise ValueError(f"info_nce_code: q {tuple(q.shape)}, k {tuple(k.shape)}, pos {tuple(pos.shape)}")
    G = q.shape[1]
    logits = torch.einsum("bgd,bld->bgl", q, k) / tau              # (B, G, L)
    e = logits.exp()
    posf = pos.to(e.dtype)[:, None]                                 # (B, 1, L)
    neg = (e * (1 - posf)).sum(-1, keepdim=True)                    # (B, G, 1) S_g
    per = -(logits - torch.log(e + neg + eps))                      # -log(e / (e + S + eps))
    extra = torch.log(1 + neg[..., 0] + eps)                        # (B, G) -log(1/(1+S+eps))
    per_img = ((per * posf).sum(-1) + extra).sum(-1) / G / (pos.to(e.dtype).sum(-1) + 1e-4)
    return per_img.mean()


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


# ------------------------------------------------------------------------ L_aff (Eq. 12)


def affinity_loss(tokens: torch.Tensor, aff: torch.Tensor, abs_cos: bool = False) -> torch.Tensor:
    """Eq. 12 over final patch tokens.

    Args:
        tokens: ``(B, n, D)`` final patch tokens ``T^(L)``.
        aff: ``(B, n, n)`` pair labels: 1 = same label (positive), 0 = different (negative),
            any other value (255) = ignored.
        abs_cos: use ``|cos|`` (official code) instead of ``cos`` (paper).
    Returns:
        scalar ``Σ_pos (1 - cos)/N+ + Σ_neg cos/N-`` (a term is 0 when it has no pairs).
    """
    t = F.normalize(tokens, dim=-1, eps=1e-8)
    cos = t @ t.transpose(1, 2)
    if abs_cos:
        cos = cos.abs()
    posm, negm = (aff == 1).float(), (aff == 0).float()
    lp = ((1 - cos) * posm).sum() / posm.sum().clamp_min(1)
    ln = (cos * negm).sum() / negm.sum().clamp_min(1)
    return lp + ln


# ------------------------------------------------------------------------------- modules


class Projector(nn.Module):
    """Projection head for the contrast: MLP (``layers`` linear layers, GELU between,
    ``hidden`` wide, ending at ``bottleneck``), L2 normalisation, bias-free linear to ``out``
    (the shape of the official DINO-style head, without weight normalisation).

    ``(..., in_dim) -> (..., out)`` float32.
    """

    def __init__(self, in_dim: int, hidden: int = 2048, bottleneck: int = 256, out: int = 1024,
                 layers: int = 3):
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
        self.last = nn.Linear(bottleneck, out, bias=False)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

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
        self.vit = create_vit(bb["name"], 0, bb.get("pretrained"), bb.get("overrides"))
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
                  out=int(p.get("proj_dim", 1024)), layers=int(p.get("proj_layers", 3)))
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
                (e.g. :func:`key_mask_bias`), applied in every block.
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
    from ..inference import OFFICIAL_MS_CAM, multiscale_flip

    def forward(inp: torch.Tensor) -> dict[str, torch.Tensor]:
        c, ca = model.cams(inp)
        return {"cam": c, "aux": ca}
    out = multiscale_flip(forward, x, scales, flips=(False, True) if flip else (False,),
                          flip_batch=True, **OFFICIAL_MS_CAM)
    return out["cam"], out["aux"]


# ------------------------------------------------------------------------------ the plug-in


def seg_loss_balanced(logits: torch.Tensor, label: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """Segmentation loss of ToCo/MCC's code: mean of the cross-entropy over background pixels
    and the cross-entropy over foreground pixels (each ignoring 255), so the usually larger
    background does not dominate. ``logits (B, C+1, H, W)``, ``label (B, H, W)`` int64."""
    bg = label.clone()
    bg[label != 0] = ignore
    fg = label.clone()
    fg[label == 0] = ignore
    terms = []
    for lab in (bg, fg):
        if bool((lab != ignore).any()):
            terms.append(F.cross_entropy(logits, lab, ignore_index=ignore))
        else:
            terms.append(logits.sum() * 0)
    return 0.5 * (terms[0] + terms[1])


class MCC(Method):
    """MCC plug-in: :class:`MCCNet`, the loss of Eq. 7, final + auxiliary CAM seeds and the
    decoder's own segmentation. See the module docstring for the paper/code choices."""

    name = "mcc"
    seed_keys = ("cams", "cams_aux")   # final CAM evaluated; the aux CAM kept for inspection
    seed_merge = {"ms_flip_merge": "max", "ms_relu": "after_flip_merge"}   # official multi_scale_cam
    affinity_key = "cams"
    refine_key = "cams"
    has_seg_head = True

    def __init__(self):
        self._hooked = False    # True once the trainer calls after_step (EMA done there)

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        return MCCNet(p, num_classes)

    # -- optimiser hooks -------------------------------------------------------------------
    def param_groups(self, model: MCCNet, p: dict) -> list[dict]:
        """Backbone at the base lr, heads (classifiers, projector, decoder) at
        ``head_lr_mult`` x (official: 10x). The EMA projector is not optimised."""
        heads = [*model.classifier.parameters(), *model.aux_classifier.parameters(),
                 *model.proj.parameters(), *model.decoder.parameters()]
        return [{"params": list(model.vit.parameters()), "lr_mult": 1.0},
                {"params": heads, "lr_mult": float(p.get("head_lr_mult", 10.0))}]

    def after_step(self, model: MCCNet, it: int, p: dict | None = None) -> None:
        """EMA update of the global projector after each optimiser step (momentum ``ema``).

        If the trainer never calls this hook, :meth:`loss` performs the same update at the
        start of each iteration instead (the official code's order: update, then use); at
        iteration 0 both are no-ops because the EMA projector starts as a copy."""
        self._hooked = True
        m = float((p or {}).get("ema", getattr(self, "_ema", 0.9)))
        ema_update(model.proj_ema, model.proj, m)

    # -- training --------------------------------------------------------------------------
    def loss(self, model: MCCNet, x: torch.Tensor, y: torch.Tensor, p: dict,
             generator: torch.Generator, it: int | None = None) -> tuple[torch.Tensor, dict]:
        """Eq. 7 on one batch.

        Args:
            x: ``(B, 3, S, S)`` normalised images; y: ``(B, C)`` multi-hot foreground labels.
            p: ``train_cls`` params with the ``methods.mcc.train_cls`` keys.
            generator: CPU torch Generator for the key masks.
            Contrast settings: ``info_nce`` (``code`` = :func:`info_nce_code`, official
            ``MCCLoss``; ``paper`` = :func:`info_nce`), ``global_positive`` (default true,
            official), ``normalize`` (default false, official raw outputs).
            it: current iteration (0-based); None: ``self.iteration`` (set by the trainer).
        Returns:
            ``(loss, {"cls", "cls_aux", "aff", "mcc", "seg", "pos_frac"})``.
        """
        if it is None:
            it = int(self.iteration)
        self._ema = float(p.get("ema", 0.9))
        if not self._hooked:
            ema_update(model.proj_ema, model.proj, self._ema)
        b_bg, b_fg = float(p.get("bg_low", 0.25)), float(p.get("bg_high", 0.7))
        B = x.shape[0]
        yy = y[:, :, None, None]

        cam, cam_aux = train_time_cams(model, x, p.get("cam_scales", [1.0]), bool(p.get("cam_flip", True)))
        out = model.heads(x)
        h, w = out["grid"]
        l_cls = multilabel_loss(out["logits"], y)
        l_cls_aux = multilabel_loss(out["logits_aux"], y)

        # L_aff (Eq. 11-12): aux-CAM labels at the token grid
        aux_tok = F.interpolate(cam_aux, size=(h, w), mode="bilinear", align_corners=False) * yy
        lab_aux = cam_to_label(aux_tok, y, b_fg, b_bg)
        aff = affinity_label_from_seg(lab_aux, None)
        l_aff = affinity_loss(out["feat"], aff, bool(p.get("abs_cos", False)))

        # MCC (Eq. 1-3, 8-10)
        n_local = int(p.get("n_local", 8))
        switch = p.get("mask_cam_switch_iter")
        src = cam if (switch is not None and it >= int(switch)) else cam_aux
        src_tok = F.interpolate(src, size=(h, w), mode=p.get("mask_cam_resize", "bicubic"),
                                align_corners=False) * yy
        levels = discretise_levels(src_tok.amax(1), b_bg, b_fg)
        masks = draw_key_masks(B * n_local, h, w, float(p.get("mask_ratio", 0.75)),
                               int(p.get("mask_scale", 4)), generator).to(x.device)
        flags = positive_flags(levels, masks.view(B, n_local, h, w), float(p.get("mu", 0.2)))
        bias = key_mask_bias(masks, num_prefix_tokens(model.vit))
        local_cls, _, _ = model.tokens(x.repeat_interleave(n_local, 0), bias)
        k = model.proj(local_cls).view(B, n_local, -1)
        with torch.no_grad():
            q = model.proj_ema(out["cls"].detach())
        if p.get("global_positive", True):      # official: student global views are positives
            k = torch.cat([model.proj(out["cls"])[:, None], k], 1)
            flags = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), flags], 1)
        if p.get("normalize", False):           # paper reading (MoCo); official: raw outputs
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        form = p.get("info_nce", "code")
        if form == "code":
            l_mcc = info_nce_code(q, k, flags, float(p.get("tau", 0.5)))
        elif form == "paper":
            l_mcc = info_nce(q, k, flags, float(p.get("tau", 0.5)))
        else:
            raise ValueError(f"methods.mcc info_nce must be one of {INFO_NCE_FORMS}, got {form!r}")

        # L_seg: decoder vs PAR-refined pseudo labels of the final CAM
        w_seg = float(p.get("w_seg", 0.1))
        if w_seg > 0 and it >= int(p.get("seg_start_iter", 2000)):
            label = self._seg_label(x, cam * yy, y, p)
            seg = F.interpolate(out["seg"], size=label.shape[-2:], mode="bilinear", align_corners=False)
            l_seg = seg_loss_balanced(seg, label)
        else:
            l_seg = out["seg"].sum() * 0

        loss = (l_cls + l_cls_aux + float(p.get("lambda_aff", 0.2)) * l_aff
                + float(p.get("lambda_mcc", 0.5)) * l_mcc + w_seg * l_seg)
        return loss, {"cls": l_cls.item(), "cls_aux": l_cls_aux.item(), "aff": l_aff.item(),
                      "mcc": l_mcc.item(), "seg": l_seg.item(),
                      "pos_frac": flags.float().mean().item()}

    def _seg_label(self, x, cam, y, p):
        """PAR-refined pseudo label ``(B, H, W)`` int64 of the label-masked final CAM."""
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        img = (x * std + mean).clamp(0, 1)
        with torch.no_grad():
            return refine_cams_with_bkg(self._par(p, x.device), img, cam, y,
                                        float(p.get("bg_high", 0.7)), float(p.get("bg_low", 0.25)),
                                        **p.get("par_call", {})).long()

    def _par(self, p, device):
        if getattr(self, "_par_mod", None) is None:
            self._par_mod = PAR(**p.get("par", {})).to(device)
        return self._par_mod

    # -- seeds and own segmentation -----------------------------------------------------------
    @torch.no_grad()
    def maps(self, model: MCCNet, x: torch.Tensor, fg: torch.Tensor, p: dict) -> dict[str, torch.Tensor]:
        """``{"cams": ReLU(W^T Z^(L)), "cams_aux": ReLU(W_aux^T Z^(aux))}`` for the classes
        ``fg``, each ``(k, h, w)`` float32 at the token grid (normalised later by the export;
        ``norm: minmax`` for MCC). ``p["raw_maps"]``: before the ReLU (the export's official
        merge clips after the flip max)."""
        cam, cam_aux = model.cams(x)
        if p.get("raw_maps"):
            return {"cams": cam[0, fg], "cams_aux": cam_aux[0, fg]}
        return {"cams": F.relu(cam[0, fg]), "cams_aux": F.relu(cam_aux[0, fg])}

    @torch.no_grad()
    def segment(self, model: MCCNet, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Decoder logits ``(1, C+1, h, w)`` (background first) at the token grid."""
        _, f, _ = model.tokens(x)
        h, w = patch_grid(model.vit, x.shape[-2], x.shape[-1])
        return model.decoder(f.transpose(1, 2).reshape(f.shape[0], -1, h, w))
