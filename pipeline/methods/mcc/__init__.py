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
  between) give pairwise labels; ``1 - |cos|`` for equal-label pairs and ``|cos|`` for
  different-label pairs of the final patch tokens (official ``|cos|``; Eq. 12 prints ``cos``);
* MCC (Eq. 1-3, 8-10): ``n_local`` Bernoulli(p) key masks drawn on a grid ``scale`` times
  coarser than the token grid and upsampled into ``scale x scale`` squares; masked key
  columns get ``-inf`` before the softmax in every block (the class token is never masked),
  which yields local class tokens; a local view is positive when the mean discretised
  aux-CAM level (Eq. 9: 0 / 1 / 2) of its remaining tokens exceeds μ (Eq. 8); InfoNCE
  (Eq. 10, τ) between the projected global class token (EMA projector, momentum m) and
  the projected positive / negative local class tokens.
* total (Eq. 7): ``L_cls + L_cls^aux + w_seg L_seg + λ_a L_aff + λ_m L_mcc`` (+ ``w_reg L_reg``,
  official code, below).

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
  ``utils/camutils.py: cam_to_attn_mask``); the projector outputs are used raw (the DINO head's
  own bottleneck L2 norm stays). See :func:`info_nce_code`. Paper reading (old default):
  ``info_nce: paper``, ``global_positive: false``, ``normalize: true`` (:func:`info_nce`).

* ``mask_ratio: 0.95`` (default) — official ``scripts/dist_train_voc_seg_neg.py``:
  ``--mask_rate`` default 0.95, passed by ``utils/camutils.py: cam_to_attn_mask`` to
  ``multi_scale_attn_mask`` (``torch.bernoulli`` of ``mask_ratio`` per cell; 1 = masked: the
  backbone's ``attention_with_mask`` subtracts ``policy * 1e12`` from those key columns, and
  the positive rule counts the ``1 - mask`` tokens as the remaining ones); the released
  ``logs/mcc_deit-b_voc_20k.log`` records ``mask_rate=0.95``. ``0.75`` = the paper (text and
  Fig. 7; old default).
