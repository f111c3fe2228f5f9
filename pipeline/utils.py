"""Small shared helpers: seeding, devices, atomic writes, JSON, poly learning rate."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


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


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``<path>.tmp`` then rename, so a killed run leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n")
    os.replace(tmp, path)


def _default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def poly_lr(base_lr: float, it: int, max_it: int, power: float = 0.9, warmup: int = 0,
            warmup_start: float = 0.0) -> float:
    """Poly schedule ``lr = base (1 - it/max)^power`` with optional linear warm-up."""
    if warmup > 0 and it < warmup:
        return warmup_start + (base_lr - warmup_start) * it / warmup
    return base_lr * (1.0 - min(it, max_it - 1) / max_it) ** power
