"""Run state of a stage: seeding, determinism, devices, RNG states and resume files (the poly
learning rate is :func:`pipeline.engine.trainer.poly_lr`; atomic writes and JSON are
:mod:`pipeline.io.storage`)."""
from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.io.storage import atomic_torch_save


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a block with ``model`` in eval mode (dropout off, BatchNorm on running statistics) and
    restore its previous ``training`` flag afterwards, also when the block raises.

    Only the mode changes: gradients stay as the caller sets them (wrap ``torch.no_grad()`` or
    ``torch.enable_grad()`` inside as needed). Sub-modules that pin their own mode in
    ``train()`` (a frozen trunk) keep doing so, since the restore goes through ``model.train``.
    The one owner of this save-and-restore (ViT-PCM's equivariance target, ACR's gradient maps,
    the random walk's AffinityNet forward, DeepLabV2's evaluation).
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def deterministic_torch() -> None:
    """Ask torch for deterministic algorithms wherever it has them (every stage CLI calls this
    through ``stages._common.run_cli``).

    ``torch.use_deterministic_algorithms(True, warn_only=True)``: an op without a deterministic
    implementation warns instead of failing. ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless set)
    is what deterministic cuBLAS needs on CUDA >= 10.2. With the locked environment and the
    fixed per-rule thread counts of the Snakefile (``OMP_NUM_THREADS={threads}``) the CPU demo
    chain gives bit-identical numbers run after run (``make check-demo``).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def get_device(name: str | None) -> torch.device:
    """``"auto"``/None -> cuda if available else cpu; ``"cuda"`` without a GPU raises.

    Raises:
        RuntimeError: CUDA requested but unavailable (names the params key to change).
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device `cuda` requested but no CUDA GPU is available; set "
                           "`device: cpu` (or `auto`) in params.yaml.")
    return dev


class ResumeFile:
    """Periodic resume checkpoint ``<out_path>.resume`` of a training loop (kill-safe).

    A training stage saves its whole state (model, optimiser, iteration, RNG states, loss
    curve...) every ``every`` iterations with :meth:`save` (atomic: ``.tmp`` + rename, so a
    kill mid-write leaves the previous resume file); a rerun calls :meth:`load`, which returns
    that state only if it was written with the same ``params`` (a JSON fingerprint) by the
    same ``stage``; after the final model is written the stage calls :meth:`remove`.
    ``every`` = 0 disables it (no file is read or written).

    Args:
        out_path: the stage's final checkpoint path; the resume file sits beside it.
        params: the stage's resolved params (JSON-serialisable; ``default=str`` otherwise).
        every: checkpoint period in iterations (>= 0).
        stage: name recorded in the file and used in log lines (``train_seg``...).
        log: message sink.
    Raises:
        ValueError: ``every`` < 0.
    """

    def __init__(self, out_path: str | Path, params: Any, every: int, stage: str,
                 log=print):
        if int(every or 0) < 0:
            raise ValueError(f"{stage}.checkpoint_every must be >= 0 (0 = off), got {every}")
        self.path = Path(str(out_path) + ".resume")
        self.every, self.stage, self.log = int(every or 0), stage, log
        self.fingerprint = json.dumps(params, sort_keys=True, default=str)

    def load(self, model: torch.nn.Module | None = None, opt: torch.optim.Optimizer | None = None,
             map_location: Any = "cpu") -> dict | None:
        """The saved state dict, or None (off, no file, or written with other params).

        When a state is returned, its ``model`` / ``opt`` entries have already been loaded
        into ``model`` / ``opt`` (if given)."""
        if not self.every or not self.path.is_file():
            return None
        st = torch.load(self.path, map_location=map_location, weights_only=False)
        if st.get("fingerprint") != self.fingerprint or st.get("stage") != self.stage:
            self.log(f"{self.stage}: ignoring {self.path} (made with other params)")
            return None
        if model is not None:
            model.load_state_dict(st["model"])
        if opt is not None:
            opt.load_state_dict(st["opt"])
        self.log(f"{self.stage}: resumed from {self.path} at iteration {st['it']}")
        return st

    def due(self, it: int, iters: int) -> bool:
        """True when iteration count ``it`` (1-based, completed) should be checkpointed."""
        return bool(self.every) and it % self.every == 0 and it < iters

    def save(self, **state: Any) -> None:
        """Write ``state`` (must hold ``it``) atomically, tagged with stage and fingerprint."""
        atomic_torch_save({"fingerprint": self.fingerprint, "stage": self.stage, **state},
                          self.path)

    def remove(self) -> None:
        """Delete the resume file (call after the final checkpoint is written)."""
        self.path.unlink(missing_ok=True)


def rng_states() -> dict:
    """Global RNG states of python, numpy and torch (CPU), for :class:`ResumeFile`."""
    return {"torch_rng": torch.get_rng_state(), "np_rng": np.random.get_state(),
            "py_rng": random.getstate()}


def set_rng_states(st: dict) -> None:
    """Restore states saved by :func:`rng_states`."""
    torch.set_rng_state(st["torch_rng"])
    np.random.set_state(st["np_rng"])
    random.setstate(st["py_rng"])
