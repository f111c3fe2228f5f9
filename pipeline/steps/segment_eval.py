"""DeepLab-v2 test time: load the checkpoint of :func:`pipeline.steps.segment.train_seg`, predict
with multi-scale + flip testing, score the validation split (VOC mIoU, optional dense CRF,
the test protocols papers report side by side).

* Test time: softmax probabilities are **averaged** over scales and flips (the paper's
  MSC uses max fusion of logits); optional dense CRF on those probabilities.
* Scoring: :class:`pipeline.engine.evaluator.Evaluator` (one stream per protocol, one pass).
* Settings and their defaults: :class:`pipeline.io.settings.EvalSeg`.

Source: DeepLab-v2 (Chen et al., TPAMI 2017) multi-scale testing (0.5/0.75/1.0) and CRF
post-processing; settings in ``shared/reference/official-settings.md``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from pipeline.data.classes import VOC_CLASSES
from pipeline.data.transforms import to_tensor
from pipeline.models.backbones import input_normalisation, model_normalisation
from pipeline.data.voc import DatasetError, load_image
from pipeline.engine.evaluator import Evaluator
from pipeline.engine.inference import multiscale_flip
from pipeline.engine.runtime import eval_mode
from pipeline.models.deeplab import DeepLabV2
from pipeline.steps.segment import _torch_threads, build_model
from pipeline.io.settings import EvalSeg

#: Test protocols :func:`evaluate` can score beside the configured one (``protocols``):
#: single scale 1.0 without flip; the configured scales with flip; the same followed by a
#: dense CRF (the configured ``crf``, else :data:`DEEPLAB_CRF`).
PROTOCOLS = ("single_scale", "multi_scale_flip", "multi_scale_flip_crf")

#: DeepLab-v2 post-processing CRF as the WSSS repositories use it (official-settings digest,
#: "DeepLab-v2 post-processing (common)": gaussian 3/3, bilateral w 4, xy 67, rgb 3, 10
#: iterations), for ``multi_scale_flip_crf`` when ``crf`` is not configured.
DEEPLAB_CRF: dict[str, Any] = {"gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 67,
                               "bilateral_srgb": 3, "bilateral_compat": 4, "iters": 10}


def load_model(path: str | Path, device: str = "cpu") -> DeepLabV2:
    """Rebuild the DeepLabV2 saved by :func:`pipeline.steps.segment.train_seg` (random init, then
    its state dict), on ``device``, in eval mode.

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (run the train_seg stage).
        KeyError: the file is not a train_seg checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation checkpoint {path} does not exist; run train_seg.")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("state_dict", "params", "num_classes"):
        if k not in ck:
            raise KeyError(f"{path} is not a train_seg checkpoint (no {k!r} entry)")
    p = dict(ck["params"], pretrained=None, num_classes=ck["num_classes"])
    model = build_model(p)
    model.load_state_dict(ck["state_dict"])
    model.input_norm = input_normalisation(ck["params"].get("pretrained"))  # as in training
    return model.to(device).eval()


@torch.no_grad()
def predict(model: DeepLabV2, image: np.ndarray, scales: Sequence[float] = (0.5, 0.75, 1.0),
            flip: bool = True, device: str = "cpu") -> np.ndarray:
    """Multi-scale (+ flip) class probabilities for one image.

    Args:
        model: DeepLabV2 (run in eval mode; its previous mode is restored).
        image: uint8 ``(H, W, 3)`` RGB.
        scales: input resize factors (bilinear); each output is upsampled (bilinear) to H x W.
        flip: also run the horizontally flipped image and flip its output back.
    Returns:
        float32 ``(C, H, W)``: mean over scales (and flips) of the softmax probabilities;
        values in [0, 1], summing to 1 over C.
    Raises:
        ValueError: image not ``(H, W, 3)`` uint8-like, or empty ``scales``.
    Source: DeepLab-v2 multi-scale testing (0.5/0.75/1.0); fusion by averaging probabilities
    (the paper max-fuses logits; documented difference).
    """
    return predict_protocols(model, image, scales, flip, device)["configured"]


