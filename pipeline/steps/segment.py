"""Final stage of WSSS: train DeepLab-v2 on pseudo labels (test time and scoring:
:mod:`pipeline.steps.segment_eval`).

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
* Loss curve entries are the mean loss over each window of ``log_every`` iterations.

The settings and their defaults (the values above) are :class:`pipeline.io.settings.TrainSeg`.

All randomness is derived from the ``seed`` setting: the model init (``torch.manual_seed``),
the sample order and every per-sample augmentation (a numpy ``Generator`` in the sampler
draws one seed per sample, so results do not depend on ``num_workers``).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.transforms import to_tensor
from pipeline.models.backbones import model_normalisation
from pipeline.data.voc import IGNORE_INDEX, DatasetError, load_image
from pipeline.models.deeplab import DeepLabV2
from pipeline.engine.accel import Accel
from pipeline.engine.distributed import setup as dist_setup
from pipeline.engine.trainer import LossList, PolySchedule, Trainer
from pipeline.io.settings import TrainSeg



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
    slice of each (:meth:`pipeline.engine.distributed.Dist.shard`); incomplete last batch dropped."""

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

    Returns ``(x float32 (3, crop, crop) normalised with (mean, std), y int64 (crop, crop))``;
    padding takes the mean colour (an input of ~0).
    """

    def __init__(self, root, ids, pseudo_dir, crop: int, scale_range, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        self.root, self.ids, self.pseudo_dir = root, list(ids), pseudo_dir
        self.mean, self.std = tuple(mean), tuple(std)
        self.pad_rgb = tuple(int(round(255 * m)) for m in self.mean)
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
            img2[:] = self.pad_rgb
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
        return (to_tensor(np.array(img), self.mean, self.std),
                torch.from_numpy(lab.astype(np.int64)))


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


def build_model(params: TrainSeg | Mapping) -> DeepLabV2:
    """DeepLabV2 from :class:`pipeline.io.settings.TrainSeg` (or a mapping of its keys, e.g. a
    checkpoint's ``params``): backbone, num_classes, pretrained, output_stride, rates."""
    s = TrainSeg.of(params)
    return DeepLabV2(backbone=s.backbone, num_classes=s.num_classes, pretrained=s.pretrained,
                     output_stride=s.output_stride, rates=s.rates)


def train_seg(root: str | Path, ids: Sequence[str], pseudo_dir: str | Path, out_path: str | Path,
              params: TrainSeg | Mapping | None = None, device: str = "cpu",
              log: Callable[[str], Any] = print) -> dict:
    """Train DeepLab-v2 on pseudo labels and save the checkpoint atomically.

    Args:
        root: VOC root with ``JPEGImages/<id>.jpg`` (RGB, any size).
        ids: training image ids (e.g. VOC ``train_aug``).
        pseudo_dir: folder of ``<id>.png`` pseudo labels (P/L mode, same size as the image,
            values 0..num_classes-1, 255 = ignored).
        out_path: checkpoint file; published with :func:`pipeline.io.storage.atomic_torch_save`
            (``<out_path>.tmp``, then renamed). It holds
            ``{"state_dict", "params", "num_classes"}`` (load with :func:`pipeline.steps.segment_eval.load_model`).
        params: :class:`pipeline.io.settings.TrainSeg` or a mapping of its keys (converted
            once here; missing keys take its defaults, the paper values of the module doc):
            backbone, pretrained, num_classes, output_stride, rates, crop, batch_size, iters,
            lr (backbone; head 10x), momentum, weight_decay, poly_power, scale_range
            ``[lo, hi]``, freeze_bn (None = freeze iff pretrained), seed, num_workers,
            log_every, num_threads (torch CPU threads for this call, restored after; None =
            unchanged), checkpoint_every (N > 0: ``<out_path>.resume`` every N iterations; a
            rerun with the same params resumes from it to the same final weights as an
            uninterrupted run; removed at the end), amp / channels_last / compile
            (:mod:`pipeline.engine.accel`). Under ``torchrun``
            (:mod:`pipeline.engine.distributed`): DistributedDataParallel, each rank trains on its
            ``batch_size / world_size`` slice of every global batch, the loss is normalised
            by the global count of labelled pixels, only rank 0 writes files.
        device: torch device string (``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun).
        log: called with progress lines.
    Returns:
        dict: ``loss_curve`` (list of ``{"iter": i, "loss": mean loss of the last log_every
        iterations}``, i 1-based), ``final_loss``, ``wall_time_s``, ``iters``, ``num_images``,
        ``params`` (resolved: :meth:`~pipeline.io.settings.StageSettings.record`, also the
        checkpoint's ``params`` and the resume fingerprint).
    Raises:
        DatasetError: no id, a missing image or pseudo label, size mismatch, or a label value
            outside ``[0, num_classes) ∪ {255}`` (message names the file).
        WeightsError: pretrained weights unavailable.
        ValueError: iters, batch_size or crop out of range, or batch_size not divisible by
            the number of torchrun processes.
        ConfigError: an unknown key, a bad ``amp`` or a value of the wrong type.
        FloatingPointError: the loss became NaN/inf (lr too high).
    """
    s = TrainSeg.of(params)
    with _torch_threads(s.num_threads):
        dd, device = dist_setup(device)
        try:
            out = _train_seg(root, ids, pseudo_dir, out_path, s, device, log, dd)
        except BaseException:
            dd.close(barrier=False)     # the other ranks fail on their next collective
            raise
        dd.close()
        return out


def _train_seg(root, ids, pseudo_dir, out_path, s: TrainSeg, device, log, dd) -> dict:
    ids = list(ids)
    if not ids:
        raise DatasetError("train_seg got an empty id list; check the training split file.")
    _check_files(root, ids, pseudo_dir)
    p = s.record()        # the resolved params (checkpoint, resume fingerprint, metrics)
    seed, iters, bs = s.seed, s.iters, s.batch_size
    if iters < 1 or bs < 1 or s.crop < 8:
        raise ValueError(f"train_seg needs iters >= 1, batch_size >= 1, crop >= 8 "
                         f"(got {iters}, {bs}, {s.crop})")
    log_every = max(1, s.log_every)
    acc = Accel(s.accel(), device, "train_seg")
    dd.per_rank(bs, "train_seg")          # raises unless batch_size divides over the ranks
    freeze = s.freeze_bn
    if freeze is None:
        freeze = s.pretrained not in (None, "", "none", False)

    torch.manual_seed(seed)
    model = build_model(s).to(device)
    model.train()
    if freeze:
        model.freeze_bn()
    acc.prepare(model)
    net = dd.wrap(model, torch.device(device))   # DDP under torchrun, else the model itself
    groups = model.param_groups()
    opt = torch.optim.SGD([{"params": g["params"], "lr": s.lr * g["lr_mult"]} for g in groups],
                          lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)

    schedule = PolySchedule(s.lr, iters, s.poly_power, multiply_first=True)
    trainer = Trainer("train_seg", model, opt, schedule, [g["lr_mult"] for g in groups], out_path,
                      p, s.checkpoint_every, log_every, log, LossList(),
                      acc=acc, dd=dd, device=device,
                      log_line=lambda row: (f"[train_seg] iter {row['iter']}/{iters} loss "
                                            f"{row['loss']:.4f} "
                                            f"lr {opt.param_groups[0]['lr']:.3g}"))
    start = trainer.it
    ds = _SegTrainSet(root, ids, pseudo_dir, s.crop, s.scale_range, s.num_classes,
                      *model_normalisation(model))
    sampler = _SeededSampler(len(ds), iters * bs, seed, start=start * bs)
    nw = s.num_workers
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
        "params": p, "num_classes": s.num_classes})
    return {"loss_curve": curve, "final_loss": curve[-1]["loss"] if curve else math.nan,
            "wall_time_s": wall, "iters": iters, "num_images": len(ids), "params": p}
