"""Evaluation of a single-stage method's own segmentation head (AFA, MCC): the number their
papers report, next to the DeepLabV2 retrained on the pseudo labels.

Test-time augmentation follows the official AFA code (digest ``official-settings.md``,
"AFA (code facts)"): per scale the image and its horizontal flip, logits upsampled to the
image size and averaged over the flip, then merged over scales by element-wise max
(``merge: max``; ``mean`` averages). VOC mIoU with :mod:`pipeline.metrics`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .data.transforms import to_tensor
from .data.classes import VOC_CLASSES
from .data.voc import load_image
from .engine.evaluator import Evaluator
from .inference import multiscale_flip
from .models.backbones import model_normalisation
from .models.vit import input_stride


@torch.no_grad()
def predict_own(method, model, image: np.ndarray, p: dict, device) -> torch.Tensor:
    """Multi-scale + flip logits of the method's own head
    (:func:`pipeline.inference.multiscale_flip`): per scale (a multiple of the token stride)
    the mean of the image's and its mirror's upsampled logits, then max (or mean) over scales.

    Args:
        method: a plug-in with ``has_seg_head`` (:meth:`Method.segment`).
        model: its trained network (eval mode), with ``.vit`` (token stride).
        image: ``(H, W, 3)`` uint8 RGB.
        p: ``scales`` (default [1.0]), ``flip`` (default True), ``merge`` (``max`` | ``mean``).
    Returns:
        ``(C + 1, H, W)`` float32 logits (background first).
    Raises:
        ValueError: empty ``scales`` or unknown ``merge``.
    """
    scales = list(p.get("scales", [1.0]))
    merge = p.get("merge", "max")
    if not scales or merge not in ("max", "mean"):
        raise ValueError(f"eval_own_seg: need scales and merge in (max, mean), got {scales}, {merge!r}")
    x = to_tensor(image, *model_normalisation(model))[None].to(device)
    out = multiscale_flip(lambda xin: method.segment(model, xin, p).float(), x, scales,
                          flips=(False, True) if p.get("flip", True) else (False,),
                          resize="stride", stride=input_stride(model), flip_merge="mean",
                          scale_merge=merge)
    return out[0]


def evaluate_own_seg(model_path: str | Path, root: str | Path, ids: Sequence[str], label_dir: str,
                     p: dict, device, log: Callable[[str], None] = print,
                     class_names: Sequence[str] = VOC_CLASSES) -> dict:
    """mIoU of the own segmentation head of the classifier checkpoint ``model_path`` over
    the ``len(class_names)`` classes (background first; the manifest's ``classes``).

    Returns:
        ``scores_from_confusion`` (miou, iou per VOC class, accuracies) + ``num_images``,
        ``seconds``; or ``{"miou": None, "note": ...}`` when the method has no segmentation
        head (the checkpoint is then not loaded).
    Raises:
        FileNotFoundError: missing checkpoint; DatasetError: missing image/mask.
    """
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"classifier checkpoint {model_path} not found; run the train_cls stage.")
    ck = torch.load(model_path, map_location="cpu", weights_only=False)
    from .methods import get_method
    if not get_method(ck["method"]).has_seg_head:
        return {"miou": None, "note": f"method {ck['method']} has no segmentation head"}
    from .cls import load_classifier
    method, model, _ = load_classifier(model_path, device)
    t0 = time.time()

    def predict(iid: str) -> np.ndarray:
        return predict_own(method, model, load_image(root, iid), p, device).argmax(0).cpu().numpy()

    out = Evaluator(root, label_dir, class_names).run(ids, predict, desc=f"eval_own_seg[{method.name}]")
    out["seconds"] = round(time.time() - t0, 1)
    log(f"eval_own_seg: mIoU {out['miou']:.4f} on {len(ids)} images")
    return out