@torch.no_grad()
def predict_protocols(model: DeepLabV2, image: np.ndarray, scales: Sequence[float] = (0.5, 0.75, 1.0),
                      flip: bool = True, device: str = "cpu", single_scale: bool = False,
                      multi_scale_flip: bool = False) -> dict[str, np.ndarray]:
    """:func:`predict` and, from the same forward passes, the probabilities of the test
    protocols papers report side by side.

    Returns ``{"configured": predict(model, image, scales, flip)}`` plus, when asked:

    * ``"single_scale"``: softmax of one forward of the image at scale 1.0, no flip — the
      unflipped half of the scale-1.0 batch when 1.0 is in ``scales`` (no extra forward),
      else one extra forward;
    * ``"multi_scale_flip"``: mean over ``scales`` x {image, flip} — the configured result
      itself when ``flip`` is on, else the configured passes plus one extra forward of each
      flipped scale.

    ``configured`` is computed exactly as before (same batches, same order of sums), so its
    value does not depend on which extra protocols are asked for.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"predict expects an (H, W, 3) image, got shape {image.shape}")
    if len(scales) == 0:
        raise ValueError("predict needs at least one scale")
    with eval_mode(model):
        H, W = image.shape[:2]
        x = to_tensor(image.astype(np.uint8), *model_normalisation(model))[None].to(device)
        # mean over passes = the sum / n, kept apart because the flip-less multi_scale_flip
        # protocol adds its mirrored passes to the same sum
        opts = dict(flip_batch=True, resize="round", softmax=True, flip_merge="sum",
                    scale_merge="sum")
        single: list[torch.Tensor] = []

        def tap(s: float, flipped: bool, m: torch.Tensor) -> None:
            if single_scale and not single and s == 1.0 and not flipped:
                single.append(m[0])

        acc = multiscale_flip(model, x, scales, flips=(False, True) if flip else (False,),
                              on_pass=tap, **opts)[0]
        n = len(scales) * (2 if flip else 1)
        out = {"configured": (acc / n).cpu().numpy().astype(np.float32)}
        if single_scale:
            if not single:
                single.append(multiscale_flip(model, x, [1.0], flips=(False,), **opts)[0])
            out["single_scale"] = single[0].cpu().numpy().astype(np.float32)
        if multi_scale_flip:
            if flip:
                out["multi_scale_flip"] = out["configured"]
            else:
                extra = multiscale_flip(model, x, scales, flips=(True,), **opts)[0]
                out["multi_scale_flip"] = ((acc + extra) / (2 * n)).cpu().numpy().astype(np.float32)
    return out


def evaluate(model: DeepLabV2, root: str | Path, ids: Sequence[str], label_dir: str,
             pred_dir: str | Path, params: EvalSeg | Mapping | None = None, device: str = "cpu",
             log: Callable[[str], Any] = print,
             class_names: Sequence[str] | None = None) -> dict:
    """Predict, save and score every id.

    ``params``: :class:`pipeline.io.settings.EvalSeg` or a mapping of its keys (converted once
    here; missing keys take its defaults): scales, flip, crf, num_threads (as in
    :func:`pipeline.steps.segment.train_seg`), protocols. For each id: :func:`predict` (scales,
    flip), optional dense CRF (``crf``: None, or the keyword arguments of
    ``pipeline.steps.refine.crf.dense_crf``), argmax, palette PNG ``<pred_dir>/<id>.png`` (uint8
    class ids), confusion matrix against ``load_mask(root, id, label_dir)`` (255 ignored),
    all in one :meth:`pipeline.engine.evaluator.Evaluator.run` (one stream per protocol).
    ``pred_dir`` is written atomically with :func:`pipeline.io.storage.atomic_directory`: into
    ``<pred_dir>.tmp/``, then renamed (an existing ``pred_dir`` is replaced; on a failure the
    temporary folder is removed and ``pred_dir`` left as it was). ``class_names`` (background
    first, the manifest's ``classes``) names the per-class IoU; None = the VOC names for a
    21-class model, else ``"0".."C-1"``.

    ``protocols`` (any of :data:`PROTOCOLS`) adds, in the same pass (one forward
    per scale and flip, see :func:`predict_protocols`), the numbers papers report side by
    side: ``single_scale`` (scale 1.0, no flip, no CRF), ``multi_scale_flip`` (the configured
    ``scales`` with flip, no CRF) and ``multi_scale_flip_crf`` (that, then a dense CRF with the
    configured ``crf``, else :data:`DEEPLAB_CRF`). A protocol equal to the configured one
    reuses its predictions. Only the configured predictions are saved.

    Returns:
        ``scores_from_confusion(conf, class_names)`` (miou, pixel_accuracy, mean_accuracy,
        iou per class) of the configured protocol plus ``num_images``, ``eval_params``
        (resolved settings, :meth:`~pipeline.io.settings.StageSettings.record`), ``configured_as`` (the name in :data:`PROTOCOLS` that the
        configured settings equal, else None) and, when ``protocols`` is not empty,
        ``protocols``: ``{name: scores_from_confusion(...) + {"scales", "flip", "crf",
        "same_as_configured"}}`` (``multi_scale_flip_crf`` also has ``crf_seconds``, the
        time spent in its CRF when it is not the configured one).
    Raises:
        DatasetError: missing image/mask, or mask size differs from the image.
        ValueError: ``class_names`` length differs from the model's class count, or an
            unknown protocol name.
    Source: VOC mIoU (confusion matrix, nanmean over occurring classes); DeepLab-v2 test with
    multi-scale inputs and optional CRF post-processing.
    """
    s = EvalSeg.of(params)
    with _torch_threads(s.num_threads):
        return _evaluate(model, root, ids, label_dir, pred_dir, s, device, log, class_names)


def protocol_settings(p: EvalSeg | Mapping) -> dict[str, dict]:
    """``{protocol: {"scales", "flip", "crf", "same_as_configured"}}`` for every name of
    :data:`PROTOCOLS`, from :class:`pipeline.io.settings.EvalSeg` (or its params): scales,
    flip, crf."""
    s = EvalSeg.of(p)
    scales, flip, crf = list(s.scales), s.flip, s.crf or None
    return {
        "single_scale": {"scales": [1.0], "flip": False, "crf": None,
                         "same_as_configured": scales == [1.0] and not flip and not crf},
        "multi_scale_flip": {"scales": scales, "flip": True, "crf": None,
                             "same_as_configured": flip and not crf},
        "multi_scale_flip_crf": {"scales": scales, "flip": True, "crf": dict(crf or DEEPLAB_CRF),
                                 "same_as_configured": flip and bool(crf)},
    }


def _evaluate(model, root, ids, label_dir, pred_dir, s: EvalSeg, device, log, class_names=None) -> dict:
    C = int(model.num_classes)
    if class_names is not None and len(class_names) != C:
        raise ValueError(f"the segmentation model predicts {C} classes but the dataset has "
                         f"{len(class_names)}; retrain train_seg for this dataset.")
    names = (list(class_names) if class_names is not None else
             VOC_CLASSES if C == len(VOC_CLASSES) else [str(i) for i in range(C)])
    want = list(dict.fromkeys(s.protocols or []))
    unknown = [w for w in want if w not in PROTOCOLS]
    if unknown:
        raise ValueError(f"eval_seg.protocols: unknown {unknown}; known: {list(PROTOCOLS)}")
    settings = protocol_settings(s)
    crf = s.crf
    if crf or "multi_scale_flip_crf" in want:
        from pipeline.steps.refine.crf import dense_crf  # lazy: optional dependency (pydensecrf)
    ev = Evaluator(root, label_dir, names, streams=["configured", *want])
    crf_seconds = [0.0]

    def predict(image_id: str) -> dict[str, np.ndarray]:
        """``{"configured": label, protocol: label, ...}`` (uint8 ``(H, W)``); a protocol
        equal to the configured one is the same array (scored once)."""
        img = load_image(root, image_id)
        gt = ev.ground_truth(image_id)
        if gt.shape != img.shape[:2]:
            raise DatasetError(f"mask {Path(root) / label_dir / (image_id + '.png')} has shape "
                               f"{gt.shape} but image {image_id} has {img.shape[:2]}.")
        probs = predict_protocols(
            model, img, scales=s.scales, flip=s.flip, device=device,
            single_scale="single_scale" in want and not settings["single_scale"]["same_as_configured"],
            multi_scale_flip=any(w.startswith("multi_scale_flip") and not settings[w]["same_as_configured"]
                                 for w in want))
        prob = probs["configured"]
        if crf:
            prob = dense_crf(img, prob, **crf)
        out = {"configured": prob.argmax(0).astype(np.uint8)}
        for w in want:
            if settings[w]["same_as_configured"]:
                out[w] = out["configured"]
                continue
            if w == "multi_scale_flip_crf":
                t0 = time.perf_counter()
                wp = dense_crf(img, probs["multi_scale_flip"], **settings[w]["crf"])
                crf_seconds[0] += time.perf_counter() - t0
            else:
                wp = probs[w]
            out[w] = wp.argmax(0).astype(np.uint8)
        return out

    scores = ev.run(ids, predict, desc="evaluate", save_dir=pred_dir)
    scores["eval_params"] = s.record()
    scores["configured_as"] = next((w for w in PROTOCOLS if settings[w]["same_as_configured"]), None)
    if want:
        scores["protocols"] = {}
        for w in want:
            scores["protocols"][w] = {**ev.scores(w), **settings[w]}
            if w == "multi_scale_flip_crf" and not settings[w]["same_as_configured"]:
                scores["protocols"][w]["crf_seconds"] = round(crf_seconds[0], 3)
    log(f"[evaluate] {scores['num_images']} images, mIoU {scores['miou']:.4f}"
        + "".join(f", {w} {scores['protocols'][w]['miou']:.4f}" for w in want))
    return scores
