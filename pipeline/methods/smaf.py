"""SMAF: self-training with multi-scale attention fusion (Yang, Zhu, Zhang, CVPR-W 2023,
``shared/papers/smaf-multi-scale-attention-fusion.txt``; official code
``bupt-ai-cz/SMAF``, digest in ``shared/reference/official-settings.md``).

A frozen teacher — the trained classifier of another method of this pipeline
(``methods.smaf.train_cls.teacher``: ``cam`` default, ``acr`` possible), loaded by the trainer from
``results/{dataset}/{teacher}/cls/model.pt`` — produces targets for a student CAM network:

* Eq. 2: class-aware maps ``M = ReLU(f(I))`` of the teacher (its own ``maps``: CAM
  ``ReLU(W F)`` for ``cam``, Eq. 7/8 maps for ``acr``);
* Eq. 6: ``M_k = sum_s M_s^k`` over the teacher scales (0.5, 1, 1.5, 2) and their flips,
  each resized (bilinear) to the original-scale map (the student's token grid);
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

Departure from the code (where it computes the targets): ``gen_fused_cam.py`` fuses the
teacher's maps on the whole original image (scales of the full image, flip, sum, max over the
whole image) and ``transform_with_mask`` crops / flips them with the image; here the teacher
runs on the student's augmented crop, per batch (the max is the crop's). Nothing stores
full-image teacher maps for train_aug (the official ``.npy`` dump per image), and the fusion
on the crop costs 8 teacher passes per sample instead of 8 per image once.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.cnn_cam import CNNCAM
from pipeline.models.vit import input_stride, patch_grid, patch_tokens
from pipeline.methods.base import Method, ViTClassifier, multilabel_loss


def fuse_maps(maps: list[torch.Tensor], size: tuple[int, int], eps: float = 1e-5) -> torch.Tensor:
    """Eq. 5-6: resize every map to ``size`` (bilinear), sum, divide each channel by its max.

    Args:
        maps: list of ``(B, K, h_s, w_s)`` float, >= 0 (one per scale / flip, flips already
            undone).
        size: ``(h, w)`` of the original-scale map.
    Returns:
        ``(B, K, h, w)`` in [0, 1]; an all-zero channel stays 0.
    """
    acc = 0
    for m in maps:
        acc = acc + F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
    mx = acc.flatten(2).amax(-1)[..., None, None]
    return acc / (mx + eps)


def denoise(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Zero the channels of classes absent from the labels. ``f (B, K, h, w)``, ``y (B, K)``."""
    return f * y[:, :, None, None].to(f.dtype)


def reactivate(f: torch.Tensor, thr: float = 0.2) -> torch.Tensor:
    """Eq. 8: stack a background channel ``thr``, divide every pixel by its channel max.

    Args:
        f: ``(B, K, h, w)`` in [0, 1] (denoised fused maps); thr > 0.
    Returns:
        ``(B, K+1, h, w)``: channel 0 = reactivated background, 1.. = foreground; each
        pixel's max over channels is 1.
    Raises:
        ValueError: ``thr <= 0`` (the division would be undefined on all-zero pixels).
    """
    if thr <= 0:
        raise ValueError(f"methods.smaf.reactivate_thr must be > 0, got {thr}")
    full = torch.cat([torch.full_like(f[:, :1], thr), f], 1)
    return full / full.amax(1, keepdim=True)


