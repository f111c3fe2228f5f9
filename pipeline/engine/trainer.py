"""The training loop that train_cls, train_affinity and train_seg share.

Each stage keeps its own data (dataset, sampler, batch order), model, loss and optimiser and
configures one :class:`Trainer`, which owns the machinery around them:

* the loop of ``iters`` optimiser steps over the stage's batch iterator;
* the learning rate of every parameter group at every iteration (:class:`PolySchedule`:
  poly decay with optional linear warm-up);
* the NaN/inf guard: a non-finite loss stops the run with a :class:`FloatingPointError`
  naming the stage, the iteration, the batch's image ids (where the stage can tell them)
  and the fix;
* windowed loss logging into ``curve`` (one row every ``log_every`` iterations and at the
  last one; :class:`RunningSums` or :class:`LossList` for the window);
* the tqdm progress bar;
* resume files (:class:`pipeline.engine.runtime.ResumeFile`): saved every ``checkpoint_every``
  iterations, loaded when the trainer is built, removed after the final checkpoint;
* AMP (:class:`pipeline.engine.accel.Accel`): the step's forward under autocast, backward and
  optimiser step through the fp16 GradScaler;
* data parallel (:class:`pipeline.engine.distributed.Dist`): logged values averaged over the ranks
  (so every rank sees the same NaN and raises together), optional gradient all-reduce before
  the optimiser step (train_cls; train_seg's DistributedDataParallel averages by itself),
  only rank 0 logs and writes files.

One iteration (0-based ``it``), in this order: set every group's lr; ``loss, parts =
step(batch, it)`` under autocast; ``logged = {"loss": float(loss), **parts}`` (mean over
ranks); NaN guard; ``zero_grad``; backward and step (gradient averaging in between);
``after_step(it)``; the window takes ``logged``; ``it + 1`` iterations are done: curve row
when due, resume file when due. This is the order the three loops had before they were
merged here, so their weights, curves and resume files are bit-identical to theirs.
"""
from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.engine.accel import Accel
from pipeline.engine.distributed import Dist
from pipeline.engine.runtime import ResumeFile, rng_states, set_rng_states
from pipeline.io.storage import atomic_torch_save


def poly_lr(base_lr: float, it: int, max_it: int, power: float = 0.9, warmup: int = 0,
            warmup_start: float = 0.0) -> float:
    """Poly schedule ``lr = base (1 - it/max)^power`` with optional linear warm-up.

    Args:
        base_lr: peak learning rate; it: 0-based iteration; max_it: number of iterations.
        power: poly exponent (DeepLab / PSA: 0.9).
        warmup: iterations of linear warm-up (0 = none): for ``it < warmup`` the lr is
            ``warmup_start + (base - warmup_start) * it / warmup``.
    Returns:
        the learning rate (float; ``it`` is clamped to ``max_it - 1`` in the poly part, so
        it stays > 0 up to the last iteration).
    Source: DeepLab-v2 "poly" policy (Chen et al., TPAMI 2017); PSA ``PolyOptimizer``.
    """
    if warmup > 0 and it < warmup:
        return warmup_start + (base_lr - warmup_start) * it / warmup
    return base_lr * (1.0 - min(it, max_it - 1) / max_it) ** power


def mult_at(mult: float | Sequence[Sequence[float]], it: int) -> float:
    """A group's lr multiplier at 0-based iteration ``it``: ``mult`` itself if a number, else
    the value of the last ``[start_iter, value]`` pair of the piecewise-constant schedule
    ``mult`` with ``start_iter <= it`` (e.g. ``[[0, 10], [165, 1]]``: 10x for the first 165
    iterations, then 1x; a staged warm-up such as ViT-PCM's head-only epoch).

    Raises:
        ValueError: a schedule that is empty, does not start at iteration 0, or whose starts
            do not increase.
    """
    if isinstance(mult, numbers.Real):
        return float(mult)
    pairs = [(int(a), float(b)) for a, b in mult]
    if not pairs or pairs[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(pairs, pairs[1:])):
        raise ValueError(f"a piecewise lr multiplier must be [[0, m0], [i1, m1], ...] with "
                         f"increasing start iterations, got {mult!r}")
    value = pairs[0][1]
    for start, m in pairs:
        if start > it:
            break
        value = m
    return value


