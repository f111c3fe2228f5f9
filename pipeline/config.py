"""params.yaml access: one sub-tree per (dataset, method, stage).

``params.yaml`` has three parts:

* ``datasets.<name>``: where the data lives and which split files each stage uses;
* ``profiles.<name>.<stage>``: compute settings of a stage for that dataset (paper-scale for
  ``voc``, CPU-sized for ``demo`` / ``vocsample``) — the ``{dataset}`` wildcard selects data
  location AND compute profile;
* ``methods.<method>.<stage>``: method hyper-parameters (dataset independent).

:func:`stage_params` merges the three for one stage; the Snakefile declares exactly this
dict as the rule's ``params`` so that editing a value reruns only the rules that read it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

STAGES = ("prepare_dataset", "train_cls", "export_seeds", "eval_seeds", "train_affinity",
          "refine_seeds", "make_pseudo_labels", "train_seg", "eval_seg")


class ConfigError(ValueError):
    """params.yaml is missing a key or names an unknown dataset/method."""


def load_params(path: str | Path = "params.yaml") -> dict:
    """Read params.yaml.

    Raises:
        ConfigError: the file is missing or not a YAML mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p} not found: run from the repository root or pass --params.")
    cfg = yaml.safe_load(p.read_text())
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p} must be a YAML mapping")
    return cfg


def deep_merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; values of ``over`` win. Returns a new dict."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _get(cfg: dict, *keys: str) -> Any:
    node = cfg
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            where = ".".join(keys[: i + 1])
            known = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(f"params.yaml has no `{where}` (known at this level: {known})")
        node = node[k]
    return node


def datasets(cfg: dict) -> list[str]:
    return sorted(_get(cfg, "datasets"))


def methods(cfg: dict) -> list[str]:
    return sorted(_get(cfg, "methods"))


def check_names(cfg: dict, dataset: str, method: str | None = None) -> None:
    """Raise ConfigError with the valid choices if dataset or method is unknown."""
    if dataset not in _get(cfg, "datasets"):
        raise ConfigError(f"unknown dataset {dataset!r}; params.yaml defines {datasets(cfg)}")
    if method is not None and method not in _get(cfg, "methods"):
        raise ConfigError(f"unknown method {method!r}; params.yaml defines {methods(cfg)}")


def stage_params(cfg: dict, dataset: str, method: str | None, stage: str) -> dict:
    """The merged parameters one stage reads, for one (dataset, method).

    Returns ``{"data": datasets[dataset], "seed": ..., **profiles[dataset][stage]}`` with
    ``methods[method][stage]`` merged over it (if the method has that stage's section), and
    finally ``profiles[dataset].method_overrides[method][stage]`` (dataset-specific method
    settings, e.g. which seed kind to refine on a from-scratch CPU backbone).

    Raises:
        ConfigError: unknown dataset/method or missing section.
    """
    check_names(cfg, dataset, method)
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages are {STAGES}")
    prof = copy.deepcopy(_get(cfg, "profiles", dataset).get(stage, {}) or {})
    out: dict = {"data": copy.deepcopy(_get(cfg, "datasets", dataset)),
                 "seed": int(cfg.get("seed", 0))}
    out = deep_merge(out, prof)
    if method is not None:
        msec = (_get(cfg, "methods", method) or {}).get(stage)
        if msec:
            out = deep_merge(out, msec)
        over = (((_get(cfg, "profiles", dataset).get("method_overrides") or {}).get(method) or {})
                .get(stage))
        if over:
            out = deep_merge(out, over)
    return out
