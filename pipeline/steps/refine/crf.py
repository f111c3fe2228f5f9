"""Fully connected (dense) CRF over class-probability maps, and PSA-style CRF labels from CAMs.

Thin wrapper over ``pydensecrf`` (the ``pydensecrf2`` wheel; Krähenbühl & Koltun, NeurIPS
2011). The defaults are the PSA settings (official PSA code ``tool/imutils.crf_inference``,
see ``official-settings.md`` "Dense CRF settings in use"):

    gaussian   sxy 3,  compat 3
    bilateral  sxy 80, srgb 13, compat 10
    10 mean-field iterations; unary = -log(clip(scores, 1e-5, 1)).

Class-id conventions follow :mod:`pipeline.data.voc`: channel 0 of a "with background" stack
is background (class 0); the remaining channels carry the image's foreground class ids.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pydensecrf.densecrf as dcrf

from pipeline.io.settings import PSA_CRF   # PSA defaults (official PSA code), re-exported here

#: Probabilities are clipped to ``[PROB_CLIP, 1]`` before ``-log`` (as pydensecrf's
#: ``unary_from_softmax`` does by default).
PROB_CLIP = 1e-5

#: Keyword names accepted by :func:`dense_crf` (and hence the keys of the ``crf`` dicts).
CRF_KEYS = ("gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb",
            "bilateral_compat", "iters")


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    return np.ascontiguousarray(image)


def dense_crf(image: np.ndarray, probs: np.ndarray, *, gaussian_sxy: float = 3,
              gaussian_compat: float = 3, bilateral_sxy: float = 80,
              bilateral_srgb: float = 13, bilateral_compat: float = 10,
              iters: int = 10) -> np.ndarray:
    """Mean-field inference of a dense CRF with Potts compatibilities.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image (the bilateral kernel's colour features).
        probs: ``(C, H, W)`` float scores in [0, 1], ``C >= 1``. They need not sum to 1 per
            pixel (PSA feeds ``[(1 - max cam)^alpha; cams]`` unnormalised); the unary is
            ``-log(clip(probs, 1e-5, 1))``.
        gaussian_sxy, gaussian_compat: spatial smoothness kernel (std in pixels, weight).
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel (spatial std in
            pixels, colour std in intensity units, weight).
        iters: number of mean-field iterations (``0`` returns the normalised input).

    Returns:
        ``(C, H, W)`` float32 marginals; each pixel sums to 1. With ``iters=0`` or both compat
        weights ``0`` this equals ``clip(probs) / sum_c clip(probs)``.

    Raises:
        ValueError: ``image`` is not ``(H, W, 3)`` uint8, ``probs`` is not ``(C, H, W)`` with
            the image's ``H, W`` and ``C >= 1``, ``probs`` has NaN/inf, or ``iters < 0``.

    Source: Krähenbühl & Koltun 2011; default parameters from the official PSA code
    (Ahn & Kwak, CVPR 2018, ``crf_inference``).
    """
    image = _check_image(image)
    probs = np.asarray(probs, dtype=np.float32)
    h, w = image.shape[:2]
    if probs.ndim != 3 or probs.shape[1:] != (h, w) or probs.shape[0] < 1:
        raise ValueError(f"probs must have shape (C>=1, H={h}, W={w}) to match the image, "
                         f"got {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or inf")
    iters = int(iters)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    c = probs.shape[0]
    unary = -np.log(np.clip(probs, PROB_CLIP, 1.0)).reshape(c, -1)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=float(gaussian_sxy), compat=float(gaussian_compat))
    d.addPairwiseBilateral(sxy=float(bilateral_sxy), srgb=float(bilateral_srgb),
                           rgbim=image, compat=float(bilateral_compat))
    q = np.asarray(d.inference(iters), dtype=np.float32).reshape(c, h, w)
    return q


def background_from_cams(cams: np.ndarray, alpha: float) -> np.ndarray:
    """Prepend PSA's background score ``(1 - max_c cams)^alpha`` to the CAM stack.

    Args:
        cams: ``(k, H, W)`` float foreground maps in [0, 1] (values outside are clipped);
            ``k = 0`` is allowed (background is then 1 everywhere).
        alpha: background power (PSA: 4 / 32 for the affinity labels, 16 for the random walk);
            larger alpha = weaker background.

    Returns:
        ``(k + 1, H, W)`` float32: channel 0 background, channels 1.. the (clipped) cams.

    Raises:
        ValueError: ``cams`` is not 3-D or ``alpha`` is negative.

    Source: PSA (Ahn & Kwak, CVPR 2018), Sec. 3.2 / official code ``infer_cam.py``.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (k, H, W), got {cams.shape}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    cams = np.clip(cams, 0.0, 1.0)
    vmax = cams.max(axis=0) if cams.shape[0] else np.zeros(cams.shape[1:], np.float32)
    bg = np.power(1.0 - vmax, float(alpha), dtype=np.float32)
    return np.concatenate([bg[None], cams], axis=0).astype(np.float32)


def crf_label_from_cams(image: np.ndarray, cams: np.ndarray, class_ids: Sequence[int],
                        alpha: float, crf: Mapping[str, float] | None = None) -> np.ndarray:
    """PSA label map: background at power ``alpha``, dense CRF, argmax, channel -> class id.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        cams: ``(k, H, W)`` float maps in [0, 1] of the image's foreground classes.
        class_ids: ``k`` class ids (1..C-1) of the cam channels, in channel order.
        alpha: background power, see :func:`background_from_cams`.
        crf: keyword arguments of :func:`dense_crf` (keys in :data:`CRF_KEYS`); missing keys
            take the PSA defaults; ``None`` = PSA defaults.

    Returns:
        ``(H, W)`` uint8 label map with values in ``{0} ∪ class_ids`` (0 = background).

    Raises:
        ValueError: shape mismatch, ``len(class_ids) != k``, a class id outside 1..254, or an
            unknown key in ``crf``.

    Source: official PSA code (``infer_cam.py``: ``_crf_with_alpha``).
    """
    image = _check_image(image)
    cams = np.asarray(cams, dtype=np.float32)
    class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams must have shape (k, H, W) matching the image "
                         f"{image.shape[:2]}, got {cams.shape}")
    if len(class_ids) != cams.shape[0]:
        raise ValueError(f"got {len(class_ids)} class ids for {cams.shape[0]} cam channels")
    if len(class_ids) and (class_ids.min() < 1 or class_ids.max() > 254):
        raise ValueError(f"foreground class ids must be in 1..254, got {class_ids.tolist()}")
    crf = dict(crf or {})
    unknown = set(crf) - set(CRF_KEYS)
    if unknown:
        raise ValueError(f"unknown crf keys {sorted(unknown)}; allowed: {list(CRF_KEYS)}")
    if cams.shape[0] == 0:
        return np.zeros(image.shape[:2], dtype=np.uint8)
    scores = background_from_cams(cams, alpha)
    q = dense_crf(image, scores, **{**PSA_CRF, **crf})
    lut = np.concatenate([[0], class_ids]).astype(np.uint8)
    return lut[np.argmax(q, axis=0)]