@dataclass(frozen=True)
class PolySchedule:
    """Poly learning rate with optional linear warm-up, per parameter group.

    Group ``g`` with multiplier ``m_g`` gets, at 0-based iteration ``it``:

    * ``multiply_first=False`` (train_cls): ``poly_lr(base_lr, it, ...) * m_g``;
    * ``multiply_first=True`` (train_seg, train_affinity): ``poly_lr(base_lr * m_g, it, ...)``
      = ``(base_lr * m_g) * (1 - it/iters)^power`` (warm-up from ``warmup_start * m_g``).

    The two orders round differently when ``m_g != 1`` (e.g. 6e-5 with a 10x head differs
    in the last bit at 8887 of 20000 iterations), and each stage keeps the order it always
    had, so that its weights stay bit-identical. That is also why this is not
    ``torch.optim.lr_scheduler.LambdaLR``: LambdaLR computes ``initial_lr * lambda(it)``,
    which is the ``multiply_first=True`` order only; train_cls's ``poly(base) * m`` and its
    warm-up ``start + (base - start) * it / warmup`` are not of that form, and LambdaLR also
    writes ``initial_lr`` into every parameter group (it would change the optimiser state
    in resume files, and old resume files would lack it).
    """

    base_lr: float
    iters: int
    power: float = 0.9
    warmup: int = 0
    warmup_start: float = 0.0
    multiply_first: bool = False

    def lr(self, it: int) -> float:
        """The schedule's lr at ``it`` before any group multiplier (train_cls's curve ``lr``)."""
        return poly_lr(self.base_lr, it, self.iters, self.power, self.warmup, self.warmup_start)

    def group_lrs(self, it: int, mults: Sequence[float | Sequence[Sequence[float]]]) -> list[float]:
        """The lr of each group (multipliers ``mults``, in group order) at ``it``; a
        multiplier is a number or a piecewise-constant schedule (:func:`mult_at`)."""
        mults = [mult_at(m, it) for m in mults]
        if self.multiply_first:
            return [poly_lr(self.base_lr * m, it, self.iters, self.power, self.warmup,
                            self.warmup_start * m) for m in mults]
        lr = self.lr(it)
        return [lr * m for m in mults]


class RunningSums:
    """Loss window as running sums (train_cls): per logged key, ``0.0 + v_1 + v_2 + ...``
    in iteration order; a row is ``sum / n`` for the ``n`` iterations of the window.
    Resume-file entry: ``running`` (``{key: sum}``)."""

    def __init__(self):
        self.running: dict[str, float] = {}

    def add(self, logged: Mapping[str, float]) -> None:
        for k, v in logged.items():
            self.running[k] = self.running.get(k, 0.0) + float(v)

    def row(self, n: int) -> dict[str, float]:
        row = {k: v / n for k, v in self.running.items()}
        self.running = {}
        return row

    def state(self) -> dict:
        return {"running": self.running}

    def load(self, st: Mapping) -> None:
        self.running = st["running"]


class LossList:
    """Loss window as lists (train_seg, train_affinity): a row is ``float(np.mean(...))``
    of the window's losses and, for each of ``keys``, of that part's values.

    Resume-file entries: ``window`` (the losses) and, with ``keys``, ``parts`` (per
    iteration the logged dict without ``loss``: every part, not only ``keys``)."""

    def __init__(self, keys: Sequence[str] = ()):
        self.keys = tuple(keys)
        self.window: list[float] = []
        self.parts: list[dict] = []

    def add(self, logged: Mapping[str, float]) -> None:
        self.window.append(logged["loss"])
        if self.keys:
            self.parts.append({k: v for k, v in logged.items() if k != "loss"})

    def row(self, n: int) -> dict[str, float]:
        row = {"loss": float(np.mean(self.window))}
        for k in self.keys:
            row[k] = float(np.mean([q[k] for q in self.parts]))
        self.window, self.parts = [], []
        return row

    def state(self) -> dict:
        return {"window": self.window, **({"parts": self.parts} if self.keys else {})}

    def load(self, st: Mapping) -> None:
        self.window = st["window"]
        self.parts = st["parts"] if self.keys else []