* Views (``views``; :meth:`MCC.extra_views`, the dataset's ``extra_views: mcc``,
  :func:`pipeline.data.transforms.mcc_view`). ``official`` (default; fwu11/MCC
  ``datasets/voc.py: VOC12ClsDataset``, ``model/model_seg_neg.py: forward_proj``): two global
  views - view 1 is the training input itself (rescaled, flipped, cropped, then DINO's flip /
  colour jitter / grey and a Gaussian blur with p 1.0: the classifier, the CAMs, PAR and the
  segmentation labels all see it), view 2 a random resized crop (scale 0.4-1) of the whole
  image with its own jitter, blur p 0.1 and solarisation p 0.2; the teacher (EMA projector
  on the detached class token) projects both, the student projects both as positives and the
  ``n_local`` masked copies of the local view - the same crop as view 1 before its
  augmentation, jittered on its own with blur p 0.5 (its own flip too, so the key masks'
  positives, read from view 1's CAM, may fall on the mirrored image, as in the code).
  ``crop`` (this project's earlier form, the paper's Fig. 1 reading): one global view, the
  un-jittered training crop, whose masked copies are the local views.
* The global class token is detached before the EMA ("global") projector (official code,
  MoCo's key branch); gradients reach the encoder through the local class tokens.
* ``normalize: true`` (option): projected q and k are L2-normalised, so ``q k / τ`` is a
  cosine over τ (MoCo; Eq. 10 does not say). The official DINO-style head ends in a
  weight-normalised linear layer whose raw outputs are multiplied (``normalize: false``,
  default).
* ``info_nce: paper`` (option): Eq. 10 per image, averaged over the images with at least one
  positive; an image without positives contributes nothing (a sum over an empty set).
* L_aff: ``abs_cos: true`` (default) — official ``model/losses.py: get_masked_aff_loss``
  takes ``torch.abs`` of the cosine similarity (its ``cos_sim``); ``false`` = Eq. 12's
  ``cos``. ``aff_loss: code`` (default) — the official weighting
  ``0.5 (1 - Σ+|cos|/(N+ + 1)) + 0.5 Σ-|cos|/(N- + 1)``; ``paper`` = Eq. 12's
  ``Σ+(1 - |cos|)/N+ + Σ-|cos|/N-``. Diagonal pairs ignored, all pairs of the batch.
* w_seg = 0.1 and the segmentation loss is on from (0-based) iteration ``seg_start_iter``
  (``it >= seg_start_iter``). Official code: ``n_iter <= 2000`` gives it weight 0, so it
  starts at iteration 2,001 (default 2001; COCO ``n_iter <= 8000``: 8001); Eq. 7 prints the
  segmentation loss unweighted and the paper no start.
* L_reg (official code; Eq. 7 has none): ``w_reg`` 0.05 times rloss's dense CRF energy
  (``DenseEnergyLoss(weight=1e-7, sigma_rgb=15, sigma_xy=100, scale_factor=0.5)`` on the
  softmax of the upsampled segmentation logits, gated by the PAR-refined label; official
  ``scripts/dist_train_voc_seg_neg.py``, ``model/losses.py: get_energy_loss``), from
  ``seg_start_iter`` like L_seg; :func:`pipeline.methods.common.energy.dense_energy_loss`
  (exact Gaussian sum instead of the permutohedral lattice; no crop-box ROI).
  ``w_reg: 0`` = Eq. 7.
* ``seg_cam_switch_iter`` (default null: the final CAM throughout, official VOC script and
  paper): the PAR-refined segmentation labels come from the aux CAM while ``it <=`` it (the
  official COCO script: ``n_iter <= 12000``), then from the final CAM.
* Training-time CAMs (for the masks' positives and the segmentation labels) are computed
  without gradients over ``cam_scales`` + flip, ReLU, summed, min-max normalised per class
  (official ``multi_scale_cam``); ``mask_cam_switch_iter`` switches Eq. 9 from the aux CAM to
  the final CAM for ``it >= mask_cam_switch_iter`` (official ``n_iter > 12000``: 12001; paper:
  never, null).
* Padding of the random crops is not excluded from the pseudo labels (the dataset here does
  not return the crop box).

Layout: this file is the plug-in (:class:`MCC`: Eq. 7, seeds, own segmentation);
:mod:`pipeline.methods.mcc.model` the network (:class:`MCCNet`, projectors and their EMA
update, training CAMs); :mod:`pipeline.methods.mcc.losses` the key masks, positives, InfoNCE,
L_aff and the segmentation loss. Shared pieces (PAR, CAM labels, token affinity) live in
:mod:`pipeline.methods.common`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.transforms import denormalise
from pipeline.models.backbones import model_normalisation
from pipeline.models.vit import num_prefix_tokens, patch_grid
from pipeline.methods.base import Method, multilabel_loss
from pipeline.methods.common.cam_labels import cam_to_label, refine_cams_with_bkg
from pipeline.methods.common.energy import dense_energy_loss_from_params
from pipeline.methods.common.par import PAR
from pipeline.methods.common.token_affinity import affinity_label_from_seg
from pipeline.methods.mcc.losses import (INFO_NCE_FORMS, affinity_loss, discretise_levels, draw_key_masks, info_nce,
                     info_nce_code, key_mask_bias, positive_flags, seg_loss_balanced)
from pipeline.methods.mcc.model import MCCNet, ema_update, train_time_cams

#: ``methods.mcc.train_cls.views`` (see the package docstring)
VIEWS = ("official", "crop")


class MCC(Method):
    """MCC plug-in: :class:`MCCNet`, the loss of Eq. 7, final + auxiliary CAM seeds and the
    decoder's own segmentation. See the package docstring for the paper/code choices."""

    name = "mcc"
    seed_keys = ("cams", "cams_aux")   # final CAM evaluated; the aux CAM kept for inspection
    seed_merge = {"ms_flip_merge": "max", "ms_relu": "after_flip_merge"}   # official multi_scale_cam
    affinity_key = "cams"
    refine_key = "cams"
    has_seg_head = True

    def __init__(self):
        self._hooked = False    # True once the trainer calls after_step (EMA done there)

    def extra_views(self, p: dict) -> str | None:
        """``views: official`` (default): ``"mcc"`` - the dataset adds global view 2 and the
        local view (see the package docstring); ``crop``: None.

        Raises:
            ValueError: another ``views``.
        """
        form = p.get("views", "official")
        if form not in VIEWS:
            raise ValueError(f"methods.mcc.train_cls.views must be one of {VIEWS}, got {form!r}")
        return "mcc" if form == "official" else None

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
             generator: torch.Generator, it: int | None = None,
             global2: torch.Tensor | None = None, local: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict]:
        """Eq. 7 on one batch.

        Args:
            x: ``(B, 3, S, S)`` normalised images (global view 1); y: ``(B, C)`` multi-hot
                foreground labels.
            global2, local: ``(B, 3, S, S)`` normalised global view 2 and the local views'
                image (``views: official``, :meth:`extra_views`); None: the contrast has the
                one global view ``x`` and masks copies of ``x`` (``views: crop``).
            p: ``train_cls`` params with the ``methods.mcc.train_cls`` keys.
            generator: CPU torch Generator for the key masks.
            Contrast settings: ``info_nce`` (``code`` = :func:`info_nce_code`, official
            ``MCCLoss``; ``paper`` = :func:`info_nce`), ``global_positive`` (default true,
            official), ``normalize`` (default false, official raw outputs); ``mask_ratio``
            (default 0.95, official ``--mask_rate``; paper 0.75), ``abs_cos`` (default true,
            official ``|cos|``; paper false).
            it: current iteration (0-based); None: ``self.iteration`` (set by the trainer).
        Returns:
            ``(loss, {"cls", "cls_aux", "aff", "mcc", "seg", "pos_frac"})``.
        """
        if (global2 is None) != (local is None):
            raise ValueError("MCC.loss: give both global2 and local (views: official) or neither")
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
        l_aff = affinity_loss(out["feat"], aff, bool(p.get("abs_cos", True)), p.get("aff_loss", "code"))

        # MCC (Eq. 1-3, 8-10)
        n_local = int(p.get("n_local", 8))
        switch = p.get("mask_cam_switch_iter")
        src = cam if (switch is not None and it >= int(switch)) else cam_aux
        src_tok = F.interpolate(src, size=(h, w), mode=p.get("mask_cam_resize", "bicubic"),
                                align_corners=False) * yy
        levels = discretise_levels(src_tok.amax(1), b_bg, b_fg)
        masks = draw_key_masks(B * n_local, h, w, float(p.get("mask_ratio", 0.95)),
                               int(p.get("mask_scale", 4)), generator).to(x.device)
        flags = positive_flags(levels, masks.view(B, n_local, h, w), float(p.get("mu", 0.2)))
        bias = key_mask_bias(masks, num_prefix_tokens(model.vit))
        src_local = x if local is None else local
        local_cls, _, _ = model.tokens(src_local.repeat_interleave(n_local, 0), bias)
        k = model.proj(local_cls).view(B, n_local, -1)
        g_cls = [out["cls"]] if global2 is None else [out["cls"], model.tokens(global2)[0]]
        with torch.no_grad():                   # teacher: EMA projector, detached class tokens
            q = torch.stack([model.proj_ema(c.detach()) for c in g_cls], 1)     # (B, G, d)
        if p.get("global_positive", True):      # official: student global views are positives
            k = torch.cat([model.proj(c)[:, None] for c in g_cls] + [k], 1)
            flags = torch.cat([torch.ones(B, len(g_cls), dtype=torch.bool, device=x.device),
                               flags], 1)
        if p.get("normalize", False):           # paper reading (MoCo); official: raw outputs
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        form = p.get("info_nce", "code")
        if form == "code":
            l_mcc = info_nce_code(q, k, flags, float(p.get("tau", 0.5)))
        elif form == "paper":                   # Eq. 10 per global view, averaged over them
            l_mcc = torch.stack([info_nce(q[:, g], k, flags, float(p.get("tau", 0.5)))
                                 for g in range(q.shape[1])]).mean()
        else:
            raise ValueError(f"methods.mcc info_nce must be one of {INFO_NCE_FORMS}, got {form!r}")

        # L_seg: decoder vs PAR-refined pseudo labels of the final CAM; L_reg: official
        # get_energy_loss on the same upsampled logits and label (both from seg_start_iter)
        w_seg, w_reg = float(p.get("w_seg", 0.1)), float(p.get("w_reg", 0.05))
        l_seg = l_reg = out["seg"].sum() * 0
        if (w_seg > 0 or w_reg > 0) and it >= int(p.get("seg_start_iter", 2001)):
            img = denormalise(x, *model_normalisation(model))   # RGB in [0, 1]
            seg_switch = p.get("seg_cam_switch_iter")            # official COCO: aux CAM while n_iter <= 12000
            seg_cam = cam_aux if (seg_switch is not None and it <= int(seg_switch)) else cam
            label = self._seg_label(img, seg_cam * yy, y, p)
            seg = F.interpolate(out["seg"], size=label.shape[-2:], mode="bilinear", align_corners=False)
            l_seg = seg_loss_balanced(seg, label)
            if w_reg > 0:
                l_reg = dense_energy_loss_from_params(img * 255, seg.softmax(1), label, p)

        loss = (l_cls + l_cls_aux + float(p.get("lambda_aff", 0.2)) * l_aff
                + float(p.get("lambda_mcc", 0.5)) * l_mcc + w_seg * l_seg + w_reg * l_reg)
        return loss, {"cls": l_cls.item(), "cls_aux": l_cls_aux.item(), "aff": l_aff.item(),
                      "mcc": l_mcc.item(), "seg": l_seg.item(), "reg": l_reg.item(),
                      "pos_frac": flags.float().mean().item()}

    def _seg_label(self, img, cam, y, p):
        """PAR-refined pseudo label ``(B, H, W)`` int64 of the label-masked final CAM (``img``:
        the batch as RGB in [0, 1])."""
        with torch.no_grad():
            return refine_cams_with_bkg(self._par(p, img.device), img, cam, y,
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
