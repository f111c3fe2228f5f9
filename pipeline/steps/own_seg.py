"""Evaluation of a single-stage method's own segmentation head (AFA, MCC): the number their
papers report, next to the DeepLabV2 retrained on the pseudo labels.

Test-time augmentation follows the official AFA code (digest ``official-settings.md``,
"AFA (code facts)"): per scale the image and its horizontal flip, logits upsampled to the
image size and averaged over the flip, then merged over scales by element-wise max
(``merge: max``; ``mean`` averages). VOC mIoU with :mod:`pipeline.engine.metrics`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from pipeline.data.transforms import to_tensor
from pipeline.data.classes import VOC_CLASSES
from pipeline.data.voc import load_image
from pipeline.engine.evaluator import Evaluator
from pipeline.engine.inference import multiscale_flip
from pipeline.models.backbones import model_normalisation
from pipeline.models.vit import input_stride
from pipeline.io.settings import EvalOwnSeg


@torch.no_grad()
def predict_own(method, model, image: np.ndarray, p: EvalOwnSeg | Mapping, device) -> torch.Tensor:
    """Multi-scale + flip logits of the method's own head
    (:func:`pipeline.engine.inference.multiscale_flip`): per scale (a multiple of the token stride)
    the mean of the image's and its mirror's upsampled logits, then max (or mean) over scales.

    Args:
        method: a plug-in with ``has_seg_head`` (:meth:`pipeline.methods.base.Method.segment`).
        model: its trained network (eval mode), with ``.vit`` (token stride).
        image: ``(H, W, 3)`` uint8 RGB.
        p: :class:`pipeline.io.settings.EvalOwnSeg` (``scales``, ``flip``, ``merge``: ``max`` |
            ``mean``; defaults there) or a mapping of its keys (converted here); the
            plug-in's ``segment`` gets the keys as given, but the stage's own (``HOST_KEYS``).
    Returns:
        ``(C + 1, H, W)`` float32 logits (background first).
    Raises:
        ValueError: empty ``scales`` or unknown ``merge``.
    """
    s = EvalOwnSeg.of(p)
    scales, merge = list(s.scales), s.merge
    if not scales or merge not in ("max", "mean"):
        raise ValueError(f"eval_own_seg: need scales and merge in (max, mean), got {scales}, {merge!r}")
    x = to_tensor(image, *model_normalisation(model))[None].to(device)
    view = s.as_dict(exclude=EvalOwnSeg.HOST_KEYS)
    out = multiscale_flip(lambda xin: method.segment(model, xin, view).float(), x, scales,
                          flips=(False, True) if s.flip else (False,),
                          resize="stride", stride=input_stride(model), flip_merge="mean",
                          scale_merge=merge)
    return out[0]


def evaluate_own_seg(model_path: str | Path, root: str | Path, ids: Sequence[str], label_dir: str,
                     p: EvalOwnSeg | Mapping, device, log: Callable[[str], None] = print,
                     class_names: Sequence[str] = VOC_CLASSES) -> dict:
    """mIoU of the own segmentation head of the classifier checkpoint ``model_path`` over
    the ``len(class_names)`` classes (background first; the manifest's ``classes``); ``p``:
    :class:`pipeline.io.settings.EvalOwnSeg` or its params (converted once here).

    Returns:
        ``scores_from_confusion`` (miou, iou per VOC class, accuracies) + ``num_images``,
        ``seconds``; or ``{"miou": None, "note": ...}`` when the method has no segmentation
        head (the checkpoint is then not loaded).
    Raises:
        FileNotFoundError: missing checkpoint; DatasetError: missing image/mask.
    """
    s = EvalOwnSeg.of(p)
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"classifier checkpoint {model_path} not found; run the train_cls stage.")
    ck = torch.load(model_path, map_location="cpu", weights_only=False)
    from pipeline.methods import get_method
    if not get_method(ck["method"]).has_seg_head:
        return {"miou": None, "note": f"method {ck['method']} has no segmentation head"}
    from pipeline.steps.cls import load_classifier
    method, model, _ = load_classifier(model_path, device)
    t0 = time.time()

    def predict(iid: str) -> np.ndarray:
        return predict_own(method, model, load_image(root, iid), s, device).argmax(0).cpu().numpy()

    out = Evaluator(root, label_dir, class_names).run(ids, predict, desc=f"eval_own_seg[{method.name}]")
    out["seconds"] = round(time.time() - t0, 1)
    log(f"eval_own_seg: mIoU {out['miou']:.4f} on {len(ids)} images")
    return out
