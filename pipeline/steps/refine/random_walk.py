"""PSA random walk: refinement of the seeds with a trained AffinityNet (the ``refine_seeds``
stage of every method).

Ahn & Kwak, CVPR 2018 ("PSA"; official code jiwoon-ahn/psa ``infer_aff.py``), step 5 of the
PSA modules (map in :mod:`pipeline.steps.refine.affinity_train`; settings in ``docs/methods/psa.md``).

* Random walk (:func:`random_walk`, :func:`random_walk_dense`): ``W = a^beta`` over the pairs
  of :func:`pipeline.steps.refine.affinity_pairs.pair_indices` (symmetrised with the transpose,
  diagonal 1, zero elsewhere; official ``resnet38_aff.Net.forward(to_dense=True)``),
  ``T = W D^-1`` (column-normalised, PSA eq. 9-10), refined maps ``vec(M) T^t`` with
  ``t = 2^logt`` (PSA eq. 11).
* :func:`refine_maps` / :func:`refine_with_features` / :func:`refine_seeds`: per image,
  background ``(1 - max)^bg_alpha``, 8x8 average pooling, random walk, bilinear upsampling,
  per-pixel normalisation. :func:`label_affinity_features` turns a label map into features
  (the walk's upper bound with the ground truth: ``python -m bench rw_ceiling``).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.transforms import to_tensor
from pipeline.data.voc import VOC_CLASSES, load_image
from pipeline.engine.runtime import eval_mode
from pipeline.models.backbones import model_normalisation
from pipeline.steps.refine.affinity_labels import STRIDE, resize_maps
from pipeline.steps.refine.affinity_net import AffinityNet, load_affinity_net
from pipeline.steps.refine.affinity_pairs import (PAIR_MODES, _check_choice, pair_indices,
                                            pairwise_affinity, search_offsets)
from pipeline.steps.refine.crf import background_from_cams
from pipeline.io.settings import RefineSeeds
from pipeline.io.storage import MapReader, MapWriter


def _check_rw_inputs(f: torch.Tensor, maps: torch.Tensor, logt: int) -> None:
    if f.dim() != 3 or maps.dim() != 3 or f.shape[1:] != maps.shape[1:]:
        raise ValueError(f"f must be (D, h, w) and maps (C, h, w) on the same grid, got "
                         f"{tuple(f.shape)} and {tuple(maps.shape)}")
    if int(logt) < 0:
        raise ValueError(f"logt must be >= 0, got {logt}")


def affinity_matrix_dense(f: torch.Tensor, radius: int = 5, beta: float = 8,
                          pairs: str = "official") -> torch.Tensor:
    """Dense ``W = a^beta``, ``(n, n)`` with ``n = h*w``: ``a`` on the
    :func:`pipeline.steps.refine.affinity_pairs.pair_indices` pairs and their transposes, diagonal 1,
    0 elsewhere (so with ``pairs="official"`` also 0 for close pairs that no interior pixel
    starts). Memory O(n^2). Source: official PSA code
    (``resnet38_aff.Net.forward(to_dense=True)``: a sparse matrix of ``[(from, to), (i, i),
    (to, from)]`` with values ``[aff, 1, aff]``, made dense; then ``** beta`` in
    ``infer_aff.py``)."""
    d, h, w = f.shape
    n = h * w
    a, fr, to = pairwise_affinity(f, radius, pairs)
    wmat = torch.zeros(n, n, dtype=f.dtype, device=f.device)
    ab = a.pow(beta)
    wmat[fr, to] = ab
    wmat[to, fr] = ab
    wmat.diagonal().fill_(1.0)
    return wmat


def random_walk_dense(f: torch.Tensor, maps: torch.Tensor, radius: int = 5, beta: float = 8,
                      logt: int = 8, pairs: str = "official") -> torch.Tensor:
    """Reference PSA random walk with a dense transition matrix (O(n^2) memory, O(n^3 logt)).

    ``W = a^beta`` (:func:`affinity_matrix_dense`), ``T = W / colsum(W)``, ``T <- T @ T``
    ``logt`` times, ``out = maps.reshape(C, n) @ T``.

    Args:
        f: ``(D, h, w)`` float affinity features.
        maps: ``(C, h, w)`` float non-negative maps on the same grid (with background).
        radius, beta, logt: PSA 5, 8, 8.
        pairs: ``official`` | ``all`` (:func:`pair_indices`).

    Returns:
        ``(C, h, w)`` tensor (dtype of ``f``). Each step replaces a pixel's vector by an
        affinity-weighted average of its neighbours' (columns of ``T`` sum to 1), so constant
        maps are fixed points and per-pixel channel sums stay within the input's range; the
        output is not normalised per pixel (PSA's input ``[bg; cams]`` is not).

    Raises:
        ValueError: shape mismatch or ``logt < 0``.

    Source: PSA eqs. 9-11; official code ``infer_aff.py``.
    """
    _check_rw_inputs(f, maps, logt)
    c, h, w = maps.shape
    wmat = affinity_matrix_dense(f, radius, beta, pairs)
    t = wmat / wmat.sum(dim=0, keepdim=True)
    for _ in range(int(logt)):
        t = t @ t
    return (maps.to(t.dtype).reshape(c, h * w) @ t).reshape(c, h, w)


def affinity_neighbours(f: torch.Tensor, radius: int = 5, beta: float = 8,
                        pairs: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse local form of ``W = a^beta``: per pixel its neighbours in the full disk
    (those joined by a :func:`pair_indices` pair).

    Returns:
        ``(nbr, weight)`` of shape ``(n, K)``, ``K = 1 + 2 * len(search_offsets(radius))``:
        column 0 is the pixel itself (weight 1); columns ``1..m`` the half-disk offsets,
        ``m+1..2m`` their mirrors. Out-of-grid neighbours have ``nbr`` = the pixel itself and
        weight 0; so are offsets whose pair the ``official`` set lacks. ``weight[i, k] =
        W[i, nbr[i, k]]`` exactly (symmetric by construction).
    """
    d, h, w = f.shape
    n = h * w
    m = len(search_offsets(radius))
    a, fr, to = pairwise_affinity(f, radius, pairs)
    _, _, oid = pair_indices(h, w, radius, f.device, pairs)
    ab = a.pow(beta)
    self_idx = torch.arange(n, device=f.device)
    nbr = self_idx[:, None].repeat(1, 1 + 2 * m)
    weight = torch.zeros(n, 1 + 2 * m, dtype=f.dtype, device=f.device)
    weight[:, 0] = 1.0
    nbr[fr, 1 + oid] = to
    weight[fr, 1 + oid] = ab
    nbr[to, 1 + m + oid] = fr
    weight[to, 1 + m + oid] = ab
    return nbr, weight


def random_walk(f: torch.Tensor, maps: torch.Tensor, radius: int = 5, beta: float = 8,
                logt: int = 8, pairs: str = "official") -> torch.Tensor:
    """PSA random walk with a sparse local transition matrix (memory O(n * K)).

    Same result as :func:`random_walk_dense`: with ``W`` symmetric, column ``j`` of
    ``T = W / colsum`` holds ``W[i, j] / d_j`` for the ``K`` neighbours ``i`` of ``j``, so one
    step ``M <- M T`` is ``M[:, j] <- sum_k M[:, nbr[j, k]] * weight[j, k] / d_j``; it is
    applied ``2^logt`` times as a sparse (CSR) matrix product (cost ``2^logt * C * n * K``;
    no n x n matrix; ~24x faster than the dense power on a 64x48 grid, see ``python -m bench
    randomwalk``).

    Args:
        f: ``(D, h, w)`` float affinity features.
        maps: ``(C, h, w)`` float non-negative maps on the same grid (with background).
        radius, beta, logt: PSA 5, 8, 8.
        pairs: ``official`` | ``all`` (:func:`pair_indices`); the same edges as
            :func:`random_walk_dense`.

    Returns:
        ``(C, h, w)`` tensor (dtype of ``f``), not normalised per pixel.

    Raises:
        ValueError: shape mismatch or ``logt < 0``.

    Source: PSA eqs. 9-11 (official code ``infer_aff.py`` uses the dense form).
    """
    _check_rw_inputs(f, maps, logt)
    c, h, w = maps.shape
    n = h * w
    nbr, weight = affinity_neighbours(f, radius, beta, pairs)
    tn = weight / weight.sum(dim=1, keepdim=True)        # (n, K), rows = columns of T
    k = nbr.shape[1]
    # T^T in CSR: row j holds column j of T (K entries; out-of-grid slots have weight 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # "sparse CSR support is in beta"
        t_t = torch.sparse_csr_tensor(torch.arange(0, n * k + 1, k, device=f.device),
                                      nbr.reshape(-1), tn.reshape(-1), size=(n, n))
    x = maps.to(f.dtype).reshape(c, n).t().contiguous()  # (n, C)
    for _ in range(2 ** int(logt)):
        x = t_t @ x                                      # one step M <- M T, as (T^T M^T)
    return x.t().reshape(c, h, w)


def _pad_to_stride(height: int, width: int) -> tuple[int, int, int, int]:
    """``F.pad`` widths (left, right, top, bottom) that zero-pad an ``(H, W)`` map at the bottom
    / right to the next multiple of 8 (official ``infer_aff.py``: ``p2d``)."""
    return (0, -width % STRIDE, 0, -height % STRIDE)


@torch.no_grad()
def refine_maps(model: AffinityNet, image: np.ndarray, cams: np.ndarray,
                params: RefineSeeds | Mapping[str, Any] | None = None) -> np.ndarray:
    """PSA refinement of one image's CAMs with a trained AffinityNet: the affinity features
    ``model(image)`` (eval mode, the model's input normalisation), then
    :func:`refine_with_features`.

    Args:
        model: trained :class:`pipeline.steps.refine.affinity_net.AffinityNet` (its device is used).
        image: ``(H, W, 3)`` uint8 RGB.
        cams: ``(k, H, W)`` float in [0, 1] (other sizes are bilinearly resized to ``(H, W)``).
        params: :class:`pipeline.io.settings.RefineSeeds` or a mapping of its keys: ``radius``,
            ``beta``, ``logt``, ``bg_alpha``, ``pairs``, ``border`` (defaults: the dataclass,
            PSA's code). ``border="pad"`` (default, official ``infer_aff.py``: ``F.pad(img,
            p2d)`` of the normalised image) zero-pads the image at the bottom / right to a
            multiple of 8 before the forward; ``"valid"`` (the former form) feeds it as is.

    Returns:
        ``(k+1, H, W)`` float32 in [0, 1], channel 0 background, each pixel sums to 1.

    Raises:
        ValueError: bad image / cams shapes, unknown ``border`` / ``pairs``.

    Source: PSA Sec. 3.4-3.5; official code ``infer_aff.py``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim == 3 and cams.shape[0] == 0:     # no foreground class: all background, no forward
        return np.ones((1, *image.shape[:2]), np.float32)
    s = RefineSeeds.of(params)
    device = next(model.parameters()).device
    x = to_tensor(image, *model_normalisation(model))
    if s.border == "pad":
        x = F.pad(x, _pad_to_stride(*image.shape[:2]))    # zeros after normalisation, as F.pad
    with eval_mode(model):
        f = model(x[None].to(device))[0]
    return refine_with_features(f, cams, image.shape[:2], s)


@torch.no_grad()
def refine_with_features(f: torch.Tensor, cams: np.ndarray, size: tuple[int, int],
                         params: RefineSeeds | Mapping[str, Any] | None = None) -> np.ndarray:
    """PSA refinement of one image's CAMs given its affinity features.

    1. ``background_from_cams(cams, bg_alpha)`` at full resolution -> ``(k+1, H, W)``;
    2. 8x8 average pooling to the ``ceil(H/8) x ceil(W/8)`` grid of ``f``: ``border="pad"``
       (default, official ``infer_aff.py``: ``np.pad(cam_full_arr, mode='constant')`` then
       ``F.avg_pool2d(8, 8)``) zero-pads every channel, the background included, at the
       bottom / right to a multiple of 8, so a partial border cell is its pixels' sum / 64;
       ``border="valid"`` (the former form) averages a partial cell over its valid pixels
       (``ceil_mode``);
    3. :func:`random_walk` with ``radius``, ``beta``, ``logt``, ``pairs``;
    4. bilinear upsampling to ``(8h, 8w)`` (``align_corners=False``) cropped to ``(H, W)``;
    5. per-pixel normalisation: negatives (none in exact arithmetic) clipped to 0, each pixel
       divided by its channel sum. The input ``[(1-max)^bg_alpha; cams]`` does not sum to 1
       per pixel and the walk only averages, so the raw result is not a distribution; the
       official code takes the argmax, which this normalisation does not change.

    Args:
        f: ``(D, h, w)`` float affinity features on the stride-8 grid of the image (an
            AffinityNet's output, or :func:`label_affinity_features` for a diagnostic); the
            walk runs on ``f``'s device.
        cams: ``(k, H, W)`` float in [0, 1] (other sizes are bilinearly resized to ``size``).
        size: ``(H, W)`` of the image.
        params: as :func:`refine_maps`.

    Returns:
        ``(k+1, H, W)`` float32 in [0, 1], channel 0 background, each pixel sums to 1.

    Raises:
        ValueError: ``cams`` not 3-D, ``f`` not ``(D, h, w)``, unknown ``pairs`` / ``border``
            (the latter from :class:`~pipeline.io.settings.RefineSeeds`).

    Source: PSA Sec. 3.4-3.5; official code ``infer_aff.py``.
    """
    s = RefineSeeds.of(params)
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (k, H, W), got {cams.shape}")
    if f.dim() != 3:
        raise ValueError(f"f must have shape (D, h, w), got {tuple(f.shape)}")
    H, W = int(size[0]), int(size[1])
    cams = resize_maps(cams, (H, W))
    if cams.shape[0] == 0:
        return np.ones((1, H, W), np.float32)
    h, w = f.shape[1:]
    maps = torch.from_numpy(background_from_cams(cams, s.bg_alpha))[None].to(f.device)
    if s.border == "pad":
        maps = F.avg_pool2d(F.pad(maps, _pad_to_stride(H, W)), STRIDE, STRIDE)[0]
    else:
        maps = F.avg_pool2d(maps, STRIDE, STRIDE, ceil_mode=True)[0]
    if maps.shape[1:] != (h, w):  # only for exotic backbones; keep the grids aligned
        maps = F.interpolate(maps[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    rw = random_walk(f.float(), maps.float(), s.radius, s.beta, s.logt,
                     _check_choice("pairs", s.pairs, PAIR_MODES))
    up = F.interpolate(rw[None], size=(h * STRIDE, w * STRIDE), mode="bilinear",
                       align_corners=False)[0, :, :H, :W].clamp_min(0)
    up = up / up.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return up.cpu().numpy().astype(np.float32)


def label_affinity_features(label: np.ndarray, num_labels: int = 256) -> torch.Tensor:
    """Affinity features that make a label map the affinity (a diagnostic: the walk's
    upper bound when the label is the ground truth).

    One-hot of ``label`` over its distinct values (255 is a label of its own), 8x8 average
    pooled (``ceil_mode``) to the AffinityNet grid and scaled by the number ``L`` of distinct
    values, so two pure cells of different labels are at channel-mean distance 2
    (``a = e^-2``, ``a^8 = e^-16``) and two cells of one label at distance 0 (``a = 1``).

    Args:
        label: ``(H, W)`` integer label map.
        num_labels: values must lie in ``[0, num_labels)``.

    Returns:
        ``(L, ceil(H/8), ceil(W/8))`` float32 tensor.

    Raises:
        ValueError: ``label`` not 2-D or a value outside ``[0, num_labels)``.

    Not in PSA: this project's diagnostic (``python -m bench rw_ceiling``).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got {label.shape}")
    if label.size and (label.min() < 0 or label.max() >= num_labels):
        raise ValueError(f"label values must lie in [0, {num_labels}), got "
                         f"{label.min()}..{label.max()}")
    values, inv = np.unique(label, return_inverse=True)
    onehot = np.zeros((len(values), label.size), np.float32)
    onehot[inv.reshape(-1), np.arange(label.size)] = 1.0
    t = torch.from_numpy(onehot.reshape(len(values), *label.shape))[None]
    return F.avg_pool2d(t, STRIDE, STRIDE, ceil_mode=True)[0] * float(len(values))


def refine_seeds(root: str | Path, ids: Sequence[str], seeds_path: str | Path, seed_key: str,
                 model_path: str | Path, out_path: str | Path,
                 params: RefineSeeds | Mapping[str, Any] | None = None, device: str = "cpu",
                 log: Callable[[str], Any] = print) -> None:
    """Refine the seeds of ``ids`` with a trained AffinityNet and write ``out_path``.

    Output (:class:`pipeline.io.storage.MapWriter`, atomic): per image ``class_ids = [0] + fg
    ids`` and key ``probs`` = :func:`refine_maps` output ``(k+1, H, W)``; file attributes
    ``stage="refine_seeds"``, ``method="psa"``, ``params`` (the
    :attr:`~pipeline.io.settings.RefineSeeds.RECORD` keys with their defaults, then the params as
    given).

    Args:
        root: dataset root (``JPEGImages``).
        ids: image ids.
        seeds_path: seeds HDF5 (:class:`MapReader`), maps ``seed_key`` of shape ``(k, h, w)``.
        seed_key: map key, e.g. ``"cams"``.
        model_path: checkpoint of :func:`pipeline.steps.refine.affinity_train.train_affinity_net`.
        out_path: output HDF5.
        params: :class:`pipeline.io.settings.RefineSeeds` or its params (converted once here).
        device: torch device.
        log: message sink.

    Raises:
        pipeline.io.storage.StorageError, pipeline.data.voc.DatasetError, FileNotFoundError:
            missing inputs.
    """
    from tqdm import tqdm

    s = RefineSeeds.of(params)
    model = load_affinity_net(model_path, device)
    t0 = time.time()
    with MapReader(seeds_path) as reader:
        reader.require(ids, root)
        names = reader.class_names or list(VOC_CLASSES)
        with MapWriter(out_path, names, {"stage": "refine_seeds", "method": "psa",
                                         "params": {**s.record(), **s.as_dict()}}) as writer:
            for image_id in tqdm(list(ids), desc="psa random walk", leave=False):
                cams, cids, _ = reader.read(image_id, seed_key)
                image = load_image(root, image_id)
                probs = refine_maps(model, image, cams, s)
                writer.write(image_id, np.concatenate([[0], cids]).astype(np.int64),
                             image.shape[:2], probs=probs)
    log(f"refine_seeds: {len(ids)} images refined with PSA random walk in "
        f"{time.time() - t0:.1f}s -> {out_path}")
