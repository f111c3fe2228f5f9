"""ViT-PCM: patch classification with global max pooling (Rossetti et al., ECCV 2022,
"Max Pooling with Vision Transformers reconciles class and shape in WSSS";
``shared/papers/vit-pcm-max-pooling-supplementary.txt``, official TensorFlow code
``deepplants/ViT-PCM`` ``model.py``).

Model (supplementary Sec. 1):

* ``F in R^{s x e}``: the ViT's patch tokens (class token dropped, final norm applied);
* optional HV-BiLSTM (official code, ``HVBiLSTM``): dropout, then a bidirectional LSTM
  along every row and one along every column of the token grid, outputs concatenated
  (``4 * lstm_units`` channels) and used *instead of* ``F`` (no residual, as in the code);
  ``lstm_form: keras`` (default) adds Keras' per-LSTM input dropout and initialisation;
* dropout, then ``A = F W`` with a bias-free ``W in R^{e x (K+1)}`` — background is class 0;
* Eq. 3: ``Z = softmax(A)`` over the K+1 classes of each patch;
* Eq. 2: ``y_k = max_i Z_i^k`` (global max pooling over patches);
* Eq. 1: ``L_MCE = mean_k BCE(t_k, y_k)`` over the K+1 classes; ``t_0``, the background
  label, is 1 where the image's mask has background pixels (``bg_label: gt``, default,
  official ``seg2multihot``; the manifest's ``no_background``) or always 1
  (``bg_label: always``, the paper's reading).

Equivariance loss (official code ``compute_cce_loss``; not in the paper): a second view is
classified and trained by cross entropy towards the stop-gradient, label-merged predictions
of the first view (:func:`merge_class_labels`: absent classes zeroed, each class divided by
its spatial max, renormalised per patch) put into the second view's geometry.
``eq_views: official`` (default): per image an independent patch-aligned crop (p 0.3),
resize and dihedral transform, four views tiled into one 2 x 2 mosaic and classified
together (:func:`official_views`, the code's ``merged_step``; view 2 is drawn from view 1, so
it shares view 1's colour jitter, where the code jitters it independently).
``eq_views: batch`` (earlier form): one transform ``T`` in {hflip, vflip, rot90, rot270} of
the whole batch, its predictions mapped back with ``f^{-1}`` (the token permutation of
:func:`pipeline.methods.common.tokens.inverse_token_permutation`). The target comes, as in
the code, from an extra dropout-free pass without gradients (``eq_target: eval``; ``train``:
the detached first-view pass of ``L_MCE``).

Baseline pseudo-mask (BPM): per patch, argmax of ``Z`` over background + the present
classes (``bpm_norm: none``, the paper/issue definition) or of the official
``merge_class_labels`` output (``bpm_norm: max``: each class first divided by its spatial
max).

Staged training (official ``main.py`` with ``model.warmup()`` / ``model.unfreeze()``;
``configs/voc12.yaml``: ``EPOCHS_WARMUP 1``, ``LR_WARMUP 1e-3``, ``LR 1e-4``,
``NUM_BLOCK_UNFREEZE 5``): ``unfreeze_blocks: N`` keeps every ViT parameter frozen except its
last ``N`` blocks and final norm (null: all trainable, the paper's reading); for the first
``freeze_warmup_iters`` iterations only the head (HV-BiLSTM and classifier) trains, the ViT
running under ``no_grad``, at ``warmup_lr_mult`` x the lr (the code's 1e-3 / 1e-4 = 10).
``fresh_optimizer_after_warmup: true`` (default, official: ``main.py`` compiles a new Adam
for the second phase) clears the optimiser state of every parameter at iteration
``freeze_warmup_iters`` (:meth:`ViTPCM.optimizer_resets`); ``false`` keeps the head's Adam
moments across the switch. The `voc` profile's ``adam_eps: 1e-7`` is Keras' Adam epsilon.

Seeds (:meth:`ViTPCM.maps`, :meth:`ViTPCM.finish_maps`): ``seeds.h5`` stores foreground
maps only, so the background probability is folded into the stored map:
``cams_k = Z_k / (Z_k + Z_0)`` (pairwise class-vs-background probability, in [0, 1]); the
arg-max over background + the present classes is then exactly
``maps_to_label(cams, bg_threshold=0.5)`` (``x / (x + c)`` grows with ``x``, ties go to
background in both), so the seeds evaluated at ``methods.vitpcm.eval_seeds.bg_threshold: 0.5``
ARE the BPM. Where the ratio is formed (``export_seeds.bpm_upsample``):

* ``probs`` (default, official ``main.py: test``): the label-merged distribution is upsampled
  to the image (both halves, bilinear) and the ratio formed per pixel, so the stored seeds
  are the code's ``argmax(resize(merge_class_labels(preds)))`` exactly;
* ``ratio`` (this project's earlier form): the ratio is formed at token resolution and
  upsampled (identical labels at the token centres, not between them).

With several export scales / flips the maps are averaged (``norm: mean``), a multi-scale BPM.
``probs`` keeps the raw foreground probabilities ``Z_k`` (averaged too).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.engine.runtime import eval_mode
from pipeline.models.vit import input_stride
from pipeline.methods.common.tokens import SPATIAL_TRANSFORMS, transform_image
from pipeline.methods.base import Method
from pipeline.methods.vitpcm.losses import (EQ_VIEWS, equivariance_loss, mce_loss, merge_class_labels,
                                            merged_cross_entropy, mosaic_tiles, official_views,
                                            undo_dihedral, with_background)
from pipeline.methods.vitpcm.model import PCMClassifier, pcm_scores


class ViTPCM(Method):
    name = "vitpcm"
    seed_keys = ("cams", "probs")
    aux_keys = ("bpm_bg", "bpm_fg")

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        return PCMClassifier(p, num_classes)

    def param_groups(self, model, p):
        """With ``freeze_warmup_iters > 0`` (staged training, module docstring): the ViT at
        1x and the head at ``warmup_lr_mult`` x the lr for the warm-up iterations, then 1x
        (a piecewise multiplier, :func:`pipeline.engine.trainer.mult_at`); else one group."""
        w = int(p.get("freeze_warmup_iters") or 0)
        if w <= 0:
            return None
        head = [q for name, q in model.named_parameters() if not name.startswith("vit.")]
        return [{"params": list(model.vit.parameters()), "lr_mult": 1.0},
                {"params": head, "lr_mult": [[0, float(p.get("warmup_lr_mult", 10.0))], [w, 1.0]]}]

    @staticmethod
    def _eq_target(model, x, z1, p):
        """View-1 probabilities the equivariance target is built from: ``eq_target: eval``
        (default, official ``VITPCM.train_step``: ``outputs_sg = self(images,
        training=False)`` outside the gradient tape, i.e. a dropout-free forward without
        gradients) or ``train`` (the training-mode forward of ``L_MCE``, detached).

        Raises:
            ValueError: unknown ``eq_target``.
        """
        form = p.get("eq_target", "eval")
        if form == "train":
            return z1
        if form != "eval":
            raise ValueError(f"methods.vitpcm.eq_target must be eval or train, got {form!r}")
        with eval_mode(model), torch.no_grad():
            return pcm_scores(model(x))[0]

    def optimizer_resets(self, p):
        """``(freeze_warmup_iters,)`` when the staged training is on and
        ``fresh_optimizer_after_warmup`` (default true: the official ``main.py`` compiles a fresh
        Keras Adam after the warm-up epoch); else ``()``."""
        w = int(p.get("freeze_warmup_iters") or 0)
        return (w,) if w > 0 and p.get("fresh_optimizer_after_warmup", True) else ()

    def wants_background_label(self, p):
        """``bg_label: gt`` (default; official ``dataloader.py``: ``seg2multihot`` of the
        training mask, so ``t_0 = 1`` only when the mask has background pixels): True, the
        trainer hands :meth:`loss` ``(B, K+1)`` labels, background first, from the manifest's
        ``no_background``. ``always`` (the paper's reading of Eq. 1, ``t_0 = 1``): False.

        Raises:
            ValueError: another ``bg_label``.
        """
        form = p.get("bg_label", "gt")
        if form not in ("gt", "always"):
            raise ValueError(f"methods.vitpcm.bg_label must be gt or always, got {form!r}")
        return form == "gt"

    def extra_views(self, p):
        """``eq_views: official`` with ``eq_view_source: base`` (default; official
        ``dataloader.py: _preprocess_image``: view 2 from the resized image with its own
        ``color_transform``): ``"base"``. ``view1`` (view 2 made from view 1; profiles that crop
        view 1, where the resized image is not view 1's frame), or ``eq_views: batch``, or no
        equivariance: None.

        Raises:
            ValueError: another ``eq_view_source``.
        """
        form = p.get("eq_view_source", "base")
        if form not in ("base", "view1"):
            raise ValueError(f"methods.vitpcm.eq_view_source must be base or view1, got {form!r}")
        on = (form == "base" and p.get("eq_views", "official") == "official"
              and bool(p.get("equivariance", True)) and float(p.get("eq_weight", 1.0)) > 0)
        return "base" if on else None

    def loss(self, model, x, y, p, generator, base=None, base_code=None):
        """``L_MCE`` (Eq. 1) + ``eq_weight * L_eq`` (+ ``classifier_l2 * ||W||^2``).

        ``y``: ``(B, K+1)`` labels with the background first (``bg_label: gt``, from the
        trainer) or ``(B, K)`` foreground labels, completed with ``t_0 = 1``
        (:func:`with_background`).

        ``equivariance: true``: ``eq_views: official`` (default; official ``merged_step`` +
        ``compute_cce_loss``): per image an independent crop (``eq_crop`` px, probability
        ``eq_crop_p``, default 0.3) / resize (``eq_scale`` px) / dihedral view, four views per
        2 x 2 mosaic, CE towards the target put through the same transforms
        (:func:`official_views`; ``eq_crop`` / ``eq_scale`` null: a third / a half of the
        input side, down to a multiple of the token stride = the code's 128 / 192 at 384).
        With ``base`` / ``base_code`` (:meth:`extra_views`) the views are made from
        ``base`` and the target is view 1's, un-flipped to ``base`` per image
        (:func:`undo_dihedral`, official ``revert_affine_transform``); else from ``x``.
        ``eq_views: batch`` (this project's earlier form): one of ``eq_transforms`` for the
        whole batch (generator), exact token permutation back. During the first
        ``freeze_warmup_iters`` iterations (:attr:`iteration`) the ViT runs under no_grad
        (head-only warm-up).

        Raises:
            ValueError: unknown ``eq_views`` / ``eq_transforms``, or an ``official`` view that
                the batch cannot form (:func:`official_views`).
        """
        model.vit_frozen = self.iteration < int(p.get("freeze_warmup_iters") or 0)
        t_lab = y if y.shape[1] == model.classifier.out_features else with_background(y)
        z1, y1 = pcm_scores(model(x))
        l_mce = mce_loss(y1, t_lab)
        loss, parts = l_mce, {"mce": l_mce.item()}
        views = p.get("eq_views", "official")
        if views not in EQ_VIEWS:
            raise ValueError(f"methods.vitpcm.eq_views must be one of {EQ_VIEWS}, got {views!r}")
        w_eq = float(p.get("eq_weight", 1.0))
        if p.get("equivariance", True) and w_eq > 0:
            spatial_norm = bool(p.get("eq_spatial_norm", True))
            if views == "official":
                stride, S = input_stride(model), x.shape[-1]
                crop = int(p.get("eq_crop") or max(stride, S // 3 // stride * stride))
                scale = int(p.get("eq_scale") or max(stride, S // 2 // stride * stride))
                src, target = x, self._eq_target(model, x, z1, p).detach()
                if base is not None:
                    src = base
                    target = torch.stack([undo_dihedral(t, tuple(bool(v) for v in c.tolist()), (0, 1))
                                          for t, c in zip(target, base_code)])
                mosaics, target, _ = official_views(src, target, stride, crop,
                                                    float(p.get("eq_crop_p", 0.3)), scale, generator)
                z2 = mosaic_tiles(pcm_scores(model(mosaics))[0])
                l_eq = merged_cross_entropy(target, z2, t_lab[:len(z2)], spatial_norm)
            else:
                choices = list(p.get("eq_transforms", ["hflip", "vflip", "rot90", "rot270"]))
                bad = [c for c in choices if c not in SPATIAL_TRANSFORMS]
                if bad or not choices:
                    raise ValueError(f"methods.vitpcm.eq_transforms must be a non-empty subset of "
                                     f"{SPATIAL_TRANSFORMS}, got {choices}")
                t = choices[int(torch.randint(len(choices), (1,), generator=generator))]
                z2, _ = pcm_scores(model(transform_image(x, t)))
                l_eq = equivariance_loss(self._eq_target(model, x, z1, p), z2, t_lab, t, spatial_norm)
            loss = loss + w_eq * l_eq
            parts["eq"] = l_eq.item()
        l2 = float(p.get("classifier_l2", 0.0))
        if l2 > 0:
            reg = l2 * model.classifier.weight.pow(2).sum()
            loss = loss + reg
            parts["l2"] = reg.item()
        return loss, parts

    @torch.no_grad()
    def maps(self, model, x, fg, p):
        """Maps of the classes ``fg`` at token resolution (stored maps: module docstring).

        ``bpm_upsample: probs`` (default; official ``main.py: test``: ``merge_class_labels``
        of the predictions, bilinear ``resize`` (``align_corners=True``) to the image, then the
        arg-max): ``{"bpm_bg": (1, h, w), "bpm_fg": (k, h, w), "probs": (k, h, w)}``, the
        label-merged distribution over background + the present classes (each patch
        renormalised, :func:`merge_class_labels`), split into its background and foreground
        channels; :meth:`finish_maps` forms ``cams = fg / (fg + bg)`` after the upsampling, so
        ``cams > 0.5`` at a pixel is the official arg-max of the upsampled distribution.
        ``ratio`` (this project's earlier form): ``{"cams": Z_k / (Z_k + Z_0), "probs"}``, the
        ratio taken at token resolution and upsampled itself (the same labels at token
        resolution, slightly different ones between token centres).

        Args:
            x: ``(1, 3, H, W)``; fg: ``(k,)`` 0-based foreground indices (class id - 1).
            p: ``export_seeds`` params; ``bpm_norm: max`` applies the official per-class
                spatial max normalisation (over background + present classes) first.
        Returns:
            float32 maps in [0, 1] as above.
        Raises:
            ValueError: unknown ``bpm_norm`` / ``bpm_upsample``, or ``bpm_upsample: probs``
                with an ``export_seeds.norm`` other than ``mean`` (a per-channel max / min-max
                would rescale the two halves of the distribution apart).
        """
        norm, order = p.get("bpm_norm", "none"), p.get("bpm_upsample", "probs")
        if norm not in ("none", "max"):
            raise ValueError(f"methods.vitpcm.bpm_norm must be none or max, got {norm!r}")
        if order not in ("probs", "ratio"):
            raise ValueError(f"methods.vitpcm.bpm_upsample must be probs or ratio, got {order!r}")
        z = model(x)[0].softmax(-1)                         # (h, w, K+1)
        keep = torch.cat([torch.zeros(1, dtype=torch.long, device=fg.device), fg + 1])
        probs = z[..., fg + 1].permute(2, 0, 1).contiguous()
        if order == "probs":
            if p.get("norm", "mean") != "mean":
                raise ValueError("methods.vitpcm.bpm_upsample: probs needs export_seeds.norm: mean "
                                 f"(got {p.get('norm')!r}); set bpm_upsample: ratio for other norms")
            t = torch.zeros(z.shape[-1], dtype=z.dtype, device=z.device)
            t[keep] = 1
            q = merge_class_labels(z[None], t[None], spatial_norm=norm == "max")[0][..., keep]
            q = q.permute(2, 0, 1)
            return {"bpm_bg": q[:1].contiguous(), "bpm_fg": q[1:].contiguous(), "probs": probs}
        sel = z[..., keep]
        if norm == "max":
            sel = sel / sel.flatten(0, 1).amax(0).clamp_min(1e-12)
        bg, fgz = sel[..., :1], sel[..., 1:]
        cams = fgz / (fgz + bg).clamp_min(1e-12)
        return {"cams": cams.permute(2, 0, 1).contiguous(), "probs": probs}

    def finish_maps(self, maps, p):
        """``bpm_upsample: probs``: ``cams = bpm_fg / (bpm_fg + bpm_bg)`` (0 where both are 0,
        i.e. background, as the official arg-max of an all-zero patch) on the merged,
        upsampled maps. ``bpm_fg`` and ``bpm_bg`` (the latter repeated to one channel per
        class: every stored map has the image's k channels) are kept too - the distribution
        itself, the input of the official CRF (``main.py test --crf``), read by
        ``make_pseudo_labels.source: seeds`` (:func:`pipeline.steps.pseudo.read_distribution`).
        Other maps pass unchanged.

        Args:
            maps: ``{"bpm_bg": (1, H, W), "bpm_fg": (k, H, W), ...}`` float32 (or already
                ``{"cams", ...}``).
        Returns:
            ``{"cams": (k, H, W) float32 in [0, 1], "bpm_fg": (k, H, W), "bpm_bg": (k, H, W),
            "probs": ...}``.
        """
        if "bpm_fg" not in maps:
            return maps
        fgm, bgm = maps["bpm_fg"], maps["bpm_bg"]
        out = {**maps, "bpm_bg": bgm.expand_as(fgm)}
        out["cams"] = fgm / (fgm + bgm).clamp_min(1e-12)
        return out
