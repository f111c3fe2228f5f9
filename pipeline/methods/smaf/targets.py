"""SMAF's teacher targets (Yang, Zhu, Zhang, CVPR-W 2023; official code bupt-ai-cz/SMAF):
the multi-scale fusion (Eq. 5-6), denoising, reactivation (Eq. 8), the L_mac distance, and
the offline maps' crop (``teacher_targets: image``). The method and its module documentation:
:mod:`pipeline.methods.smaf`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.transforms import denormalise
from pipeline.models.backbones import model_normalisation
from pipeline.models.cnn_cam import CNNCAM
from pipeline.models.vit import input_stride, patch_grid, patch_tokens
from pipeline.methods.base import Method, ViTClassifier


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


TEACHER_TARGETS = ("image", "crop")
#: the offline maps are kept at 1/OFFLINE_STRIDE of the image's resolution (memory: VOC's
#: train_aug at full resolution would be ~6 GB); the loss grid is 1/4 of the crop anyway
OFFLINE_STRIDE = 4
#: ``teacher_targets: image``: the loss is taken at 1/LOSS_STRIDE of the crop (official
#: ``F.interpolate(target_lpsoft, scale_factor=0.25, ...)``)
LOSS_STRIDE = 4


def teacher_input(x: torch.Tensor, student: nn.Module, teacher: nn.Module) -> torch.Tensor:
    """The student's normalised batch ``x (B, 3, H, W)`` in the teacher's input statistics
    (``model.input_norm``, :func:`pipeline.models.backbones.model_normalisation`); ``x``
    itself when they are equal."""
    s, t = model_normalisation(student), model_normalisation(teacher)
    if tuple(map(tuple, s)) == tuple(map(tuple, t)):
        return x
    m = torch.tensor(t[0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    sd = torch.tensor(t[1], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (denormalise(x, *s) - m) / sd


def crop_like_image(maps: torch.Tensor, geometry, size: tuple[int, int]) -> torch.Tensor:
    """Maps of a whole image cropped as its training crop was (official bupt-ai-cz/SMAF
    ``data/VOC_dataset.py: transform_with_mask`` on ``lpsoft``): resized to the rescaled image
    (bilinear), flipped, and read at the crop's pixels; the crop's padding gets 0.

    Args:
        maps: ``(k, h_s, w_s)`` float maps of the whole original image (any resolution).
        geometry: the dataset's ``(index, h', w', flip, dy, dx)``
            (:func:`pipeline.data.datasets.random_scale_crop`: crop pixel ``(r, c)`` = pixel
            ``(r + dy, c + dx)`` of the image rescaled to ``h' x w'`` and flipped).
        size: ``(H, W)`` of the crop.
    Returns:
        ``(k, H, W)`` float32.
    """
    _, nh, nw, flip, dy, dx = (int(v) for v in geometry)
    m = F.interpolate(maps[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
    if flip:
        m = m.flip(-1)
    H, W = size
    out = m.new_zeros((m.shape[0], H, W))
    r0, r1, c0, c1 = max(0, -dy), min(H, nh - dy), max(0, -dx), min(W, nw - dx)
    if r1 > r0 and c1 > c0:
        out[:, r0:r1, c0:c1] = m[:, r0 + dy:r1 + dy, c0 + dx:c1 + dx]
    return out
