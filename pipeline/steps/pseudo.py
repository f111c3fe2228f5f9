"""Stage 5: dense-CRF pseudo labels from refined maps (or, ``source: seeds``, from the seeds'
own distribution), written as VOC palette PNGs."""
from __future__ import annotations

import time
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.classes import VOC_CLASSES
from pipeline.data.voc import load_image, save_mask_png
from pipeline.engine.evaluator import Evaluator
from pipeline.engine.labels import maps_to_label
from pipeline.io.settings import MakePseudoLabels
from pipeline.io.storage import MapReader, StorageError, atomic_directory

_STATE: dict = {}


#: ``source: seeds``: the keys of ``seeds.h5`` that hold the seeds' own distribution, background
#: first (ViT-PCM's BPM: :meth:`pipeline.methods.vitpcm.ViTPCM.finish_maps`)
SEED_DIST_KEYS = ("bpm_bg", "bpm_fg")


def _init(h5_path: str, root: str, key: str, crf: dict | None, out_dir: str,
          source: str = "refined") -> None:
    _STATE.update(reader=MapReader(h5_path), root=root, key=key, crf=crf, out=out_dir,
                  source=source)


def read_distribution(reader: MapReader, iid: str, source: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """One image's ``(probs (k+1, H, W) float32, class_ids (k+1,) int64)``, background first.

    ``source: refined``: the map ``key`` of ``refined.h5`` as stored (the random walk's
    distribution). ``source: seeds``: ``seeds.h5``'s ``bpm_bg`` (``p_0``, the same in each of
    its k channels) stacked on ``bpm_fg`` (``p_k``): the label-merged, upsampled BPM
    distribution of ViT-PCM, the input of the official CRF (deepplants/ViT-PCM ``main.py
    test --crf``: ``resize(merge_class_labels(preds))``), float16 as stored. An image without a
    foreground class is background.
    """
    if source == "refined":
        probs, cids, _ = reader.read(iid, key)
        return probs, cids
    bg, cids, _ = reader.read(iid, SEED_DIST_KEYS[0])
    if len(cids) == 0:
        return np.ones((1,) + bg.shape[1:], np.float32), np.zeros(1, np.int64)
    fg = reader.read(iid, SEED_DIST_KEYS[1])[0]
    return np.concatenate([bg[:1], fg]), np.concatenate([[0], cids])


def _require_distribution(reader: MapReader, ids: Sequence[str]) -> None:
    """``source: seeds`` needs ``bpm_bg`` and ``bpm_fg`` in every image (export_seeds writes
    the method's ``aux_keys`` for images without a foreground class too, as empty maps)."""
    for iid in ids:
        keys = reader.keys(iid)
        if not set(SEED_DIST_KEYS) <= set(keys):
            raise StorageError(
                f"{reader.path}:{iid} has no `bpm_bg` / `bpm_fg` maps (has {keys}): "
                f"`make_pseudo_labels.source: seeds` needs the seeds' own distribution, which "
                f"only ViT-PCM writes, with `export_seeds.bpm_upsample: probs`. Re-export the "
                f"seeds with that setting, or set `make_pseudo_labels.source: refined` (the "
                f"affinity chain's refined.h5).")


def pseudo_label(image: np.ndarray, probs: np.ndarray, class_ids: np.ndarray,
                 crf: dict | None) -> np.ndarray:
    """One pseudo label: optional dense CRF on the per-class probabilities, then argmax.

    Args:
        image: ``(H, W, 3)`` uint8.
        probs: ``(k+1, H, W)`` float in [0, 1], background channel included (``class_ids``
            starts with 0).
        crf: keyword arguments of :func:`pipeline.steps.refine.crf.dense_crf` or None.
    Returns:
        ``(H, W)`` uint8 class ids.
    """
    if crf:
        from pipeline.steps.refine.crf import dense_crf
        p = probs / np.maximum(probs.sum(0, keepdims=True), 1e-8)
        probs = dense_crf(image, p.astype(np.float32), **crf)
    return maps_to_label(probs, class_ids, None)


def _one(iid: str) -> str:
    s = _STATE
    probs, cids = read_distribution(s["reader"], iid, s["source"], s["key"])
    label = pseudo_label(load_image(s["root"], iid), probs, cids, s["crf"])
    save_mask_png(Path(s["out"]) / f"{iid}.png", label)
    return iid


def make_pseudo_labels(h5_path: str | Path, key: str, root: str | Path, ids: Sequence[str],
                       p: MakePseudoLabels | Mapping, out_dir: str | Path, workers: int = 1,
                       log: Callable[[str], None] = print) -> dict:
    """Write ``out_dir/<id>.png`` for every id (dense CRF per the ``crf`` of
    :class:`pipeline.io.settings.MakePseudoLabels`, or of a params mapping converted here), in
    parallel. ``h5_path``: ``refined.h5`` (``source: refined``, map ``key``) or ``seeds.h5``
    (``source: seeds``: :func:`read_distribution`).

    The PNGs are written into ``<out_dir>.tmp`` and the folder is renamed when complete
    (:func:`pipeline.io.storage.atomic_directory`: on a failure the temporary folder is removed
    and ``out_dir`` left as it was).

    Returns:
        ``{"images", "seconds", "workers", "source"}``.
    Raises:
        StorageError: the file is for other images, or (``source: seeds``) lacks ``bpm_bg`` /
            ``bpm_fg`` (names the file and both fixes); nothing is written then.
    """
    s = MakePseudoLabels.of(p)
    crf = None if s.crf is None else dict(s.crf)     # plain dict: pickled to the workers
    with MapReader(h5_path) as r:  # refuse maps made for another image list / dataset
        r.require(ids, root)
        if s.source == "seeds":
            _require_distribution(r, ids)
    t0 = time.time()
    with atomic_directory(out_dir) as tmp:
        args = (str(h5_path), str(root), key, crf, str(tmp), s.source)
        if workers > 1:
            with get_context("spawn").Pool(workers, initializer=_init, initargs=args) as pool:
                # one image per task: a CRF costs ~0.4 s, far above the IPC; larger chunks left
                # a core idle at the end (bench crf: 1.79x with 4 per task, 1.9-2.1x with 1)
                for _ in tqdm(pool.imap_unordered(_one, ids, chunksize=1), total=len(ids),
                              desc="make_pseudo_labels", unit="img", mininterval=2.0):
                    pass
        else:
            _init(*args)
            for iid in tqdm(ids, desc="make_pseudo_labels", unit="img", mininterval=2.0):
                _one(iid)
            _STATE["reader"].close()
    secs = time.time() - t0
    log(f"make_pseudo_labels: {len(ids)} PNGs from {h5_path} ({s.source}) in {secs:.1f}s "
        f"with {workers} worker(s)")
    return {"images": len(ids), "seconds": round(secs, 1), "workers": workers, "source": s.source}


#: ``best_threshold_on_gt`` of hard labels: the official seed protocol sweeps a background
#: threshold over score maps; a label PNG has no score to threshold, so there is no such
#: number (the fixed ``miou`` is the only one; see the seeds/refined files for the sweep).
NO_THRESHOLD_SWEEP = {"miou": None, "bg_threshold": None,
                      "protocol": "not defined: pseudo labels are hard labels (no scores to "
                                  "threshold); `miou` is the only number"}


def evaluate_label_dir(pred_dir: str | Path, root: str | Path, ids: Sequence[str],
                       label_dir: str, class_names: Sequence[str] = VOC_CLASSES) -> dict:
    """mIoU of palette PNGs in ``pred_dir`` against ground truth (VOC definition) over the
    ``len(class_names)`` classes (background first; the manifest's ``classes``).
    ``best_threshold_on_gt`` is :data:`NO_THRESHOLD_SWEEP` (a sweep is not defined for hard
    labels).

    Raises:
        PredictionRangeError: a PNG holds a value outside ``[0, C)`` other than 255 (names it).
    """
    from PIL import Image

    def png(iid: str) -> Path:
        return Path(pred_dir) / f"{iid}.png"

    out = Evaluator(root, label_dir, class_names).run(
        ids, lambda iid: np.asarray(Image.open(png(iid))), name=lambda iid: str(png(iid)))
    out["best_threshold_on_gt"] = dict(NO_THRESHOLD_SWEEP)
    return out
