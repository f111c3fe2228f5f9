"""AFA: Affinity from Attention (Ru et al., CVPR 2022,
``shared/papers/afa-affinity-from-attention.txt``; official code github.com/rulixiang/afa, read
as a reference only).

One network trained end to end on image-level labels:

* encoder: MiT-B1 as the official code (``backbone.name: mit_b1``,
  :func:`pipeline.models.mit.create_mit`, strides (4, 2, 2, 1), SegFormer head on its four
  stages: :class:`~pipeline.methods.afa.model.AFAMiTNet`; the ``voc`` / ``coco`` profiles) or a
  timm ViT/DeiT (:func:`pipeline.models.vit.create_vit`: the CPU profiles); ``freeze_norm:
  true`` (default) keeps the encoder's norm layers at their initial / pretrained values, as
  ``scripts/dist_train_voc.py`` gives them lr 0 (``param_groups[1]``, "freeze norm layers");
* classifier: global max pooling (GMP, Table 1) of the final patch tokens + a bias-free 1x1
  conv (linear layer); multi-label soft-margin loss (Eq. 11); CAM = ReLU(W^T F) (Eq. 2);
* AFA module (Eq. 3): ``Â = MLP(S + S^T)`` over the multi-head attention logits (unscaled
  ``q k^T`` as the official code, ``aff_attention``) of the blocks ``aff_layers`` (channels =
  layers x heads), supervised by Eq. 5 with pairwise labels of the PAR-refined pseudo label
  (Eq. 4, β_h/β_l) inside a window of ``aff_radius`` tokens;
* propagation (Eq. 6-7): ``T = (D + 0.1)^-1 σ(Â)^α`` (the official + 0.1, ``prop_eps``), one
  random-walk step of the CAM (with a constant background at β_h and β_l), refined by PAR
  (Eq. 8-10), high/low combination;
* segmentation head: a SegFormer-style MLP decoder over ``seg_levels`` blocks' tokens
  (the paper uses MiT's four stages), trained with the official background/foreground
  balanced cross-entropy (``seg_loss``; ignore 255) on the PAR-refined pseudo labels, then on
  the propagated ones;
* total (Eq. 12): ``L_cls + λ1 L_seg + λ2 L_aff + λ3 L_reg``; paper (0.1, 0.1, 0.01), default
  (0.1, 0.1, 0) because the official ``scripts/dist_train_voc.py`` comments ``reg_loss`` out
  (``lambdas: [0.1, 0.1, 0.01]`` is the paper's reading); ``L_reg`` = the rloss dense CRF
  energy of the official ``get_energy_loss`` (:func:`pipeline.methods.common.energy.dense_energy_loss`).

Schedule: classification only for the first ``warmup_cls_iters`` iterations (0-based ``it <
warmup_cls_iters``); then ``L_aff``, ``L_seg`` (target: PAR-refined CAM label) and ``L_reg``;
from ``it >= warmup_cls_iters + warmup_aff_iters`` the segmentation target is the
affinity-propagated label. Official code (``scripts/dist_train_voc.py``): ``n_iter <=
cam_iters`` (2,000) is classification only and ``n_iter <= 6000`` keeps the refined target,
i.e. 2,001 warm-up iterations (0..2,000) and propagation from iteration 6,001: default 2001 /
4000. The paper (Sec. 4.1) says 2,000 iterations: ``warmup_cls_iters: 2000``.

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

* ``aff_attention: logits_unscaled`` (default) — S is the pre-softmax ``q k^T`` WITHOUT the
  ``1/sqrt(d)``: official ``wetr/mix_transformer.py: Attention.forward`` returns ``attn_copy``
  = ``q @ k.transpose(-2, -1)`` (the scale is applied only inside its softmax) and
  ``wetr/model_attn_aff.py`` feeds it to ``attn_proj``; ``logits`` = ``QK^T/sqrt(d)`` of Eq. 1
  (paper reading, old default); ``softmax`` = the post-softmax attention. See
  :meth:`AFANet.affinity`. ``aff_layers: [-2, -1]``: the last two blocks (official code; the
  paper names no block). The MLP is one 1x1 conv with bias (code).
* ``aff_ignore_diagonal: false`` (code keeps pairs (i, i) as positives); ``aff_radius: 8``.
* ``prop_eps: 0.1`` (default) — Eq. 6's ``D`` plus 0.1: official ``utils/camutils.py:
  propagte_aff_cam_with_bkg`` divides ``aff ** 2`` by ``torch.sum(aff, dim=1, keepdim=True) +
  1e-1`` (column sums + 0.1; ``cams @ aff``, so for the symmetric Â this equals the row
  normalisation of :func:`~pipeline.methods.common.token_affinity.transition_matrix` with
  ``eps`` 0.1); ``0.0`` = Eq. 6 as printed (old default). The same value is used for the
  ``cams_aff`` seeds (``export_seeds.prop_eps``). One step (``prop_iters``), pairs beyond
  ``aff_radius`` zeroed before the power (code; ``prop_radius_mask``).
* PAR: ``par.variant: paper`` (separate w1/w2 scales); code: one scale. Run on the image
  downsampled by ``par_down_scale`` (2, code).
* Training CAMs: per scale of ``cam_scales`` image + flip, flip merged by max, ReLU, summed
  over scales, min-max per class, masked by the labels (code ``multi_scale_cam``); no
  gradients.
* ``seg_loss: balanced`` (default) — official ``utils/losses.py: get_seg_loss`` (also defined
  in ``scripts/dist_train_voc.py``, which calls it): ``(bg_loss + fg_loss) * 0.5``, the CE
  over background pixels and the CE over foreground pixels; ``ce`` = one cross-entropy over
  all labelled pixels (paper: "commonly used cross-entropy"; old default).
* L_reg (off by default, see Eq. 12 above): official ``DenseEnergyLoss(weight=1e-7,
  sigma_rgb=15, sigma_xy=100, scale_factor=0.5)`` on the softmax of the upsampled
  segmentation logits, gated by the segmentation label (``reg_weight``, ``reg_sigma_rgb``,
  ``reg_sigma_xy``, ``reg_scale``); the exact Gaussian sum instead of rloss's permutohedral
  lattice (:mod:`pipeline.methods.common.energy`). No crop-box ROI (the dataset does not
  return the box).
* Seeds: ``cams`` (Eq. 2, normalised by the export: ``norm: minmax``) and ``cams_aff``:
  Eq. 7 applied to each scale's min-max normalised CAM with that scale's ``σ(Â)`` (no
  background channel), stored for inspection.

Layout: this file is the plug-in (:class:`AFA`: Eq. 12 with the warm-ups, training targets,
seeds, own segmentation); :mod:`pipeline.methods.afa.model` the network (:class:`AFANet`,
MLP decoder, training CAMs with the largest scale's affinity); :mod:`pipeline.methods.afa.losses`
L_aff, L_reg and the segmentation loss. Shared pieces (PAR, CAM labels, token affinity) live
in :mod:`pipeline.methods.common`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.transforms import denormalise
from pipeline.models.backbones import model_normalisation
from pipeline.methods.base import Method, multilabel_loss
from pipeline.methods.common.cam_labels import combine_high_low, refine_cams_with_bkg
from pipeline.methods.common.energy import dense_energy_loss_from_params
from pipeline.methods.common.par import PAR, maps_to_par_label, par_input
from pipeline.methods.common.token_affinity import (affinity_label_from_seg, propagate_affinity,
                                    propagate_cams_with_bkg, radius_mask)
from pipeline.methods.afa.losses import AFF_LOSS_FORMS, affinity_loss_afa, seg_loss
from pipeline.methods.afa.model import AFANet, build_afa_net, minmax, train_time_cams

PROP_AFFINITY = ("largest_scale", "train_forward")
#: default ``prop_eps``: official ``propagte_aff_cam_with_bkg`` adds 1e-1 to the sums (Eq. 6: 0)
PROP_EPS = 0.1


class AFA(Method):
    """AFA plug-in: :class:`AFANet`, Eq. 12 loss with the paper's warm-ups, CAM and
    propagated-CAM seeds, the decoder as own segmentation head. See the package docstring."""

    name = "afa"
    seed_keys = ("cams", "cams_aff")
    seed_merge = {"ms_flip_merge": "max", "ms_relu": "after_flip_merge"}   # official multi_scale_cam
    affinity_key = "cams"
    refine_key = "cams"
    has_seg_head = True

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        """:func:`~pipeline.methods.afa.model.build_afa_net`; with ``freeze_norm`` (default
        true, official) the encoder's parameters named ``*norm*`` get no gradient: the
        official ``WeTr.get_param_groups`` puts every encoder parameter whose name contains
        "norm" into a group that ``scripts/dist_train_voc.py`` trains at lr 0 (AdamW at lr 0
        leaves a parameter unchanged, weight decay included)."""
        model = build_afa_net(p, num_classes)
        if p.get("freeze_norm", True):
            for name, q in self.encoder(model).named_parameters():
                if "norm" in name:
                    q.requires_grad_(False)
        return model

    @staticmethod
    def encoder(model: nn.Module) -> nn.Module:
        """The network's encoder: ``model.mit`` (MiT) or ``model.vit``."""
        return model.mit if hasattr(model, "mit") else model.vit

    def param_groups(self, model: AFANet, p: dict) -> list[dict]:
        """Encoder at the scheduled lr; classifier, AFA projection and decoder at
        ``head_lr_mult`` x (paper and code: 10x). Frozen parameters are left out by the
        optimiser (:func:`pipeline.steps.cls.make_optimizer`)."""
        heads = [*model.classifier.parameters(), *model.aff_proj.parameters(),
                 *model.decoder.parameters()]
        return [{"params": list(self.encoder(model).parameters()), "lr_mult": 1.0},
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
            ``propagated`` (B, H, W), only with ``propagate``: Eq. 6-7 + PAR, high/low,
            ``D`` + ``prop_eps`` (default 0.1 = official ``propagte_aff_cam_with_bkg``).
            The affinity is ``prop_affinity``'s: ``largest_scale`` (official, default) = the
            forward at ``max(cam_scales)`` on its own grid, taken from the training-CAM
            pass itself (:func:`~pipeline.methods.afa.model.train_time_cams`);
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
            flip = bool(p.get("cam_flip", True))
            big = propagate and mode == "largest_scale"
            if big:     # the largest scale's affinity from the same pass
                cams, aff_big, grid_big = train_time_cams(model, x, scales, flip, with_affinity=True)
            else:
                cams = train_time_cams(model, x, scales, flip)
            cams = cams * y[:, :, None, None]
            img = denormalise(x, *model_normalisation(model))
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
                if big:
                    aff_p, (hp, wp) = aff_big, grid_big
                else:
                    aff_p, (hp, wp) = aff_logits.detach(), (h, w)
                cg = F.interpolate(cams, size=(hp, wp), mode="bilinear", align_corners=False)
                mask = (radius_mask(hp, wp, radius).to(x.device)
                        if p.get("prop_radius_mask", True) and radius is not None else None)
                aff = torch.sigmoid(aff_p)
                prop = [propagate_cams_with_bkg(cg, y, aff, bg, float(p.get("alpha", 2.0)),
                                                int(p.get("prop_iters", 1)), mask,
                                                float(p.get("prop_eps", PROP_EPS)))
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
            paper ``[0.1, 0.1, 0.01]``), ``seg_loss`` (default ``balanced``, official
            ``get_seg_loss`` | ``ce``), ``prop_affinity``, ``prop_eps`` (default 0.1,
            official; see :meth:`pseudo_labels`).
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
        warm_cls = int(p.get("warmup_cls_iters", 2001))
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
        l_seg = seg_loss(seg, label, p.get("seg_loss", "balanced"))
        lam1, lam2, lam3 = (float(v) for v in p.get("lambdas", [0.1, 0.1, 0.0]))
        if lam3 > 0:   # official get_energy_loss(img, segs, refined label, img_box, rloss layer)
            l_reg = dense_energy_loss_from_params(denormalise(x, *model_normalisation(model)) * 255,
                                                  seg.softmax(1), label, p)
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
                                  int(p.get("prop_iters", 1)), mask, float(p.get("prop_eps", PROP_EPS)))
        return {"cams": (raw if p.get("raw_maps") else cam)[0], "cams_aff": prop[0]}

    @torch.no_grad()
    def segment(self, model: AFANet, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Decoder logits ``(1, C+1, h, w)`` (background first) at the token grid."""
        return model.run(x)["seg"]