def mac_loss(target: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Eq. 7/9: ``1/K sum_k 1/(hw) sum_ij (F'^k - M_o^k)^2``, averaged over the batch.

    ``target, student: (B, K, h, w)``.
    """
    return (target - student).pow(2).mean()


def student_maps(model: ViTClassifier, x: torch.Tensor, norm: str = "max",
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """One student pass: ``(logits (B, K), M_o (B, K, h, w))``.

    ``M_o = ReLU(W F)`` (token grid), divided per image and class by its max when
    ``norm == "max"`` (differentiable); ``norm == "none"`` keeps the raw ReLU map.
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
    return logits, cam.reshape(x.shape[0], -1, h, w)


STUDENT_TARGETS = ("softmax_bg", "foreground")


def student_maps_bg(model: ViTClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Official student map (``adaptation_modelv2.py``: softmax over all K+1 channels).

    Args:
        model: student with ``classifier`` (K rows) and ``bg_classifier`` (1 row), both
            bias-free ``Linear(D, .)`` (built by :meth:`SMAF.build_model` with
            ``student_target: softmax_bg``).
        x: ``(B, 3, H, W)`` normalised images.
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
    cam = torch.einsum("kd,bnd->bkn", w, f).softmax(1)
    h, w_ = patch_grid(model.vit, x.shape[-2], x.shape[-1])
    return logits, cam.reshape(x.shape[0], -1, h, w_)


@torch.no_grad()
def teacher_class_maps(method: Method, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       p: dict, key: str | None = None) -> torch.Tensor:
    """Teacher class-aware maps ``(B, K, h, w)`` (>= 0) of one scale/flip of a batch.

    CAM-type teachers run batched, ``ReLU(W F)`` for all K classes: a
    :class:`ViTClassifier` with a pooled head (``h, w`` = its token grid) or a CNN CAM
    (:class:`pipeline.models.cnn_cam.CNNCAM`, ``h, w`` = its feature map; the ``vocsample``
    ``cam``). Any other method calls its ``maps`` per image for the present classes only,
    absent channels are 0 (they are zeroed by :func:`denoise` anyway). ``key`` selects the
    map kind (default: the method's first ``seed_keys``).
    """
    B, K = y.shape
    if isinstance(model, CNNCAM):
        return model.cams(x)
    h, w = patch_grid(model.vit, x.shape[-2], x.shape[-1])
    if isinstance(model, ViTClassifier) and model.head_type in ("gmp", "gap"):
        _, f = patch_tokens(model.vit, x)
        cam = F.relu(torch.einsum("kd,bnd->bkn", model.classifier.weight, f))
        return cam.reshape(B, K, h, w)
    out = torch.zeros(B, K, h, w, device=x.device)
    key = key or method.seed_keys[0]
    for b in range(B):
        fg = y[b].nonzero().flatten()
        if len(fg):
            out[b, fg] = method.finish_maps(method.maps(model, x[b:b + 1], fg, p), p)[key].float().clamp_min(0)
    return out


def fused_teacher_targets(method: Method, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          grid: tuple[int, int], scales=(0.5, 1.0, 1.5, 2.0), flip: bool = True,
                          reactivate_thr: float | None = 0.2, map_params: dict | None = None,
                          key: str | None = None, keep_background: bool = False) -> torch.Tensor:
    """SMAF target of a batch: Eq. 5-6 fusion, denoising, Eq. 8 reactivation.

    Args:
        x: ``(B, 3, S, S)`` the student's (augmented) batch; y: ``(B, K)`` multi-hot labels.
        grid: the student's token grid at scale 1.
        scales: image scales; each is resized to a multiple of the teacher's stride (token
            stride of a ViT, feature-map cell of a CNN CAM).
        reactivate_thr: background value of Eq. 8, or None to skip reactivation.
        keep_background: return the reactivated background channel too (official target
            ``rectified``, for ``student_target: softmax_bg``).
    Returns:
        ``(B, K, h, w)`` float32 in [0, 1] (foreground channels), or ``(B, K+1, h, w)``
        background first with ``keep_background``.
    Raises:
        ValueError: ``keep_background`` without reactivation (no background channel).
    """
    if keep_background and reactivate_thr is None:
        raise ValueError("methods.smaf student_target softmax_bg needs reactivate: true (the "
                         "background channel of the target is Eq. 8's)")
    stride = input_stride(model)      # the teacher's: a ViT's token stride or a CNN's cell
    maps = []
    for s in scales:
        hs = max(stride, int(round(x.shape[-2] * s / stride)) * stride)
        ws = max(stride, int(round(x.shape[-1] * s / stride)) * stride)
        xs = F.interpolate(x, size=(hs, ws), mode="bilinear", align_corners=False) \
            if (hs, ws) != tuple(x.shape[-2:]) else x
        for fl in ([False, True] if flip else [False]):
            m = teacher_class_maps(method, model, xs.flip(-1) if fl else xs, y, map_params or {}, key)
            maps.append(m.flip(-1) if fl else m)
    f = denoise(fuse_maps(maps, grid), y)
    if reactivate_thr is None:
        return f
    r = reactivate(f, float(reactivate_thr))
    return r if keep_background else r[:, 1:]


class SMAF(Method):
    name = "smaf"
    seed_keys = ("cams",)

    def __init__(self):
        self.teacher: tuple[Method, nn.Module] | None = None

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
        thr = float(p.get("reactivate_thr", 0.2)) if p.get("reactivate", True) else None
        return fused_teacher_targets(tm, tmodel, x, y, grid,
                                     scales=p.get("teacher_scales", [0.5, 1.0, 1.5, 2.0]),
                                     flip=bool(p.get("teacher_flip", True)), reactivate_thr=thr,
                                     map_params=p.get("teacher_maps", {}),
                                     key=p.get("teacher_key"), keep_background=keep_background)

    def loss(self, model, x, y, p, generator):
        """``cls_weight * L_cls + alpha * L_mac`` on one batch: ``cls_weight`` 0 (default) is
        the official student step (``adaptation_modelv2.py``: ``loss_cls`` commented out,
        ``100 * loss_cam`` alone); 1 is the paper's Eq. 1. ``L_cls`` is logged either way.

        ``student_target: softmax_bg`` (official): MSE between the student's K+1-channel
        softmax (:func:`student_maps_bg`) and the reactivated target with its background
        channel; ``foreground`` (paper): MSE of ``ReLU(W F)/max`` against ``F'`` over the K
        foreground channels. Returns ``(loss, {"cls", "mac"})``.

        Raises:
            ValueError: unknown ``student_target``; ``softmax_bg`` with ``reactivate: false``
                or a student without ``bg_classifier``.
        """
        tgt = p.get("student_target", "softmax_bg")
        if tgt == "softmax_bg":
            logits, mo = student_maps_bg(model, x)
        elif tgt == "foreground":
            logits, mo = student_maps(model, x, p.get("student_norm", "max"))
        else:
            raise ValueError(f"methods.smaf.student_target must be one of {STUDENT_TARGETS}, got {tgt!r}")
        target = self.targets(x, y, tuple(mo.shape[-2:]), p, keep_background=tgt == "softmax_bg")
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
