"""Final stage of WSSS: train DeepLab-v2 on pseudo labels, predict, evaluate.

Settings follow the DeepLab-v2 paper (Chen et al., TPAMI 2017) for PASCAL VOC with the
values of its official Caffe solver (``deeplab-public-ver2``) and of the PyTorch port that
the WSSS repositories retrain with (kazuto1011/deeplab-pytorch, ``configs/voc12.yaml``):

==================  =============================================================
crop                321 x 321 (images padded with the mean colour, labels with 255)
batch               10
optimizer           SGD, lr 2.5e-4 (ASPP head 10x), momentum 0.9, weight decay 5e-4
schedule            poly, ``lr * (1 - it / iters) ** 0.9``, 20k iterations
augmentation        random scale in [0.5, 1.5] (continuous), random crop, h-flip
loss                cross-entropy, ignore_index 255
batch norm          frozen (pretrained statistics), as in the official training
==================  =============================================================

Documented choices where implementations differ:

* Loss resolution: the logits (stride 8) are **upsampled bilinearly to the crop** and the
  loss is taken against the full-resolution pseudo label (as in most WSSS retraining code,
  e.g. the DeepLab-v2 scripts shipped with ToCo/AFA). kazuto1011/deeplab-pytorch instead
  downsamples the label (nearest) to the logit size and adds MSC branches (0.5/0.75 + max);
  that variant is not implemented.
* Test time: softmax probabilities are **averaged** over scales and flips (the paper's
  MSC uses max fusion of logits); optional dense CRF on those probabilities.
* Loss curve entries are the mean loss over each window of ``log_every`` iterations.

All randomness is derived from ``params["seed"]``: the model init (``torch.manual_seed``),
the sample order and every per-sample augmentation (a numpy ``Generator`` in the sampler
draws one seed per sample, so results do not depend on ``num_workers``).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .data.transforms import IMAGENET_MEAN, to_tensor
from .data.classes import VOC_CLASSES
from .data.voc import IGNORE_INDEX, DatasetError, load_image, load_mask, save_mask_png
from .metrics import confusion_matrix, scores_from_confusion
from .models.deeplab import DeepLabV2
from .accel import Accel
from .distributed import setup as dist_setup
from .inference import multiscale_flip
from .storage import atomic_directory
from .engine.trainer import LossList, PolySchedule, Trainer

# Paper-scale defaults (DeepLab-v2, VOC 2012 aug). CPU profiles override them in params.yaml.
DEFAULT_TRAIN_PARAMS: dict[str, Any] = {
    "backbone": "resnet101",
    "pretrained": "hub",          # timm's default ImageNet weights for `backbone`
    "num_classes": len(VOC_CLASSES),   # 21; stages set the manifest's class count
    "output_stride": 8,
    "rates": [6, 12, 18, 24],
    "crop": 321,
    "batch_size": 10,
    "iters": 20000,
    "lr": 2.5e-4,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "poly_power": 0.9,
    "scale_range": [0.5, 1.5],
    "freeze_bn": None,            # None: frozen iff pretrained weights are used
    "seed": 0,
    "num_workers": 4,
    "log_every": 100,
    "num_threads": None,          # torch CPU threads during the call (None: leave as is)
    "checkpoint_every": 0,        # N > 0: <out>.resume every N iterations (kill-safe resume)
    "amp": "off",                 # bf16 | fp16 | off (pipeline.accel)
    "channels_last": False,
    "compile": False,
}

DEFAULT_EVAL_PARAMS: dict[str, Any] = {
    "scales": [0.5, 0.75, 1.0],
    "flip": True,
    "crf": None,  # or a dict of dense_crf keyword arguments
    "num_threads": None,
    "protocols": [],  # extra numbers, any of PROTOCOLS (scored in the same pass)
}

#: Test protocols :func:`evaluate` can score beside the configured one (``protocols``):
#: single scale 1.0 without flip; the configured scales with flip; the same followed by a
#: dense CRF (the configured ``crf``, else :data:`DEEPLAB_CRF`).
PROTOCOLS = ("single_scale", "multi_scale_flip", "multi_scale_flip_crf")

#: DeepLab-v2 post-processing CRF as the WSSS repositories use it (official-settings digest,
#: "DeepLab-v2 post-processing (common)": gaussian 3/3, bilateral w 4, xy 67, rgb 3, 10
#: iterations), for ``multi_scale_flip_crf`` when ``crf`` is not configured.
DEEPLAB_CRF: dict[str, Any] = {"gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 67,
                               "bilateral_srgb": 3, "bilateral_compat": 4, "iters": 10}

_MEAN_RGB = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)  # padding colour (-> ~0 input)


def _resolve(defaults: dict, params: dict | None, log: Callable[[str], Any], what: str) -> dict:
    p = dict(defaults)
    for k, v in (params or {}).items():
        if k not in defaults:
            log(f"[{what}] ignoring unknown parameter {k!r} (known: {sorted(defaults)})")
            continue
        p[k] = v
    return p


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Temporarily ``torch.set_num_threads(n)`` (no-op for None). On a shared 2-core machine
    one thread is several times faster than two oversubscribed ones for these small convs."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def _pseudo_path(pseudo_dir: str | Path, image_id: str) -> Path:
    return Path(pseudo_dir) / f"{image_id}.png"


def _load_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(f"pseudo label {path} has mode {im.mode}; expected a palette "
                                   f"(P) or grey (L) PNG of class indices.")
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError as e:
        raise DatasetError(f"pseudo label {path} is missing; run the make_pseudo_labels stage "
                           f"for this id (or remove the id from the training split).") from e


def _check_files(root: str | Path, ids: Sequence[str], pseudo_dir: str | Path) -> None:
    """Every image and pseudo label exists and their sizes agree (header reads only)."""
    for i in ids:
        ip = Path(root) / "JPEGImages" / f"{i}.jpg"
        lp = _pseudo_path(pseudo_dir, i)
        if not ip.is_file():
            raise DatasetError(f"image {ip} is missing; the dataset at {root} is incomplete.")
        if not lp.is_file():
            raise DatasetError(f"pseudo label {lp} is missing; run the make_pseudo_labels stage "
                               f"for this id (or remove the id from the training split).")
        with Image.open(ip) as a, Image.open(lp) as b:
            if a.size != b.size:
                raise DatasetError(f"pseudo label {lp} is {b.size[0]}x{b.size[1]} (WxH) but image "
                                   f"{ip} is {a.size[0]}x{a.size[1]}; regenerate the label.")


class _SeededSampler(Sampler):
    """Yields ``iters * batch`` items ``(index, sample_seed)``: epoch-wise permutations and one
    augmentation seed per sample, all from ``np.random.default_rng(seed)``. ``start`` skips
    the first ``start`` items (a resumed run sees exactly the rest of the same stream)."""

    def __init__(self, n: int, total: int, seed: int, start: int = 0):
        self.n, self.total, self.seed, self.start = n, total, seed, start

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng(self.seed)
        emitted = 0
        while emitted < self.total:
            for idx in rng.permutation(self.n):
                if emitted >= self.total:
                    return
                sample_seed = int(rng.integers(0, 2**63 - 1))
                if emitted >= self.start:
                    yield int(idx), sample_seed
                emitted += 1


class _RankBatches(Sampler):
    """Groups a sampler's items into global batches of ``batch`` and yields this rank's
    slice of each (:meth:`pipeline.distributed.Dist.shard`); incomplete last batch dropped."""

    def __init__(self, sampler: Sampler, batch: int, dd):
        self.sampler, self.batch, self.dd = sampler, int(batch), dd

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def __iter__(self):
        buf = []
        for item in self.sampler:
            buf.append(item)
            if len(buf) == self.batch:
                yield self.dd.shard(buf)
                buf = []


class _SegTrainSet(Dataset):
    """Random scale, pad, crop, flip of (image, pseudo label); item = ``(index, seed)``.

    Returns ``(x float32 (3, crop, crop) ImageNet-normalised, y int64 (crop, crop))``.
    """

    def __init__(self, root, ids, pseudo_dir, crop: int, scale_range, num_classes: int):
        self.root, self.ids, self.pseudo_dir = root, list(ids), pseudo_dir
        self.crop = int(crop)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item):
        idx, seed = item
        rng = np.random.default_rng(seed)
        image_id = self.ids[idx]
        img = load_image(self.root, image_id)
        lp = _pseudo_path(self.pseudo_dir, image_id)
        lab = _load_label(lp)
        if img.shape[:2] != lab.shape:
            raise DatasetError(f"pseudo label {lp} has shape {lab.shape} but the image has "
                               f"{img.shape[:2]}; regenerate the label.")
        bad = (lab >= self.num_classes) & (lab != IGNORE_INDEX)
        if bad.any():
            raise DatasetError(f"pseudo label {lp} contains class ids {np.unique(lab[bad])[:5]} "
                               f">= num_classes {self.num_classes} (only 255 may exceed).")
        h, w = lab.shape
        s = rng.uniform(*self.scale_range)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        if (nh, nw) != (h, w):
            img = np.array(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
            lab = np.array(Image.fromarray(lab).resize((nw, nh), Image.NEAREST))
        c = self.crop
        ph, pw = max(c - nh, 0), max(c - nw, 0)
        if ph or pw:
            img2 = np.empty((nh + ph, nw + pw, 3), np.uint8)
            img2[:] = _MEAN_RGB
            img2[:nh, :nw] = img
            lab2 = np.full((nh + ph, nw + pw), IGNORE_INDEX, np.uint8)
            lab2[:nh, :nw] = lab
            img, lab = img2, lab2
        H, W = lab.shape
        y0 = int(rng.integers(0, H - c + 1))
        x0 = int(rng.integers(0, W - c + 1))
        img = img[y0:y0 + c, x0:x0 + c]
        lab = lab[y0:y0 + c, x0:x0 + c]
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        return to_tensor(np.array(img)), torch.from_numpy(lab.astype(np.int64))


def seg_loss(logits: torch.Tensor, target: torch.Tensor,
             denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of stride-8 logits upsampled (bilinear) to the label size.

    Args:
        logits: float ``(B, C, h, w)``.
        target: int64 ``(B, H, W)``, class ids in ``[0, C)`` or 255 (ignored).
        denominator: divide the summed loss by this instead of the number of non-ignored
            pixels of ``target`` (data-parallel training passes the global count / world
            size, so that averaging the ranks' gradients gives the gradient of the global
            per-pixel mean even when ranks hold different numbers of ignored pixels).
    Returns:
        scalar: mean over non-ignored pixels (0 with zero gradient when all are ignored,
        instead of PyTorch's NaN).
    Source: DeepLab-v2 softmax loss with ``ignore_label: 255``.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    if denominator is not None:
        return total / denominator
    valid = (target != IGNORE_INDEX).sum().clamp(min=1)
    return total / valid


def build_model(params: dict) -> DeepLabV2:
    """DeepLabV2 from resolved train params (keys backbone, num_classes, pretrained,
    output_stride, rates)."""
    return DeepLabV2(backbone=params["backbone"], num_classes=int(params["num_classes"]),
                     pretrained=params.get("pretrained"), output_stride=int(params["output_stride"]),
                     rates=tuple(params["rates"]))


def train_seg(root: str | Path, ids: Sequence[str], pseudo_dir: str | Path, out_path: str | Path,
              params: dict | None = None, device: str = "cpu",
              log: Callable[[str], Any] = print) -> dict:
    """Train DeepLab-v2 on pseudo labels and save the checkpoint atomically.

    Args:
        root: VOC root with ``JPEGImages/<id>.jpg`` (RGB, any size).
        ids: training image ids (e.g. VOC ``train_aug``).
        pseudo_dir: folder of ``<id>.png`` pseudo labels (P/L mode, same size as the image,
            values 0..num_classes-1, 255 = ignored).
        out_path: checkpoint file; published with :func:`pipeline.utils.atomic_torch_save`
            (``<out_path>.tmp``, then renamed). It holds
            ``{"state_dict", "params", "num_classes"}`` (load with :func:`load_model`).
        params: overrides of :data:`DEFAULT_TRAIN_PARAMS` (paper values, see module doc):
            backbone, pretrained, num_classes, output_stride, rates, crop, batch_size, iters,
            lr (backbone; head 10x), momentum, weight_decay, poly_power, scale_range
            ``[lo, hi]``, freeze_bn (None = freeze iff pretrained), seed, num_workers,
            log_every, num_threads (torch CPU threads for this call, restored after; None =
            unchanged), checkpoint_every (N > 0: ``<out_path>.resume`` every N iterations; a
            rerun with the same params resumes from it to the same final weights as an
            uninterrupted run; removed at the end), amp / channels_last / compile
            (:mod:`pipeline.accel`). Unknown keys are logged and ignored. Under ``torchrun``
            (:mod:`pipeline.distributed`): DistributedDataParallel, each rank trains on its
            ``batch_size / world_size`` slice of every global batch, the loss is normalised
            by the global count of labelled pixels, only rank 0 writes files.
        device: torch device string (``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun).
        log: called with progress lines.
    Returns:
        dict: ``loss_curve`` (list of ``{"iter": i, "loss": mean loss of the last log_every
        iterations}``, i 1-based), ``final_loss``, ``wall_time_s``, ``iters``, ``num_images``,
        ``params`` (resolved).
    Raises:
        DatasetError: no id, a missing image or pseudo label, size mismatch, or a label value
            outside ``[0, num_classes) ∪ {255}`` (message names the file).
        WeightsError: pretrained weights unavailable.
        ValueError: iters, batch_size or crop out of range, bad ``amp``, or batch_size not
            divisible by the number of torchrun processes.
        FloatingPointError: the loss became NaN/inf (lr too high).
    """
    p = _resolve(DEFAULT_TRAIN_PARAMS, params, log, "train_seg")
    with _torch_threads(p["num_threads"]):
        dd, device = dist_setup(device)
        try:
            out = _train_seg(root, ids, pseudo_dir, out_path, p, device, log, dd)
        except BaseException:
            dd.close(barrier=False)     # the other ranks fail on their next collective
            raise
        dd.close()
        return out


def _train_seg(root, ids, pseudo_dir, out_path, p: dict, device, log, dd) -> dict:
    ids = list(ids)
    if not ids:
        raise DatasetError("train_seg got an empty id list; check the training split file.")
    _check_files(root, ids, pseudo_dir)
    seed, iters, bs = int(p["seed"]), int(p["iters"]), int(p["batch_size"])
    if iters < 1 or bs < 1 or int(p["crop"]) < 8:
        raise ValueError(f"train_seg needs iters >= 1, batch_size >= 1, crop >= 8 "
                         f"(got {iters}, {bs}, {p['crop']})")
    log_every = max(1, int(p["log_every"]))
    acc = Accel(p, device, "train_seg")
    dd.per_rank(bs, "train_seg")          # raises unless batch_size divides over the ranks
    freeze = p["freeze_bn"]
    if freeze is None:
        freeze = p["pretrained"] not in (None, "", "none", False)

    torch.manual_seed(seed)
    model = build_model(p).to(device)
    model.train()
    if freeze:
        model.freeze_bn()
    acc.prepare(model)
    net = dd.wrap(model, torch.device(device))   # DDP under torchrun, else the model itself
    groups = model.param_groups()
    opt = torch.optim.SGD([{"params": g["params"], "lr": float(p["lr"]) * g["lr_mult"]}
                           for g in groups],
                          lr=float(p["lr"]), momentum=float(p["momentum"]),
                          weight_decay=float(p["weight_decay"]))

    schedule = PolySchedule(float(p["lr"]), iters, float(p["poly_power"]), multiply_first=True)
    trainer = Trainer("train_seg", model, opt, schedule, [g["lr_mult"] for g in groups], out_path,
                      p, int(p["checkpoint_every"] or 0), log_every, log, LossList(),
                      acc=acc, dd=dd, device=device,
                      log_line=lambda row: (f"[train_seg] iter {row['iter']}/{iters} loss "
                                            f"{row['loss']:.4f} "
                                            f"lr {opt.param_groups[0]['lr']:.3g}"))
    start = trainer.it
    ds = _SegTrainSet(root, ids, pseudo_dir, p["crop"], p["scale_range"], p["num_classes"])
    sampler = _SeededSampler(len(ds), iters * bs, seed, start=start * bs)
    nw = int(p["num_workers"])
    batching = ({"batch_size": bs, "sampler": sampler, "drop_last": True} if not dd.enabled else
                {"batch_sampler": _RankBatches(sampler, bs, dd)})
    loader = DataLoader(ds, **batching, num_workers=nw,
                        generator=torch.Generator().manual_seed(seed),
                        pin_memory=str(device).startswith("cuda"),
                        persistent_workers=False)

    def step(batch, it):
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True)
        denom = None
        if dd.enabled:     # global labelled-pixel count / world (see seg_loss)
            denom = dd.sum_((y != IGNORE_INDEX).sum()).clamp(min=1).double() / dd.world
        return seg_loss(net(acc.input(x)), y, denom), {}

    t0 = time.time()
    curve = trainer.run(loader, step)
    wall = time.time() - t0
    trainer.save_checkpoint(lambda: {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "params": p, "num_classes": int(p["num_classes"])})
    return {"loss_curve": curve, "final_loss": curve[-1]["loss"] if curve else math.nan,
            "wall_time_s": wall, "iters": iters, "num_images": len(ids), "params": p}


def load_model(path: str | Path, device: str = "cpu") -> DeepLabV2:
    """Rebuild the DeepLabV2 saved by :func:`train_seg` (random init, then its state dict),
    on ``device``, in eval mode.

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
    was_training = model.training
    model.eval()
    H, W = image.shape[:2]
    x = to_tensor(image.astype(np.uint8))[None].to(device)
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
    model.train(was_training)
    return out


