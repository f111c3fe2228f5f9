"""Helpers shared by the benchmarks."""
from __future__ import annotations

import time
from typing import Any, Callable

from pipeline.io.config import load_params, stage_params


def dataset_ids(dataset: str, role: str) -> tuple[str, list[str], str]:
    """``(root, ids of the split used as `role`, label_dir)`` from params.yaml.

    Raises:
        FileNotFoundError: the dataset is not on disk (names the folder).
    """
    from pipeline.data.voc import read_ids
    from pathlib import Path
    d = stage_params(load_params(), dataset, None, "prepare_dataset")["data"]
    split = Path(d["root"]) / d["splits"][role]
    if not split.is_file():
        raise FileNotFoundError(f"{split} not found: dataset {dataset!r} is not available here")
    return d["root"], read_ids(split), d.get("label_dir", "SegmentationClass")


def timeit(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def target(what: str, measured: float, goal: float, unit: str, lower: bool = False) -> dict:
    """A ratio/limit target: ``met`` when measured >= goal (or <= goal with ``lower``)."""
    met = measured <= goal if lower else measured >= goal
    fmt = (lambda v: f"{v:.3g}{unit}")
    return {"what": what, "measured": fmt(measured), "target": ("<= " if lower else ">= ") + fmt(goal),
            "value": float(measured), "goal": float(goal), "met": bool(met)}
