"""The one evaluation loop of every step: seeds and refined maps, pseudo labels, DeepLab-v2,
a method's own segmentation head and the all-background floor.

:meth:`Evaluator.run` iterates image ids and, for each one, asks a caller-supplied function
for the prediction, loads the ground truth (:meth:`Evaluator.ground_truth`, i.e.
:func:`pipeline.data.voc.load_mask`), optionally saves the label map as a palette PNG, and
adds the pixel confusion (:func:`pipeline.engine.metrics.confusion_matrix`) to one or more named
*streams* (several fixed thresholds, several test protocols, scored in the same pass) and,
for score maps, the background-threshold sweep
(:func:`pipeline.engine.metrics.threshold_sweep_confusion`). It returns
:func:`pipeline.engine.metrics.scores_from_confusion` of the first stream plus ``num_images``::

    ev = Evaluator(root, "SegmentationClass", class_names)
    scores = ev.run(ids, lambda iid: label_map_of(iid), desc="eval")

    ev = Evaluator(root, label_dir, names, streams=[0.3, 0.5], sweep=OFFICIAL_SWEEP)
    scores = ev.run(ids, lambda iid: {0.3: lab3, 0.5: lab5, SWEEP: (maps, class_ids)})
    ev.scores(0.5), ev.best_threshold_on_gt()

Source: the VOC mIoU of every official WSSS repository (one confusion matrix over all
pixels, 255 ignored, nanmean over occurring classes); the sweep and its best point are the
official seed protocol of ACR's ``evaluation.py --curve True`` (digest
``shared/reference/official-settings.md``).
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.voc import load_mask, save_mask_png
from pipeline.engine.metrics import confusion_matrix, scores_from_confusion, threshold_sweep_confusion
from pipeline.io.storage import atomic_directory

#: Key of a prediction dict whose value ``(maps, class_ids)`` feeds the threshold sweep.
SWEEP = "sweep"

#: Background thresholds of the official seed protocol: ACR's ``evaluation.py --curve True``
#: (also MCTformer's) sweeps ``t = i / 100, i = 0..99`` against the ground truth.
OFFICIAL_SWEEP = tuple(i / 100.0 for i in range(100))

#: The ``protocol`` label of :func:`best_threshold_on_gt` results.
BEST_ON_GT_PROTOCOL = ("official (threshold chosen on the evaluation ground truth; "
                       "not a fair number)")

_FIRST: Any = object()   # "the first stream" (a stream may be named None: refined maps)


def best_threshold_on_gt(confs: np.ndarray, thresholds: Sequence[float],
                         class_names: Sequence[str], note: str | None = None) -> dict:
    """The best point of a threshold sweep scored on the ground truth (official protocol).

    Args:
        confs: ``(T, C, C)`` int confusion matrices, one per threshold
            (:func:`pipeline.engine.metrics.threshold_sweep_confusion` summed over images).
        thresholds: the ``T`` ascending thresholds.
        class_names: background first.
        note: appended to the result as ``note`` (what the maps were).
    Returns:
        ``{"miou", "bg_threshold", "protocol", "thresholds", "iou", "curve"}``: the highest
        mIoU of the sweep (ties: the smallest threshold), its threshold, the label
        :data:`BEST_ON_GT_PROTOCOL`, how the thresholds were chosen, the per-class IoU at
        that threshold and the whole curve ``{"0.00": mIoU, ...}``.
    Raises:
        ValueError: ``T == 0``.
    """
    scores = [scores_from_confusion(c, class_names) for c in confs]
    mious = [s["miou"] for s in scores]
    best = int(np.argmax(mious))
    ts = [float(t) for t in thresholds]
    out = {"miou": mious[best], "bg_threshold": ts[best], "protocol": BEST_ON_GT_PROTOCOL,
           "thresholds": (f"{len(ts)} values i/100, i = 0..99 (ACR evaluation.py --curve True)"
                          if tuple(ts) == OFFICIAL_SWEEP else f"{len(ts)} values {ts[0]}..{ts[-1]}"),
           "iou": scores[best]["iou"],
           "curve": {f"{t:.2f}": m for t, m in zip(ts, mious)}}
    if note:
        out["note"] = note
    return out


def _progress(ids: list, desc: str | None) -> Iterable:
    if desc is None:
        return ids
    return tqdm(ids, desc=desc, unit="img", file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


class Evaluator:
    """Confusion matrices of predictions against one dataset's ground truth (VOC mIoU).

    Args:
        root: dataset root; the ground truth of ``id`` is ``<root>/<label_dir>/<id>.png``.
        label_dir: mask folder (``SegmentationClass``, ``SegmentationClassAug``, ...).
        class_names: the ``C`` class names, background first (sets ``C`` and names the
            per-class IoU).
        streams: names of the label maps each prediction gives (hashable, distinct, not
            :data:`SWEEP`; e.g. thresholds or test protocols). The first is the one
            :meth:`run` / :meth:`result` score; a bare array prediction goes to it.
        sweep: ascending background thresholds; predictions then may give score maps under
            :data:`SWEEP` (:meth:`add`) and :meth:`best_threshold_on_gt` reports the best.
    Attributes:
        conf: ``{stream: int64 (C, C)}`` summed ``M[gt, pred]``.
        sweep_conf: int64 ``(T, C, C)`` (None without ``sweep``).
        num_images: number of :meth:`add` calls.
    Raises:
        ValueError: no stream, repeated streams, or a stream named :data:`SWEEP`.
    """

    def __init__(self, root: str | Path, label_dir: str, class_names: Sequence[str],
                 streams: Sequence[Hashable] = ("main",), sweep: Sequence[float] | None = None):
        self.root, self.label_dir = root, label_dir
        self.class_names = list(class_names)
        C = self.num_classes = len(self.class_names)
        self.streams = list(streams)
        if not self.streams or len(set(self.streams)) != len(self.streams) or SWEEP in self.streams:
            raise ValueError(f"Evaluator streams must be distinct names other than {SWEEP!r}, "
                             f"got {self.streams}")
        self.conf = {s: np.zeros((C, C), np.int64) for s in self.streams}
        self.sweep = None if sweep is None else [float(t) for t in sweep]
        self.sweep_conf = None if sweep is None else np.zeros((len(self.sweep), C, C), np.int64)
        self.num_images = 0
        self._gt: tuple[str | None, np.ndarray | None] = (None, None)

    def ground_truth(self, image_id: str) -> np.ndarray:
        """uint8 ``(H, W)`` mask of ``image_id`` (class ids, 255 void), read once: the last
        one is cached, so a prediction function that needs it (a shape check, an
        all-background prediction) and the loop share one read.

        Raises:
            DatasetError: mask missing or unreadable (:func:`pipeline.data.voc.load_mask`).
        """
        if self._gt[0] != image_id:
            self._gt = (image_id, load_mask(self.root, image_id, self.label_dir))
        return self._gt[1]

    def add(self, image_id: str, pred: np.ndarray | Mapping[Hashable, Any],
            name: str | None = None) -> None:
        """Add one image's prediction(s).

        Args:
            image_id: its ground truth is :meth:`ground_truth`.
            pred: an integer ``(H, W)`` label map (class ids in ``[0, C)``, 255 ignored) for
                the first stream, or a dict giving one for every stream (the same array
                object under several streams is counted once and added to each) and,
                with ``sweep``, ``{SWEEP: (maps, class_ids)}``: float ``(k, H, W)`` score
                maps of the foreground classes ``class_ids`` ``(k,)`` (background where the
                max is ``<=`` the threshold).
            name: what the prediction is (e.g. ``"of image <id>"`` or its file), for errors.
        Raises:
            PredictionRangeError: a label (or a predicted channel's class id) outside
                ``[0, C)`` other than 255; the message names ``name``.
            ValueError: shapes differ from the ground truth, a stream missing or unknown,
                or :data:`SWEEP` maps without ``sweep``.
            DatasetError: the ground truth cannot be read.
        """
        gt = self.ground_truth(image_id)
        preds = pred if isinstance(pred, Mapping) else {self.streams[0]: pred}
        missing = [s for s in self.streams if s not in preds]
        unknown = [s for s in preds if s not in self.conf and s != SWEEP]
        if missing or unknown or (SWEEP in preds and self.sweep is None):
            raise ValueError(f"prediction {name or image_id}: streams {list(preds)} do not match "
                             f"the evaluator's {self.streams}" + ("" if self.sweep is not None
                                                                  else " (no sweep)"))
        done: dict[int, np.ndarray] = {}
        for s in self.streams:
            p = preds[s]
            if id(p) not in done:
                done[id(p)] = confusion_matrix(p, gt, self.num_classes, name=name)
            self.conf[s] += done[id(p)]
        if SWEEP in preds:
            maps, class_ids = preds[SWEEP]
            self.sweep_conf += threshold_sweep_confusion(maps, class_ids, gt, self.sweep,
                                                         self.num_classes, name=name)
        self.num_images += 1

    def run(self, ids: Iterable[str], predict: Callable[[str], Any],
            name: Callable[[str], str | None] = lambda image_id: f"of image {image_id}",
            desc: str | None = None, save_dir: str | Path | None = None) -> dict:
        """The loop: for each id, ``pred = predict(id)`` (see :meth:`add`; it may call
        :meth:`ground_truth`), then optionally save it, then :meth:`add` it.

        Args:
            ids: image ids, in order.
            predict: ``id -> pred`` as :meth:`add` takes it.
            name: ``id -> `` the ``name`` of :meth:`add` (error messages).
            desc: progress-bar title (tqdm on stderr); None = no bar.
            save_dir: if given, the first stream's label map is written as a VOC palette PNG
                ``<save_dir>/<id>.png`` (uint8), the folder published atomically
                (:func:`pipeline.io.storage.atomic_directory`: an existing folder is replaced
                at the end; on an error it is left as it was).
        Returns:
            :meth:`result`.
        Raises:
            whatever ``predict`` or :meth:`add` raise.
        """
        with (atomic_directory(save_dir) if save_dir is not None else nullcontext()) as tmp:
            for image_id in _progress(list(ids), desc):
                pred = predict(image_id)
                if tmp is not None:
                    first = pred[self.streams[0]] if isinstance(pred, Mapping) else pred
                    save_mask_png(Path(tmp) / f"{image_id}.png", first)
                self.add(image_id, pred, name(image_id))
        return self.result()

    def scores(self, stream: Hashable = _FIRST) -> dict:
        """:func:`pipeline.engine.metrics.scores_from_confusion` of one stream (default the first):
        ``miou``, ``pixel_accuracy``, ``mean_accuracy`` (floats in [0, 1]) and ``iou``
        (class name -> IoU, None where the class never occurs)."""
        return scores_from_confusion(self.conf[self.streams[0] if stream is _FIRST else stream],
                                     self.class_names)

    def result(self) -> dict:
        """:meth:`scores` of the first stream plus ``num_images``."""
        return {**self.scores(), "num_images": self.num_images}

    def best_threshold_on_gt(self, note: str | None = None) -> dict:
        """:func:`best_threshold_on_gt` of the sweep (``note``: what the maps were).

        Raises:
            ValueError: the evaluator has no ``sweep``.
        """
        if self.sweep is None:
            raise ValueError("best_threshold_on_gt needs an Evaluator made with `sweep`")
        return best_threshold_on_gt(self.sweep_conf, self.sweep, self.class_names, note)