def evaluate(model: DeepLabV2, root: str | Path, ids: Sequence[str], label_dir: str,
             pred_dir: str | Path, params: dict | None = None, device: str = "cpu",
             log: Callable[[str], Any] = print,
             class_names: Sequence[str] | None = None) -> dict:
    """Predict, save and score every id.

    ``params`` (:data:`DEFAULT_EVAL_PARAMS`): scales, flip, crf, num_threads (as in
    :func:`train_seg`), protocols. For each id: :func:`predict` (scales, flip), optional dense CRF
    (``params["crf"]``: None, or the keyword arguments of
    ``pipeline.refine.crf.dense_crf``), argmax, palette PNG ``<pred_dir>/<id>.png`` (uint8
    class ids), confusion matrix against ``load_mask(root, id, label_dir)`` (255 ignored).
    ``pred_dir`` is written atomically with :func:`pipeline.storage.atomic_directory`: into
    ``<pred_dir>.tmp/``, then renamed (an existing ``pred_dir`` is replaced; on a failure the
    temporary folder is removed and ``pred_dir`` left as it was). ``class_names`` (background
    first, the manifest's ``classes``) names the per-class IoU; None = the VOC names for a
    21-class model, else ``"0".."C-1"``.

    ``params["protocols"]`` (any of :data:`PROTOCOLS`) adds, in the same pass (one forward
    per scale and flip, see :func:`predict_protocols`), the numbers papers report side by
    side: ``single_scale`` (scale 1.0, no flip, no CRF), ``multi_scale_flip`` (the configured
    ``scales`` with flip, no CRF) and ``multi_scale_flip_crf`` (that, then a dense CRF with the
    configured ``crf``, else :data:`DEEPLAB_CRF`). A protocol equal to the configured one
    reuses its predictions. Only the configured predictions are saved.

    Returns:
        ``scores_from_confusion(conf, class_names)`` (miou, pixel_accuracy, mean_accuracy,
        iou per class) of the configured protocol plus ``num_images``, ``eval_params``
        (resolved settings), ``configured_as`` (the name in :data:`PROTOCOLS` that the
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
    p = _resolve(DEFAULT_EVAL_PARAMS, params, log, "evaluate")
    with _torch_threads(p["num_threads"]):
        return _evaluate(model, root, ids, label_dir, pred_dir, p, device, log, class_names)


def protocol_settings(p: dict) -> dict[str, dict]:
    """``{protocol: {"scales", "flip", "crf", "same_as_configured"}}`` for every name of
    :data:`PROTOCOLS`, from resolved eval params ``p`` (scales, flip, crf)."""
    scales, flip, crf = [float(s) for s in p["scales"]], bool(p["flip"]), p["crf"] or None
    return {
        "single_scale": {"scales": [1.0], "flip": False, "crf": None,
                         "same_as_configured": scales == [1.0] and not flip and not crf},
        "multi_scale_flip": {"scales": scales, "flip": True, "crf": None,
                             "same_as_configured": flip and not crf},
        "multi_scale_flip_crf": {"scales": scales, "flip": True, "crf": dict(crf or DEEPLAB_CRF),
                                 "same_as_configured": flip and bool(crf)},
    }


def _evaluate(model, root, ids, label_dir, pred_dir, p: dict, device, log, class_names=None) -> dict:
    from tqdm import tqdm

    C = int(model.num_classes)
    if class_names is not None and len(class_names) != C:
        raise ValueError(f"the segmentation model predicts {C} classes but the dataset has "
                         f"{len(class_names)}; retrain train_seg for this dataset.")
    names = (list(class_names) if class_names is not None else
             VOC_CLASSES if C == len(VOC_CLASSES) else [str(i) for i in range(C)])
    want = list(dict.fromkeys(p["protocols"] or []))
    unknown = [w for w in want if w not in PROTOCOLS]
    if unknown:
        raise ValueError(f"eval_seg.protocols: unknown {unknown}; known: {list(PROTOCOLS)}")
    settings = protocol_settings(p)
    crf = p["crf"]
    if crf or "multi_scale_flip_crf" in want:
        from .refine.crf import dense_crf  # lazy: optional dependency (pydensecrf)
    conf = np.zeros((C, C), dtype=np.int64)
    pconf = {w: np.zeros((C, C), dtype=np.int64) for w in want}
    crf_seconds = 0.0
    ids = list(ids)
    with atomic_directory(pred_dir) as tmp:
        for image_id in tqdm(ids, desc="evaluate", file=sys.stderr,
                             mininterval=1.0 if sys.stderr.isatty() else 30.0):
            img = load_image(root, image_id)
            gt = load_mask(root, image_id, label_dir)
            if gt.shape != img.shape[:2]:
                raise DatasetError(f"mask {Path(root) / label_dir / (image_id + '.png')} has shape "
                                   f"{gt.shape} but image {image_id} has {img.shape[:2]}.")
            probs = predict_protocols(
                model, img, scales=tuple(p["scales"]), flip=bool(p["flip"]), device=device,
                single_scale="single_scale" in want and not settings["single_scale"]["same_as_configured"],
                multi_scale_flip=any(w.startswith("multi_scale_flip") and not settings[w]["same_as_configured"]
                                     for w in want))
            prob = probs["configured"]
            if crf:
                prob = dense_crf(img, prob, **crf)
            pred = prob.argmax(0).astype(np.uint8)
            save_mask_png(tmp / f"{image_id}.png", pred)
            what = f"of image {image_id}"
            c = confusion_matrix(pred, gt, C, name=what)
            conf += c
            for w in want:
                if settings[w]["same_as_configured"]:
                    pconf[w] += c
                    continue
                if w == "multi_scale_flip_crf":
                    t0 = time.perf_counter()
                    wp = dense_crf(img, probs["multi_scale_flip"], **settings[w]["crf"])
                    crf_seconds += time.perf_counter() - t0
                else:
                    wp = probs[w]
                pconf[w] += confusion_matrix(wp.argmax(0).astype(np.uint8), gt, C, name=what)
    scores = scores_from_confusion(conf, names)
    scores["num_images"] = len(ids)
    scores["eval_params"] = p
    scores["configured_as"] = next((w for w in PROTOCOLS if settings[w]["same_as_configured"]), None)
    if want:
        scores["protocols"] = {}
        for w in want:
            scores["protocols"][w] = {**scores_from_confusion(pconf[w], names), **settings[w]}
            if w == "multi_scale_flip_crf" and not settings[w]["same_as_configured"]:
                scores["protocols"][w]["crf_seconds"] = round(crf_seconds, 3)
    log(f"[evaluate] {len(ids)} images, mIoU {scores['miou']:.4f}"
        + "".join(f", {w} {scores['protocols'][w]['miou']:.4f}" for w in want))
    return scores
