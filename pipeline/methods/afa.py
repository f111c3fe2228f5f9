"""AFA: Affinity from Attention (Ru et al., CVPR 2022,
``shared/papers/afa-affinity-from-attention.txt``; official code github.com/rulixiang/afa, read
as a reference only).

One network trained end to end on image-level labels:

* encoder: a timm ViT/DeiT (:func:`pipeline.models.vit.create_vit`; paper MiT-B1, optional);
* classifier: global max pooling (GMP, Table 1) of the final patch tokens + a bias-free 1x1
  conv (linear layer); multi-label soft-margin loss (Eq. 11); CAM = ReLU(W^T F) (Eq. 2);
* AFA module (Eq. 3): ``Â = MLP(S + S^T)`` over the multi-head attention of the blocks
  ``aff_layers`` (channels = layers x heads), supervised by Eq. 5 with pairwise labels of the
  PAR-refined pseudo label (Eq. 4, β_h/β_l) inside a window of ``aff_radius`` tokens;
* propagation (Eq. 6-7): ``T = D^-1 σ(Â)^α``, one random-walk step of the CAM (with a
  constant background at β_h and β_l), refined by PAR (Eq. 8-10), high/low combination;
* segmentation head: a SegFormer-style MLP decoder over ``seg_levels`` blocks' tokens
  (the paper uses MiT's four stages), trained with cross-entropy (ignore 255) on the
  PAR-refined pseudo labels, then on the propagated ones;
* total (Eq. 12): ``L_cls + λ1 L_seg + λ2 L_aff + λ3 L_reg``; paper (0.1, 0.1, 0.01), default
  (0.1, 0.1, 0) because the official ``scripts/dist_train_voc.py`` comments ``reg_loss`` out
  (``lambdas: [0.1, 0.1, 0.01]`` is the paper's reading); ``L_reg`` =
  :func:`local_consistency_loss` (pure PyTorch).

Schedule (paper Sec. 4.1): classification only for ``warmup_cls_iters`` (2,000); then
``L_aff``, ``L_seg`` (target: PAR-refined CAM label) and ``L_reg``; from
``warmup_cls_iters + warmup_aff_iters`` (2,000 + 4,000) the segmentation target is the
affinity-propagated label (official code: switch at 6,000).

Choices where the paper is silent or paper and code differ (all under ``methods.afa`` in
params.yaml). Policy (project issue 14): the official code's behaviour is the default, the
paper's literal reading an option; table: ``docs/methods/afa.md``.

* ``aff_loss: code`` (default) — official ``utils/losses.py: get_aff_loss``:
  ``½·Σ+/(N+ + 1) + ½·Σ-/(N- + 1)``, half of Eq. 5; ``paper`` = Eq. 5 unhalved (old default).
  See :func:`affinity_loss_afa`.
* ``prop_affinity: largest_scale`` (default) — official ``utils/camutils.py:
  multi_scale_cam_with_aff_mat`` returns the affinity of the forward at the largest of
  ``cam_scales`` (1.5 in the official config) of the unflipped image, and
  ``scripts/dist_train_voc.py`` resizes the label-masked CAM to that forward's token grid
  (``infer_size``), masks pairs beyond the radius on that grid (``attn_mask_infer``) and
  propagates there; ``train_forward`` (old default) uses the affinity of the training
  forward at the crop's grid (Eq. 6-7 do not say which forward). With ``cam_scales: [1.0]``
  both give the same affinity (the largest scale is the crop itself).

* ``aff_attention: logits`` — S is the pre-softmax ``QK^T/sqrt(d)`` of Eq. 1 (paper);
  ``softmax`` uses the post-softmax attention. ``aff_layers: [-2, -1]``: the last two blocks
  (official code; the paper names no block). The MLP is one 1x1 conv with bias (code).
* ``aff_ignore_diagonal: false`` (code keeps pairs (i, i) as positives); ``aff_radius: 8``.
* Eq. 6 row normalisation without eps
  (paper; ``prop_eps: 0.1`` is the code's column sums + 0.1); one step (``prop_iters``),
  pairs beyond ``aff_radius`` zeroed before the power (code; ``prop_radius_mask``).
* PAR: ``par.variant: paper`` (separate w1/w2 scales); code: one scale. Run on the image
  downsampled by ``par_down_scale`` (2, code).
* Training CAMs: per scale of ``cam_scales`` image + flip, flip merged by max, ReLU, summed
  over scales, min-max per class, masked by the labels (code ``multi_scale_cam``); no
  gradients.
* ``seg_loss: ce`` (paper: "commonly used cross-entropy"); ``balanced`` = the code's mean of
  background and foreground CE.
* L_reg (off by default, see Eq. 12 above): bilateral Potts energy on PAR's sparse dilated neighbourhood at ``reg_scale`` (0.5)
  of the crop (rloss uses a dense permutohedral filter; σ_rgb 15, σ_xy 100 as there).
* Seeds: ``cams`` (Eq. 2, normalised by the export: ``norm: minmax``) and ``cams_aff``:
  Eq. 7 applied to each scale's min-max normalised CAM with that scale's ``σ(Â)`` (no
  background channel), stored for inspection.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models.vit import create_vit, num_prefix_tokens, patch_grid
from .base import Method, multilabel_loss
from .common.cam_labels import combine_high_low, refine_cams_with_bkg
from .common.par import NEIGHBOURS_8, PAR, maps_to_par_label, par_input
from .common.token_affinity import (affinity_label_from_seg, propagate_affinity,
                                    propagate_cams_with_bkg, radius_mask)


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
        self.vit = create_vit(bb["name"], 0, bb.get("pretrained"), bb.get("overrides"))
        depth = len(self.vit.blocks)
        heads = self.vit.blocks[0].attn.inner.num_heads
        d = self.vit.num_features
        self.aff_layers = sorted({int(i) % depth for i in p.get("aff_layers", [-2, -1])})
        levels = p.get("seg_levels")
        if levels is None:                        # four evenly spaced blocks, like MiT's stages
            k = min(4, depth)
            levels = [round((i + 1) * depth / k) - 1 for i in range(k)]
        self.seg_levels = sorted({int(i) % depth for i in levels})
        self.aff_attention = p.get("aff_attention", "logits")
        if self.aff_attention not in ("logits", "softmax"):
            raise ValueError(f"methods.afa aff_attention must be logits or softmax, got {self.aff_attention!r}")
        for i in self.aff_layers:
            self.vit.blocks[i].attn.capture_logits = self.aff_attention == "logits"
        self.classifier = nn.Linear(d, num_classes, bias=False)
        self.aff_proj = nn.Linear(len(self.aff_layers) * heads, 1, bias=True)   # 1x1 conv (Eq. 3)
        self.decoder = MLPDecoder(d, len(self.seg_levels), int(p.get("decoder_dim", 256)),
                                  num_classes + 1, float(p.get("decoder_dropout", 0.1)))

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
        """Eq. 3 on the last forward's attention: ``(B, n, n)`` logits, symmetric."""
        s = []
        for i in self.aff_layers:
            a = self.vit.blocks[i].attn
            m = a.last_logits if self.aff_attention == "logits" else a.last_attn
            if m is None:
                raise RuntimeError("AFA: no attention captured in block %d" % i)
            s.append(m[:, :, npre:, npre:])
        s = torch.cat(s, 1)                                   # (B, L*heads, n, n)
        s = s + s.transpose(-1, -2)
        return torch.einsum("bknm,k->bnm", s, self.aff_proj.weight[0]) + self.aff_proj.bias[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> classification logits ``(B, C)``."""
        return self.run(x, with_heads=False)["logits"]

    def cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CAMs ``W^T F`` (B, C, h, w) before ReLU and the affinity logits (B, n, n)."""
        out = self.run(x)
        h, w = out["grid"]
        cam = (out["feat"] @ self.classifier.weight.t()).transpose(1, 2)
        return cam.reshape(x.shape[0], -1, h, w), out["aff"]


def minmax(m: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per image and channel ``(M - min) / (max - min + eps)`` of ``(B, K, H, W)``."""
    mn = m.amin((2, 3), keepdim=True)
    mx = m.amax((2, 3), keepdim=True)
    return (m - mn) / (mx - mn + eps)


@torch.no_grad()
def train_time_cams(model: AFANet, x: torch.Tensor, scales=(1.0,), flip: bool = True) -> torch.Tensor:
    """Multi-scale training CAMs (official ``multi_scale_cam``): per scale the image and its
    flip, upsampled to ``(H, W)``, flip merged by max, ReLU; summed over scales; min-max.

    Returns:
        ``(B, C, H, W)`` float32 in [0, 1] (all classes; mask by the labels).
    """
    from ..inference import OFFICIAL_MS_CAM, multiscale_flip

    def forward(inp: torch.Tensor) -> torch.Tensor:
        out = model.run(inp, with_heads=False)
        h, w = out["grid"]
        return (out["feat"] @ model.classifier.weight.t()).transpose(1, 2).reshape(inp.shape[0], -1, h, w)
    return multiscale_flip(forward, x, scales, flips=(False, True) if flip else (False,),
                           flip_batch=True, **OFFICIAL_MS_CAM)


PROP_AFFINITY = ("largest_scale", "train_forward")


@torch.no_grad()
def scale_affinity(model: AFANet, x: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Affinity logits of the forward of ``x`` resized by ``scale`` (no gradients).

    Official ``utils/camutils.py: multi_scale_cam_with_aff_mat`` keeps the affinity of the
    largest scale's forward (``aff_mat[np.argmax(scales)]``) and uses it for the unflipped
    images; this runs that forward (image only, no flip: the flipped half is never used).
    The resize is the one of the training CAMs: bilinear to ``(int(s*H), int(s*W))``.

    Args:
        x: ``(B, 3, H, W)`` normalised images; scale: > 0.
    Returns:
        ``(aff (B, n, n) float logits Â, symmetric; (h, w) the token grid of that forward)``.
    Raises:
        ValueError: ``scale <= 0``.
    """
    if scale <= 0:
        raise ValueError(f"methods.afa cam_scales must be > 0, got {scale}")
    H, W = x.shape[-2:]
    xs = x if scale == 1.0 else F.interpolate(x, size=(int(scale * H), int(scale * W)),
                                              mode="bilinear", align_corners=False)
    out = model.run(xs, with_heads=False)
    return model.affinity(num_prefix_tokens(model.vit)), out["grid"]


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``(B, 3, H, W)`` -> RGB in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


# ------------------------------------------------------- AFA losses: L_aff (Eq. 5), L_reg (Eq. 12)

AFF_LOSS_FORMS = ("code", "paper")


def affinity_loss_afa(aff_logits: torch.Tensor, aff_label: torch.Tensor,
                      form: str = "code") -> torch.Tensor:
    """AFA's affinity loss L_aff (paper Eq. 5; official ``utils/losses.py: get_aff_loss``).

    With ``s = σ(A)``, ``R+`` the pairs labelled 1 and ``R-`` those labelled 0:

    * ``form="code"`` (default, official ``get_aff_loss``, half of Eq. 5):
      ``½ Σ_{R+}(1 - s) / (N+ + 1) + ½ Σ_{R-} s / (N- + 1)`` — each term halved, and the
      official counts carry ``+ 1`` (so a term without pairs is 0, never a division by 0);
    * ``form="paper"`` (Eq. 5 as printed, this project's old default):
      ``Σ_{R+}(1 - s) / N+ + Σ_{R-} s / N-`` (a term without pairs is 0).

    Args:
        aff_logits: ``(B, n, n)`` float, predicted affinity A before the sigmoid (the
            official head applies the sigmoid inside the network; same thing).
        aff_label: ``(B, n, n)`` int, 1 positive, 0 negative, anything else (255) ignored.
        form: ``"code"`` | ``"paper"``.
    Returns:
        scalar float tensor; ``code`` in [0, 1), ``paper`` in [0, 2].
    Raises:
        ValueError: unknown ``form`` or shapes differ.
    """
    if form not in AFF_LOSS_FORMS:
        raise ValueError(f"methods.afa aff_loss must be one of {AFF_LOSS_FORMS}, got {form!r}")
    if aff_logits.shape != aff_label.shape:
        raise ValueError(f"affinity_loss_afa: logits {tuple(aff_logits.shape)} vs labels "
                         f"{tuple(aff_label.shape)}")
    s = torch.sigmoid(aff_logits)
    pos, neg = (aff_label == 1).to(s.dtype), (aff_label == 0).to(s.dtype)
    lp, ln = ((1 - s) * pos).sum(), (s * neg).sum()
    if form == "code":
        return 0.5 * lp / (pos.sum() + 1) + 0.5 * ln / (neg.sum() + 1)
    return lp / pos.sum().clamp_min(1) + ln / neg.sum().clamp_min(1)

def local_consistency_loss(img: torch.Tensor, probs: torch.Tensor, sigma_rgb: float = 15.0,
                           sigma_xy: float = 100.0, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                           roi: torch.Tensor | None = None) -> torch.Tensor:
    """Local consistency of segmentation predictions, a pure-PyTorch stand-in for the dense
    CRF energy (Tang et al. ECCV 2018, "rloss") that AFA's L_reg uses (Eq. 12, refs [41, 53,
    54, 57]) through a compiled bilateral filter.

    Relaxed Potts energy on a sparse neighbourhood (the 8-neighbours of PAR's dilations):
    ``L = 1/P Σ_i Σ_{j ∈ N(i)} W_ij (1 - s_i · s_j)`` with the bilateral Gaussian
    ``W_ij = exp(-|p_i - p_j|² / 2σ_xy² - |I_i - I_j|² / 2σ_rgb²)``, over the pixels ``i`` in
    ``roi`` (P = their count); pairs leaving the image are dropped. Its gradient equals the
    dense energy's ``-s^T W s`` restricted to these pairs (up to the constant ``Σ W``).

    Args:
        img: ``(B, 3, H, W)`` float image in 0..255 (σ_rgb in those units).
        probs: ``(B, K, H, W)`` softmax probabilities (gradients flow into them).
        sigma_rgb, sigma_xy: rloss defaults 15 and 100 (pixels of ``img``).
        roi: optional ``(B, H, W)`` bool/float mask of pixels that count.
    Returns:
        scalar >= 0.
    """
    B, K, H, W = probs.shape
    total = probs.new_zeros(())
    valid_i = probs.new_ones(B, H, W) if roi is None else roi.to(probs.dtype)
    for d in dilations:
        d = int(d)
        for dy, dx in NEIGHBOURS_8:
            oy, ox = dy * d, dx * d
            # slices of i and j = i + (oy, ox), both inside the image
            yi = slice(max(0, -oy), H - max(0, oy))
            xi = slice(max(0, -ox), W - max(0, ox))
            yj = slice(max(0, oy), H - max(0, -oy))
            xj = slice(max(0, ox), W - max(0, -ox))
            if yi.start >= yi.stop or xi.start >= xi.stop:
                continue
            w_xy = math.exp(-(oy * oy + ox * ox) / (2 * sigma_xy ** 2))
            dc = ((img[:, :, yi, xi] - img[:, :, yj, xj]) ** 2).sum(1)
            wij = w_xy * torch.exp(-dc / (2 * sigma_rgb ** 2))
            agree = (probs[:, :, yi, xi] * probs[:, :, yj, xj]).sum(1)
            total = total + (wij * (1 - agree) * valid_i[:, yi, xi]).sum()
    return total / valid_i.sum().clamp_min(1)


def seg_loss(logits: torch.Tensor, label: torch.Tensor, mode: str = "ce", ignore: int = 255) -> torch.Tensor:
    """``ce``: cross-entropy ignoring ``ignore`` (paper); ``balanced``: mean of the background
    and foreground cross-entropies (official code). 0 (with a graph) if no pixel is labelled."""
    if mode not in ("ce", "balanced"):
        raise ValueError(f"methods.afa seg_loss must be ce or balanced, got {mode!r}")
    parts = [label] if mode == "ce" else [label.masked_fill(label != 0, ignore),
                                          label.masked_fill(label == 0, ignore)]
    terms = [F.cross_entropy(logits, lab, ignore_index=ignore) if bool((lab != ignore).any())
             else logits.sum() * 0 for lab in parts]
    return sum(terms) / len(terms)


class AFA(Method):
    """AFA plug-in: :class:`AFANet`, Eq. 12 loss with the paper's warm-ups, CAM and
    propagated-CAM seeds, the decoder as own segmentation head. See the module docstring."""

    name = "afa"
    seed_keys = ("cams", "cams_aff")
    seed_merge = {"ms_flip_merge": "max", "ms_relu": "after_flip_merge"}   # official multi_scale_cam
    affinity_key = "cams"
    refine_key = "cams"
    has_seg_head = True

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        return AFANet(p, num_classes)

    def param_groups(self, model: AFANet, p: dict) -> list[dict]:
        """Backbone at the scheduled lr; classifier, AFA projection and decoder at
        ``head_lr_mult`` x (paper: 10x)."""
        heads = [*model.classifier.parameters(), *model.aff_proj.parameters(),
                 *model.decoder.parameters()]
        return [{"params": list(model.vit.parameters()), "lr_mult": 1.0},
                {"params": heads, "lr_mult": float(p.get("head_lr_mult", 10.0))}]

    def _par(self, p: dict, device) -> PAR:
        key = repr(sorted(p.get("par", {}).items()))
        if getattr(self, "_par_key", None) != key:
            self._par_mod, self._par_key = PAR(**p.get("par", {})), key
        return self._par_mod.to(device)

    def pseudo_labels(self, model: AFANet, x: torch.Tensor, y: torch.Tensor, aff_logits: torch.Tensor,
                      grid: tuple[int, int], p: dict, propagate: bool) -> dict[str, torch.Tensor]:
        """Training targets of one batch (no gradients).

        Returns:
            ``refined`` (B, H, W) int64: PAR-refined CAM label (Eq. 4 via β_h/β_l + PAR);
            ``aff_label`` (B, n, n): Eq. 5 pair labels from ``refined`` at the token grid;
            ``propagated`` (B, H, W), only with ``propagate``: Eq. 6-7 + PAR, high/low.
            The affinity is ``prop_affinity``'s: ``largest_scale`` (official, default) = the
            forward at ``max(cam_scales)`` on its own grid (:func:`scale_affinity`);
            ``train_forward`` = ``aff_logits`` at ``grid``.
        Raises:
            ValueError: unknown ``prop_affinity``.
        """
        mode = p.get("prop_affinity", "largest_scale")
        if mode not in PROP_AFFINITY:
            raise ValueError(f"methods.afa prop_affinity must be one of {PROP_AFFINITY}, got {mode!r}")
        bh, bl = float(p.get("bg_high", 0.55)), float(p.get("bg_low", 0.35))
        down = int(p.get("par_down_scale", 2))
        with torch.no_grad():
            scales = p.get("cam_scales", [1.0, 0.5, 1.5])
            cams = train_time_cams(model, x, scales,
                                   bool(p.get("cam_flip", True))) * y[:, :, None, None]
            img = denormalise(x)
            par = self._par(p, x.device)
            kern = par.kernel(par_input(img, down))          # Eq. 9 once per image
            refined = refine_cams_with_bkg(par, img, cams, y, bh, bl, down, kernel=kern)
            h, w = grid
            small = F.interpolate(refined[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
            radius = p.get("aff_radius", 8)
            out = {"refined": refined,
                   "aff_label": affinity_label_from_seg(small, radius, 255,
                                                        bool(p.get("aff_ignore_diagonal", False)))}
            if propagate:
                if mode == "largest_scale":
                    aff_p, (hp, wp) = scale_affinity(model, x, float(max(scales)))
                else:
                    aff_p, (hp, wp) = aff_logits.detach(), (h, w)
                cg = F.interpolate(cams, size=(hp, wp), mode="bilinear", align_corners=False)
                mask = (radius_mask(hp, wp, radius).to(x.device)
                        if p.get("prop_radius_mask", True) and radius is not None else None)
                aff = torch.sigmoid(aff_p)
                prop = [propagate_cams_with_bkg(cg, y, aff, bg, float(p.get("alpha", 2.0)),
                                                int(p.get("prop_iters", 1)), mask,
                                                float(p.get("prop_eps", 0.0)))
                        for bg in (bh, bl)]
                lab_h, lab_l = maps_to_par_label(par, img, prop, y, False, down, kern)
                out["propagated"] = combine_high_low(lab_h, lab_l)
        return out

    def loss(self, model: AFANet, x: torch.Tensor, y: torch.Tensor, p: dict,
             generator: torch.Generator, it: int | None = None) -> tuple[torch.Tensor, dict]:
        """Eq. 12 on one batch with the paper's warm-ups.

        Args:
            x: ``(B, 3, S, S)`` normalised images; y: ``(B, C)`` multi-hot labels.
            p: ``train_cls`` params with ``methods.afa.train_cls``.
            it: iteration (0-based); None: ``self.iteration`` (set by the trainer).
            Settings (``p``): ``aff_loss`` (``code`` official half Eq. 5 | ``paper``),
            ``lambdas`` (default ``[0.1, 0.1, 0.0]``: L_reg off as in the official script;
            paper ``[0.1, 0.1, 0.01]``), ``prop_affinity`` (see :meth:`pseudo_labels`).
        Returns:
            ``(loss, {"cls", "seg", "aff", "reg", "prop"})`` (prop: 1 once the segmentation
            target is the propagated label).
        Raises:
            ValueError: unknown ``aff_loss`` / ``prop_affinity`` / ``seg_loss``.
        """
        aff_form = p.get("aff_loss", "code")
        if aff_form not in AFF_LOSS_FORMS:
            raise ValueError(f"methods.afa aff_loss must be one of {AFF_LOSS_FORMS}, got {aff_form!r}")
        it = int(self.iteration if it is None else it)
        warm_cls = int(p.get("warmup_cls_iters", 2000))
        warm_aff = int(p.get("warmup_aff_iters", 4000))
        out = model.run(x, with_heads=it >= warm_cls)
        l_cls = multilabel_loss(out["logits"], y)
        if it < warm_cls:
            return l_cls, {"cls": l_cls.item(), "seg": 0.0, "aff": 0.0, "reg": 0.0, "prop": 0.0}
        propagate = it >= warm_cls + warm_aff
        tg = self.pseudo_labels(model, x, y, out["aff"], out["grid"], p, propagate)
        l_aff = affinity_loss_afa(out["aff"], tg["aff_label"], aff_form)
        label = tg["propagated"] if propagate else tg["refined"]
        seg = F.interpolate(out["seg"], size=label.shape[-2:], mode="bilinear", align_corners=False)
        l_seg = seg_loss(seg, label, p.get("seg_loss", "ce"))
        lam1, lam2, lam3 = (float(v) for v in p.get("lambdas", [0.1, 0.1, 0.0]))
        if lam3 > 0:
            rs = float(p.get("reg_scale", 0.5))
            size = (max(1, int(x.shape[-2] * rs)), max(1, int(x.shape[-1] * rs)))
            img = F.interpolate(denormalise(x) * 255, size=size, mode="bilinear", align_corners=False)
            prob = F.interpolate(seg, size=size, mode="bilinear", align_corners=False).softmax(1)
            l_reg = local_consistency_loss(img, prob, float(p.get("reg_sigma_rgb", 15.0)),
                                           float(p.get("reg_sigma_xy", 100.0)) * rs,
                                           p.get("reg_dilations", [1, 2, 4, 8, 12, 24]))
        else:
            l_reg = seg.sum() * 0
        loss = l_cls + lam1 * l_seg + lam2 * l_aff + lam3 * l_reg
        return loss, {"cls": l_cls.item(), "seg": l_seg.item(), "aff": l_aff.item(),
                      "reg": l_reg.item(), "prop": float(propagate)}

    @torch.no_grad()
    def maps(self, model: AFANet, x: torch.Tensor, fg: torch.Tensor, p: dict) -> dict[str, torch.Tensor]:
        """``cams``: ReLU(W^T F) (Eq. 2) for the classes ``fg``; ``cams_aff``: one Eq. 6-7
        step of this scale's min-max normalised CAM with σ(Â). Each ``(k, h, w)`` float32 at
        the token grid (normalised later by the export, ``norm: minmax``). ``p["raw_maps"]``:
        ``cams`` before the ReLU (the export's official merge clips after the flip max)."""
        cam, aff = model.cams(x)
        raw = cam[:, fg]
        cam = F.relu(raw)
        h, w = cam.shape[-2:]
        radius = p.get("aff_radius", 8)
        mask = (radius_mask(h, w, radius).to(x.device)
                if p.get("prop_radius_mask", True) and radius is not None else None)
        prop = propagate_affinity(minmax(cam), torch.sigmoid(aff), float(p.get("alpha", 2.0)),
                                  int(p.get("prop_iters", 1)), mask, float(p.get("prop_eps", 0.0)))
        return {"cams": (raw if p.get("raw_maps") else cam)[0], "cams_aff": prop[0]}

    @torch.no_grad()
    def segment(self, model: AFANet, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Decoder logits ``(1, C+1, h, w)`` (background first) at the token grid."""
        return model.run(x)["seg"]
