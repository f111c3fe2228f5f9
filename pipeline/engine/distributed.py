"""Data-parallel training under ``torchrun`` (one process per GPU), shared by train_cls and
train_seg.

``torchrun --nproc_per_node=G`` (the Snakefile uses it when a rule's ``resources: gpu`` is
G > 1; see ``stages/_launch.py``) sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
:func:`setup` reads them, joins the process group (NCCL on CUDA, gloo on CPU) and puts the
process on ``cuda:LOCAL_RANK``. Without those variables (plain ``python -m``, one GPU or
CPU) everything here is a no-op and the training loops run exactly as before.

Semantics (the same as a single process with the same params):

* the global batch is the params' ``batch_size``; each rank takes the contiguous slice
  ``[rank * b, (rank + 1) * b)`` of every global batch with ``b = batch_size / world_size``
  (:meth:`Dist.shard`), so the deterministic (seed, epoch) batch order is unchanged;
  ``batch_size`` not divisible by the world size is an error;
* gradients are averaged over ranks (DistributedDataParallel for train_seg, an explicit
  all-reduce for train_cls, see :meth:`Dist.average_gradients`), so with a loss that is a
  mean over equally sized halves the update equals the single-process one up to float
  summation order;
* logged losses are averaged over ranks (:meth:`Dist.mean`); only rank 0 writes the model,
  metrics and resume files (atomically, as before); every rank reads the resume file.

Source: PyTorch DDP / torchrun documentation (https://pytorch.org/docs/stable/elastic/run.html).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.io.config import ConfigError


class Dist:
    """Process-group membership of this process (world 1 = not distributed)."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0):
        self.world, self.rank, self.local_rank = int(world), int(rank), int(local_rank)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files)."""
        return self.rank == 0

    def per_rank(self, batch_size: int, stage: str) -> int:
        """Per-rank batch ``batch_size / world``.

        Raises:
            ConfigError (a ValueError): ``batch_size`` not divisible by the number of processes (names the key).
        """
        if batch_size % self.world:
            raise ConfigError(f"{stage}.batch_size {batch_size} is not divisible by the {self.world} "
                             f"GPUs (torchrun processes); set a multiple of {self.world} in "
                             f"params.yaml or use resources gpu={self._divisor(batch_size)}")
        return batch_size // self.world

    def _divisor(self, n: int) -> int:
        return max(d for d in range(1, self.world + 1) if n % d == 0)

    def shard(self, batch: Sequence) -> list:
        """This rank's contiguous slice of one global batch (a list of sample indices)."""
        b = len(batch) // self.world
        return list(batch[self.rank * b:(self.rank + 1) * b])

    def mean(self, values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
        """Mean over ranks of a list of floats (identity when not distributed)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce sum of ``t`` (identity when not distributed)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def average_gradients(self, model: nn.Module) -> None:
        """Average ``.grad`` of every parameter over ranks (one flat all-reduce per dtype).

        Used by train_cls instead of DistributedDataParallel: method plug-ins call the
        model's sub-modules directly (``patch_tokens(model.vit, x)``, several views per
        step, teacher / EMA modules), and DDP only synchronises gradients of forwards that
        go through its own ``forward``; an explicit all-reduce after ``backward`` is correct
        for any plug-in. A parameter without a gradient on this rank counts as zero.
        """
        if not self.enabled:
            return
        params = [q for q in model.parameters() if q.requires_grad]
        for q in params:
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for q in params:
            by_dtype.setdefault(q.grad.dtype, []).append(q.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()

    def broadcast_parameters(self, model: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (the seeded init is already
        identical; this guards against rank-dependent set-up)."""
        if not self.enabled:
            return
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``DistributedDataParallel(model)`` when distributed, else ``model`` itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self, barrier: bool = True) -> None:
        """Leave the process group (after a final barrier unless ``barrier`` is False, as on
        an error, when the other ranks may never reach it)."""
        if self.enabled and dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()


def is_main_process() -> bool:
    """False only in a torchrun process of rank > 0 (``RANK`` env); stages write their
    metrics files only where this is True."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def setup(device: torch.device | str) -> tuple[Dist, torch.device]:
    """Join the ``torchrun`` process group if ``WORLD_SIZE`` > 1.

    Args:
        device: the device the stage resolved (``cpu`` or ``cuda``); under torchrun a CUDA
            device becomes ``cuda:LOCAL_RANK``.
    Returns:
        ``(Dist, device)``; ``Dist(1)`` and the unchanged device without torchrun.
    Raises:
        RuntimeError: torchrun asked for more processes than visible GPUs.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"torchrun started local rank {local} but only "
                               f"{torch.cuda.device_count()} CUDA GPUs are visible; lower the "
                               f"rule's `resources: gpu`")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(world, rank, local), device
