"""Multi-scale + flip inference: the one implementation behind every "run the network at
several scales and on the mirrored image, bring the outputs back to image size and merge
them" in the pipeline.

Callers (each passes its merge semantics explicitly; see their docstrings for the source):

* :func:`pipeline.steps.seeds.multiscale_maps` (seed export of every method),
* :func:`pipeline.steps.own_seg.predict_own` (a method's own segmentation head),
* :func:`pipeline.steps.segment_eval.predict_protocols` (DeepLab-v2 test-time augmentation),
* :func:`pipeline.methods.afa.model.train_time_cams` and
  :func:`pipeline.methods.mcc.model.train_time_cams`
  (official ``multi_scale_cam`` of rulixiang/afa and rulixiang/ToCo ``utils/camutils.py``).

The order of every floating-point operation is part of the contract (callers' outputs are
kept bit-identical across refactors), so the options spell out not only *what* is merged
but also *when* ReLU, the cast to float32 and the sums happen.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

Maps = Union[torch.Tensor, Mapping[str, torch.Tensor]]

RESIZE = ("stride", "round", "floor")
RELU = ("none", "before_upsample", "after_upsample", "after_flip_merge")
FLIP_MERGE = ("sum", "mean", "max")
SCALE_MERGE = ("sum", "mean", "max")
FOLD = ("nested", "flat")
NORM = ("none", "passes", "max", "minmax")


def scaled_size(H: int, W: int, s: float, resize: str, stride: int | None = None) -> tuple[int, int]:
    """Input size of scale ``s`` for an ``H x W`` base.

    ``stride``: ``max(stride, round(H s / stride) stride)`` (ViT methods: a multiple of the
    token stride); ``round``: ``max(1, round(H s))`` (DeepLab); ``floor``: ``int(s H)``
    (official ``multi_scale_cam``).
    """
    if resize == "stride":
        if not stride:
            raise ValueError("resize='stride' needs the token stride")
        return (max(stride, int(round(H * s / stride)) * stride),
                max(stride, int(round(W * s / stride)) * stride))
    if resize == "round":
        return max(1, int(round(H * s))), max(1, int(round(W * s)))
    if resize == "floor":
        return int(s * H), int(s * W)
    raise ValueError(f"resize must be one of {RESIZE}, got {resize!r}")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"multiscale_flip: {name} must be one of {allowed}, got {value!r}")


def normalise(m: torch.Tensor, norm: str, eps: float = 1e-5, passes: int = 1) -> torch.Tensor:
    """Per image and channel normalisation of ``(B, K, H, W)`` maps.

    ``none``; ``passes``: ``M / passes`` (mean over forward passes); ``max``:
    ``M / (max M + eps)`` (PSA/IRN); ``minmax``: ``(M - min) / (max - min + eps)``
    (AFA/ToCo/MCC ``multi_scale_cam``: ``cam + maxpool(-cam)``, ``/= maxpool(cam) + 1e-5``,
    the same numbers). Empty maps are returned as they are.
    """
    _check("norm", norm, NORM)
    if norm == "none":
        return m
    if norm == "passes":
        return m / passes
    if m.numel() == 0:
        return m
    mx = m.amax((-2, -1), keepdim=True)
    if norm == "max":
        return m / (mx + eps)
    mn = m.amin((-2, -1), keepdim=True)
    return (m - mn) / (mx - mn + eps)


def multiscale_flip(forward: Callable[[torch.Tensor], Maps], x: torch.Tensor,
                    scales: Sequence[float] = (1.0,), *, flips: Sequence[bool] = (False, True),
                    flip_batch: bool = False, resize: str = "stride", stride: int | None = None,
                    base_size: tuple[int, int] | None = None, relu: str = "none",
                    softmax: bool = False, mode: str = "bilinear", align_corners: bool = False,
                    flip_merge: str = "sum", scale_merge: str = "sum", fold: str = "nested",
                    norm: str = "none", norm_eps: float = 1e-5,
                    on_pass: Callable[[float, bool, Maps], None] | None = None) -> Maps:
    """Run ``forward`` over ``scales`` x ``flips`` and merge at the size of ``x``.

    Args:
        forward: the per-pass function: a resized, possibly mirrored ``(N, 3, h, w)`` batch ->
            ``(N, K, h', w')`` maps/logits, or a dict of those (each key merged on its own).
            Label masking (a method's present classes) and autocast live in ``forward``.
        x: ``(B, 3, H, W)`` images; the outputs are brought back to ``(H, W)``.
        scales: input scale factors, in this order.
        flips: which orientations run per scale, in this order (``(False, True)``: image and
            mirror; ``(False,)``: no flip; ``(True,)``: the mirror only).
        flip_batch: run the orientations of a scale as one concatenated batch (one forward)
            instead of one forward each.
        resize / stride / base_size: input size per scale (:func:`scaled_size` of
            ``base_size``, default ``(H, W)``; e.g. ACR's square ``crop``). ``round`` and
            ``floor`` feed ``x`` itself at scale 1.0 (when ``base_size`` is ``(H, W)``);
            ``stride`` always resizes. The input resize is bilinear, ``align_corners=False``.
        relu: ``none``; ``before_upsample`` (at the network's output resolution, per pass);
            ``after_upsample`` (per pass, after upsampling and flipping back, before the
            flip merge); ``after_flip_merge`` (on the flip-merged map of each scale, before
            the scale merge; official ``multi_scale_cam``).
        softmax: softmax over channels of each upsampled pass (class probabilities).
        mode / align_corners: of the upsampling to ``(H, W)``. Each pass is upsampled in
            the dtype ``forward`` returned, then cast to float32.
        flip_merge: ``sum`` | ``mean`` (sum / number of orientations) | ``max`` over the
            orientations of one scale (mirrored outputs are flipped back first).
        scale_merge: ``sum`` | ``mean`` (sum / number of scales) | ``max`` over scales.
        fold: ``nested`` (merge the orientations of a scale, then fold that into the scale
            accumulator) or ``flat`` (fold every pass into one running sum in pass order;
            needs ``flip_merge == scale_merge == "sum"`` and no ``after_flip_merge`` ReLU).
            Only the floating-point summation order differs.
        norm / norm_eps: :func:`normalise` after the scale merge (``passes`` divides by the
            number of forward passes, i.e. ``len(scales) * len(flips)``).
        on_pass: called with ``(scale, flipped, maps)`` for each pass after upsampling,
            softmax, flip-back and a per-pass ReLU (e.g. to keep the single-scale result).

    Returns:
        float32 ``(B, K, H, W)`` (or a dict of those, as ``forward`` returns).
    Raises:
        ValueError: an unknown option, empty ``scales`` / ``flips`` or an invalid ``fold``.
    """
    for name, value, allowed in (("resize", resize, RESIZE), ("relu", relu, RELU),
                                 ("flip_merge", flip_merge, FLIP_MERGE),
                                 ("scale_merge", scale_merge, SCALE_MERGE), ("fold", fold, FOLD),
                                 ("norm", norm, NORM)):
        _check(name, value, allowed)
    scales, flips = list(scales), [bool(f) for f in flips]
    if not scales or not flips:
        raise ValueError(f"multiscale_flip needs scales and flips, got {scales}, {flips}")
    if fold == "flat" and not (flip_merge == scale_merge == "sum" and relu != "after_flip_merge"):
        raise ValueError("multiscale_flip: fold='flat' needs flip_merge = scale_merge = 'sum' "
                         "and no 'after_flip_merge' ReLU")
    B, _, H, W = x.shape
    H0, W0 = base_size or (H, W)
    same_base = (H0, W0) == (H, W)

    def post(m: torch.Tensor) -> torch.Tensor:
        """One forward's output (any batch) -> upsampled float32 (and softmax)."""
        if relu == "before_upsample":
            m = F.relu(m)
        up = F.interpolate(m, size=(H, W), mode=mode, align_corners=align_corners).float()
        return up.softmax(1) if softmax else up

    def per_key(out: Maps, fn) -> Maps:
        return {k: fn(v) for k, v in out.items()} if isinstance(out, Mapping) else fn(out)

    acc: Maps | None = None
    passes = 0

    def fold_in(acc, m, how):
        if acc is None:
            return m
        if isinstance(m, Mapping):
            return {k: fold_in(acc[k], v, how) for k, v in m.items()}
        return torch.maximum(acc, m) if how == "max" else acc + m

    for s in scales:
        if resize != "stride" and same_base and float(s) == 1.0:
            xs = x
        else:
            xs = F.interpolate(x, size=scaled_size(H0, W0, s, resize, stride), mode="bilinear",
                               align_corners=False)
        inputs = [xs.flip(-1) if f else xs for f in flips]
        if flip_batch and len(flips) > 1:
            big = per_key(forward(torch.cat(inputs, 0)), post)
            outs = [per_key(big, lambda v, i=i: v[i * B:(i + 1) * B]) for i in range(len(flips))]
        else:
            outs = [per_key(forward(inp), post) for inp in inputs]
        passes += len(flips)
        merged = None
        for f, out in zip(flips, outs):
            if f:
                out = per_key(out, lambda v: v.flip(-1))
            if relu == "after_upsample":
                out = per_key(out, lambda v: v.clamp_min(0))
            if on_pass is not None:
                on_pass(float(s), f, out)
            if fold == "flat":
                acc = fold_in(acc, out, "sum")
            else:
                merged = fold_in(merged, out, "max" if flip_merge == "max" else "sum")
        if fold == "flat":
            continue
        if flip_merge == "mean" and len(flips) > 1:
            merged = per_key(merged, lambda v: v / len(flips))
        if relu == "after_flip_merge":
            merged = per_key(merged, F.relu)
        acc = fold_in(acc, merged, "max" if scale_merge == "max" else "sum")
    if scale_merge == "mean":
        acc = per_key(acc, lambda v: v / len(scales))
    return per_key(acc, lambda v: normalise(v, norm, norm_eps, passes))


#: official ``multi_scale_cam`` (rulixiang/afa and rulixiang/ToCo ``utils/camutils.py``; MCC
#: reuses ToCo's): per scale ``int(s H) x int(s W)`` (scale 1.0 = the input itself), image and
#: mirror in one batch, the raw CAMs upsampled (bilinear, ``align_corners=False``), max over
#: image and flip, ReLU, summed over scales, per-class min-max with eps 1e-5.
OFFICIAL_MS_CAM = dict(resize="floor", relu="after_flip_merge", flip_merge="max",
                       scale_merge="sum", norm="minmax", norm_eps=1e-5)