class Trainer:
    """One training run of a stage: resume, iterate, log, checkpoint.

    Building it loads the resume file if one of the same params exists (then ``it``,
    ``curve``, the window, the GradScaler and, with ``save_rng``, the global RNG states are
    restored, model and optimiser are loaded; :attr:`resumed` holds the file's dict for the
    stage's own entries, e.g. its position in the data). The stage then builds its batch
    iterator from :attr:`it` (the number of iterations already done), calls :meth:`run`, and
    :meth:`save_checkpoint`.

    Args:
        stage: stage name (``train_cls``...), used in messages and the resume file.
        model: the (unwrapped) model whose ``state_dict`` is saved; its gradients are
            averaged over ranks when ``average_gradients``.
        opt: optimiser; group ``g``'s lr is set to ``schedule.group_lrs(it, lr_mults)[g]``
            before every step.
        schedule: :class:`PolySchedule` (its ``iters`` is the number of iterations).
        lr_mults: one multiplier per optimiser group: a number or a piecewise-constant
            ``[[start_iter, value], ...]`` (:func:`mult_at`).
        out_path: the final checkpoint; the resume file is ``<out_path>.resume``.
        fingerprint: the params a resume file must have been written with.
        checkpoint_every: resume-file period in iterations (0 = none).
        log_every: curve period (>= 1) in iterations.
        log: message sink.
        window: :class:`RunningSums` (default) or :class:`LossList`.
        log_line: ``row -> str`` logged (rank 0) for each curve row; None: no line.
        curve_lr: put ``"lr": schedule.lr(it)`` after ``"iter"`` in each row.
        acc: :class:`Accel` (default: off); dd: :class:`Dist` (default: one process).
        device: where the resume file is loaded and logged values are averaged.
        average_gradients: all-reduce the gradients before each optimiser step
            (:meth:`Dist.average_gradients`; no-op in one process).
        save_rng: resume files hold (and restore) the global python / numpy / torch RNGs.
        desc: progress-bar label (default ``stage``).
        reset_optimizer_at: iterations (0-based) before whose step the optimiser's state
            (Adam moments and step counts, SGD momentum buffers) is cleared, as if a fresh
            optimiser of the same groups were built there (ViT-PCM's official ``main.py``
            compiles a new Keras Adam after its warm-up epoch).
    Raises:
        ValueError: ``checkpoint_every < 0`` (from :class:`ResumeFile`).
    """

    def __init__(self, stage: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 schedule: PolySchedule, lr_mults: Sequence[float | Sequence[Sequence[float]]],
                 out_path: str | Path,
                 fingerprint: Any, checkpoint_every: int = 0, log_every: int = 20,
                 log: Callable[[str], Any] = print, window: RunningSums | LossList | None = None,
                 log_line: Callable[[dict], str] | None = None, curve_lr: bool = False,
                 acc: Accel | None = None, dd: Dist | None = None,
                 device: torch.device | str = "cpu", average_gradients: bool = False,
                 save_rng: bool = True, desc: str | None = None,
                 reset_optimizer_at: Sequence[int] = ()):
        self.stage, self.model, self.opt, self.schedule = stage, model, opt, schedule
        self.iters, self.mults = int(schedule.iters), list(lr_mults)
        for m in self.mults:       # a malformed piecewise schedule fails here, not mid-run
            mult_at(m, 0)
        self.out_path, self.log, self.log_every = Path(out_path), log, max(1, int(log_every))
        self.window = window if window is not None else RunningSums()
        self.log_line, self.curve_lr, self.save_rng = log_line, curve_lr, save_rng
        self.acc = acc if acc is not None else Accel({}, device, stage)
        self.dd = dd if dd is not None else Dist()
        self.device, self.desc = device, desc or stage
        self.reset_at = {int(i) for i in reset_optimizer_at}
        self.sync = (lambda: self.dd.average_gradients(model)) if average_gradients else None
        self.it, self.curve = 0, []
        self.resume = ResumeFile(out_path, fingerprint, int(checkpoint_every or 0), stage, log)
        self.resumed = self.resume.load(model, opt, map_location=device)
        if self.resumed is not None:
            st = self.resumed
            self.acc.load_state_dict(st.get("scaler"))
            self.it, self.curve = st["it"], st["curve"]
            self.window.load(st)
            if save_rng:
                set_rng_states(st)

    def run(self, batches: Iterable, step: Callable[[Any, int], tuple[torch.Tensor, dict]],
            after_step: Callable[[int], None] | None = None,
            batch_ids: Callable[[Any], list[str]] | None = None,
            resume_extra: Callable[[], dict] | None = None) -> list[dict]:
        """Train from :attr:`it` to ``iters`` (or until ``batches`` runs out).

        Args:
            batches: the stage's batches from iteration :attr:`it` on.
            step: ``(batch, it) -> (loss, parts)``: forward and loss (run under autocast);
                ``loss`` a scalar tensor to minimise, ``parts`` floats to log beside it.
            after_step: called with ``it`` after the optimiser step (EMA updates...).
            batch_ids: ``batch -> image ids``, named by the NaN guard.
            resume_extra: ``() -> dict`` of the stage's own resume entries (data position).
        Returns:
            :attr:`curve`: ``[{"iter": i (1-based), ["lr"], "loss", ...}]``.
        Raises:
            FloatingPointError: the loss (mean over ranks) is NaN or inf.
        """
        bar = tqdm(total=self.iters, initial=self.it, desc=self.desc, unit="it", file=sys.stderr,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, disable=not self.dd.is_main)
        batches = iter(batches)
        try:
            while self.it < self.iters:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                it = self.it
                if it in self.reset_at:
                    self.opt.state.clear()
                for g, lr in zip(self.opt.param_groups, self.schedule.group_lrs(it, self.mults)):
                    g["lr"] = lr
                with self.acc.autocast():
                    loss, parts = step(batch, it)
                logged = {"loss": float(loss.detach()), **parts}
                if self.dd.enabled:     # every rank sees the mean (and raises together on NaN)
                    logged = dict(zip(logged, self.dd.mean(list(logged.values()), self.device)))
                if not math.isfinite(logged["loss"]):
                    raise FloatingPointError(
                        self._nan_message(logged["loss"], it, batch, batch_ids))
                self.opt.zero_grad(set_to_none=True)
                self.acc.backward_step(loss, self.opt, self.sync)
                if after_step is not None:
                    after_step(it)
                self.window.add(logged)
                self.it = it + 1
                bar.update(1)
                if self.it % self.log_every == 0 or self.it == self.iters:
                    self._add_row(it, bar)
                if self.resume.due(self.it, self.iters) and self.dd.is_main:
                    self._save_resume(resume_extra)
        finally:
            bar.close()
        return self.curve

    def _nan_message(self, value: float, it: int, batch, batch_ids) -> str:
        ids = f"; batch ids {batch_ids(batch)}" if batch_ids is not None else ""
        return (f"{self.stage}: loss is {value} at iteration {it + 1} of {self.iters}{ids}. "
                f"Lower `lr` in the {self.stage} params of params.yaml (now "
                f"{self.schedule.base_lr}).")

    def _add_row(self, it: int, bar) -> None:
        n = self.log_every if self.it % self.log_every == 0 else self.it % self.log_every
        row = {"iter": self.it, **({"lr": self.schedule.lr(it)} if self.curve_lr else {}),
               **self.window.row(n)}
        self.curve.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if self.dd.is_main and self.log_line is not None:
            self.log(self.log_line(row))

    def _save_resume(self, extra) -> None:
        self.resume.save(model=self.model.state_dict(), opt=self.opt.state_dict(), it=self.it,
                         **(extra() if extra is not None else {}), curve=self.curve,
                         **self.window.state(),
                         **({"scaler": self.acc.state_dict()} if self.acc.scaler else {}),
                         **(rng_states() if self.save_rng else {}))

    def save_checkpoint(self, make: Callable[[], dict]) -> None:
        """Rank 0: write ``make()`` to ``out_path`` (atomically), then delete the resume file."""
        if self.dd.is_main:
            atomic_torch_save(make(), self.out_path)
            self.resume.remove()
