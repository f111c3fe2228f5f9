"""Stage 2: seed (class map) export to HDF5 and evaluation of stored maps."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.engine.accel import Accel
from pipeline.steps.cls import load_classifier
from pipeline.data.transforms import to_tensor
from pipeline.data.classes import VOC_CLASSES
from pipeline.data.voc import load_image
from pipeline.engine.inference import multiscale_flip, normalise
from pipeline.engine.evaluator import SWEEP, Evaluator
from pipeline.engine.labels import maps_to_label  # noqa: F401  (re-exported: numpy-only home)
from pipeline.models.backbones import model_normalisation
from pipeline.models.vit import input_stride
from pipeline.io.settings import ExportSeeds
from pipeline.io.storage import MapReader, MapWriter
from pipeline.engine.runtime import get_device


def normalise_maps(maps: torch.Tensor, mode: str = "max", eps: float = 1e-5) -> torch.Tensor:
    """Per-class normalisation of ``(k, H, W)`` non-negative maps to [0, 1].

    ``max``: ``M / (max M + eps)`` (PSA/IRN); ``minmax``: ``(M - min) / (max - min + eps)``
    (AFA/ToCo/MCC). Source: official-settings digest, "Normalising CAMs".
    """
    if mode not in ("max", "minmax"):
        raise ValueError(f"export_seeds.norm must be max, minmax or mean, got {mode!r}")
    return normalise(maps, mode, eps)


def multiscale_maps(method, model, image: np.ndarray, fg: torch.Tensor,
                    p: ExportSeeds | Mapping, device: torch.device,
                    accel: Accel | None = None) -> dict[str, torch.Tensor]:
    """Merge a method's maps over ``scales`` and horizontal flips at image size
    (:func:`pipeline.engine.inference.multiscale_flip`). ``p``: :class:`pipeline.io.settings.ExportSeeds`
    (or a mapping, converted here; keys that are not its fields go to the method); the
    plug-in's ``maps`` gets :meth:`~pipeline.io.settings.StageSettings.as_dict` (every key).

    Each scale resizes the image to a multiple of the token stride, the maps are bilinearly
    upsampled to ``(H, W)``, flipped maps are flipped back, merged, then normalised per
    class (``norm``: ``max`` / ``minmax``, see :func:`normalise_maps`, or ``mean``:
    divided by the number of scale x flip passes, for maps that are already probabilities
    in [0, 1] such as ViT-PCM's). ``accel`` (:class:`pipeline.engine.accel.Accel`): the method's
    forward runs under its autocast / memory format; the maps are merged in float32 either way.

    Optional keys (``ms_flip_merge`` / ``ms_relu`` absent or null = the method's ``seed_merge``
    (:class:`pipeline.methods.base.Method`), then the behaviour every method had before them;
    defaults of the others: :class:`~pipeline.io.settings.ExportSeeds`):

    * ``resize_square`` (int or null): scale 1 is the image resized to this square side,
      ignoring the aspect ratio (ACR official ``infer_cam.py`` via ``get_data_from_chunk_val``:
      ``cv2.resize(img, (crop, crop))``); null = aspect-preserving ``H*s, W*s``.
    * ``align_corners`` (bool, default false): of the bilinear upsampling to ``(H, W)``
      (ACR official: ``F.interpolate(..., align_corners=True)``).
    * ``norm_eps`` (float, default 1e-5): ``eps`` of :func:`normalise_maps` (ACR official
      min-max: 1e-6).
    * ``ms_flip_merge`` (``sum`` default | ``max``): how the image's and its mirror's maps of
      one scale are merged; scales are always summed. ``sum`` adds every pass into one
      running sum in pass order.
    * ``ms_relu`` (``after_upsample`` default | ``before_upsample`` | ``after_flip_merge``):
      where negative map values are clipped. ``after_upsample`` clips each upsampled pass
      (methods whose ``maps`` are already non-negative: a no-op). The other two ask
      ``maps`` for pre-ReLU maps (``raw_maps: true``; AFA and MCC honour it, methods
      without a ReLU in their maps ignore it) and clip at the token grid or after the
      flip merge. AFA / MCC default (``seed_merge``): ``ms_flip_merge: max``,
      ``ms_relu: after_flip_merge`` = official ``multi_scale_cam`` (rulixiang/afa and
      rulixiang/ToCo ``utils/camutils.py``: upsample the raw CAM, max over image and flip,
      ReLU, sum over scales, min-max). ``ms_flip_merge: sum, ms_relu: before_upsample`` is the
      form this pipeline used before (ReLU at the token grid, sum over flips).

    The merged maps go through the method's
    :meth:`~pipeline.methods.base.Method.finish_maps` last (identity for every method but
    ViT-PCM, whose ``bpm_upsample: probs`` forms its stored ratio after the upsampling).

    Returns:
        ``{key: (k, H, W) float32 in [0, 1]}``.
    Raises:
        ValueError: unknown ``norm``, ``ms_flip_merge`` or ``ms_relu``.
    """
    s = ExportSeeds.of(p)
    merge = getattr(method, "seed_merge", {})
    norm = s.norm
    if norm not in ("max", "minmax", "mean"):
        raise ValueError(f"export_seeds.norm must be max, minmax or mean, got {norm!r}")
    flip_merge = s.ms_flip_merge or merge.get("ms_flip_merge", "sum")
    relu = s.ms_relu or merge.get("ms_relu", "after_upsample")
    if flip_merge not in ("sum", "max") or relu not in ("after_upsample", "before_upsample",
                                                         "after_flip_merge"):
        raise ValueError("export_seeds: ms_flip_merge must be sum or max and ms_relu after_upsample, "
                         f"before_upsample or after_flip_merge; got {flip_merge!r}, {relu!r}")
    mp = s.as_dict() if relu == "after_upsample" else {**s.as_dict(), "raw_maps": True}
    H, W = image.shape[:2]
    x0 = to_tensor(image, *model_normalisation(model)).unsqueeze(0).to(device)
    sq = s.resize_square
    fgd = fg.to(device)

    def forward(xin: torch.Tensor) -> dict[str, torch.Tensor]:
        if accel is None:
            out = method.maps(model, xin, fgd, mp)
        else:
            with accel.autocast():
                out = method.maps(model, accel.input(xin), fgd, mp)
        return {k: m.unsqueeze(0).float() for k, m in out.items()}

    acc = multiscale_flip(
        forward, x0, s.scales,
        flips=(False, True) if s.flip else (False,), flip_batch=False,
        resize="stride", stride=input_stride(model),
        base_size=(sq, sq) if sq else None, relu=relu,
        align_corners=s.align_corners, flip_merge=flip_merge,
        scale_merge="sum", fold="flat" if flip_merge == "sum" and relu != "after_flip_merge" else "nested",
        norm="passes" if norm == "mean" else norm, norm_eps=s.norm_eps)
    return method.finish_maps({k: v[0] for k, v in acc.items()}, mp)


def export_seeds(model_path: str | Path, root: str | Path, ids: Sequence[str],
                 labels: Mapping[str, Sequence[int]], p: ExportSeeds | Mapping,
                 out_path: str | Path,
                 log: Callable[[str], None] = print,
                 class_names: Sequence[str] = VOC_CLASSES) -> dict:
    """Write ``seeds.h5`` (see :mod:`pipeline.io.storage`) for ``ids``.

    Maps are stored for the image-label classes only (float16, chunked, gzip), under each of
    the method's ``seed_keys`` and of its ``aux_keys`` that :meth:`~pipeline.methods.base.Method.finish_maps`
    returned. Images with no foreground class get empty maps under every key of both.
    ``class_names`` (the manifest's ``classes``, background first) is stored as the file's
    class list.

    ``p``: :class:`pipeline.io.settings.ExportSeeds` (device, scales, flip, norm, ..., and
    amp / channels_last / compile of :mod:`pipeline.engine.accel`) with the method's keys, or the
    params mapping (converted once here); the file's ``params`` attribute is
    :meth:`~pipeline.io.settings.StageSettings.as_dict` (the params as given).

    Returns:
        summary dict (images, seconds, images_per_s, keys).
    Raises:
        ValueError: bad ``amp`` value.
    """
    s = ExportSeeds.of(p)
    device = get_device(s.device)
    acc = Accel(s.accel(), device, "export_seeds")
    method, model, _ = load_classifier(model_path, device)
    acc.prepare(model)
    t0 = time.time()
    meta = {"method": method.name, "params": s.as_dict(), "num_images": len(ids)}
    with MapWriter(out_path, class_names, meta) as wr:
        for iid in tqdm(ids, desc=f"export_seeds[{method.name}]", unit="img", mininterval=2.0):
            img = load_image(root, iid)
            cids = np.asarray(labels[iid], dtype=np.int64)
            fg = torch.as_tensor(cids - 1, dtype=torch.long)
            if len(fg):
                maps = multiscale_maps(method, model, img, fg, s, device, acc)
                arrays = {k: maps[k].cpu().numpy() for k in method.seed_keys}
                arrays.update({k: maps[k].cpu().numpy() for k in method.aux_keys if k in maps})
            else:
                arrays = {k: np.zeros((0,) + img.shape[:2], np.float32)
                          for k in method.seed_keys + method.aux_keys}
            wr.write(iid, cids, img.shape[:2], **arrays)
    secs = time.time() - t0
    log(f"export_seeds: {len(ids)} images in {secs:.1f}s -> {out_path}")
    return {"images": len(ids), "seconds": round(secs, 1),
            "images_per_s": round(len(ids) / secs, 3) if secs > 0 else None,
            "keys": list(method.seed_keys)}


def evaluate_maps(h5_path: str | Path, root: str | Path, ids: Sequence[str], label_dir: str,
                  key: str, bg_threshold: float | None,
                  curve: Sequence[float] = (),
                  class_names: Sequence[str] | None = None,
                  sweep: Sequence[float] | None = None) -> dict:
    """mIoU of stored maps against ground truth (VOC definition).

    ``bg_threshold`` is the fixed value from params.yaml; ``curve`` optionally reports the
    mIoU at other thresholds for information only — it is never used to pick one.
    ``class_names`` (background first) sets C and the per-class IoU names; None = the class
    list stored in the HDF5 file.

    ``sweep`` (e.g. :data:`pipeline.engine.evaluator.OFFICIAL_SWEEP`): also score every
    background threshold of the list on the ground truth and report the best as
    ``best_threshold_on_gt`` (:func:`pipeline.engine.evaluator.best_threshold_on_gt`; the
    official seed protocol, labelled as such). Channels of
    class 0 (the background channel of refined maps) are dropped for the sweep: the
    background is the constant threshold, as ``evaluation.py --type npy`` builds it. The
    fixed-threshold ``miou`` is computed exactly as without ``sweep``.
    """
    thresholds = [bg_threshold] + [float(t) for t in curve if t != bg_threshold]
    sweep = None if sweep is None else [float(t) for t in sweep]
    with MapReader(h5_path) as rd:
        rd.require(ids, root)
        names = list(class_names if class_names is not None else rd.class_names or VOC_CLASSES)
        ev = Evaluator(root, label_dir, names, streams=list(dict.fromkeys(thresholds)), sweep=sweep)

        def predict(iid: str) -> dict:
            maps, cids, _ = rd.read(iid, key)
            pred = {t: maps_to_label(maps, cids, t) for t in thresholds}
            if sweep is not None:
                fg = cids != 0
                pred[SWEEP] = (maps[fg], cids[fg])
            return pred

        out = ev.run(ids, predict, name=lambda iid: f"of image {iid} from {h5_path}:{key}",
                     desc=f"eval[{Path(h5_path).name}:{key}]")
    out.update({"key": key, "bg_threshold": bg_threshold})
    if bg_threshold is not None and len(thresholds) > 1:
        out["threshold_curve"] = {f"{t:.2f}": ev.scores(t)["miou"] for t in sorted(thresholds)}
    if sweep is not None:
        out["best_threshold_on_gt"] = ev.best_threshold_on_gt(
            None if bg_threshold is not None else
            "maps with a background channel: `miou` is their arg-max (background channel "
            "included); the sweep replaces that channel by the constant threshold, as the "
            "official evaluation.py does with any score map")
    return out
