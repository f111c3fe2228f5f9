"""params.yaml access: one sub-tree per (dataset, method, stage).

``params.yaml`` has three parts:

* ``datasets.<name>``: where the data lives and which split files each stage uses;
* ``profiles.<name>.<stage>``: compute settings of a stage for that dataset (paper-scale for
  ``voc``, CPU-sized for ``demo`` / ``vocsample``) — the ``{dataset}`` wildcard selects data
  location AND compute profile;
* ``methods.<method>.<stage>``: method hyper-parameters (dataset independent). Every method
  has a (possibly empty, ``{}``) section for every method stage, so that DVC can declare
  ``methods.<method>.<stage>`` as a param of every generated stage (DVC refuses missing keys).

A profile's stage section may hold ``by_method: {<method>: {...}}``: dataset-specific
method settings (e.g. which seed kind to refine with a from-scratch CPU backbone).

A profile may start with ``inherit: <parent>`` and list only what differs: it is its parent's
(resolved) profile with its own sections deep-merged over it (:func:`resolve_profiles`, applied
by :func:`load_params` and by the Snakefile right after Snakemake loads params.yaml; chains are
allowed, cycles and unknown parents are refused). It still lists every stage (``{}`` = as the
parent) for DVC, which reads params.yaml itself and so tracks only the child's own keys
(README, "Reproduce with DVC").

:func:`stage_params` merges them for one stage; the Snakefile declares exactly this dict as
the rule's ``params`` and dvc.yaml lists the same keys (``seed``, ``datasets.<d>``,
``profiles.<d>.<stage>``, ``methods.<m>.<stage>``), so editing a value reruns only the
stages that read it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

STAGES = ("prepare_dataset", "train_cls", "export_seeds", "eval_seeds", "train_affinity",
          "refine_seeds", "make_pseudo_labels", "train_seg", "eval_own_seg", "eval_seg")
#: stages that run once per (dataset, method); each needs ``methods.<m>.<stage>``
METHOD_STAGES = STAGES[1:]


class ConfigError(ValueError):
    """params.yaml is missing a key or names an unknown dataset/method."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last
    silently, e.g. two `by_method:` blocks in one stage)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for k, _ in node.value:
        key = loader.construct_object(k, deep=deep)
        if key in seen:
            raise ConfigError(f"params.yaml line {k.start_mark.line + 1}: key `{key}` is given "
                              f"twice in the same mapping (first on line {seen[key]}); YAML "
                              f"would silently keep only the last — merge them.")
        seen[key] = k.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_params(path: str | Path = "params.yaml", resolve: bool = True) -> dict:
    """Read params.yaml; with ``resolve`` (default) profile inheritance is resolved
    (:func:`resolve_profiles`), ``resolve=False`` gives the file as written (what DVC reads).

    Raises:
        ConfigError: the file is missing or not a YAML mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p} not found: run from the repository root or pass --params.")
    cfg = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p} must be a YAML mapping")
    return resolve_profiles(cfg) if resolve else cfg


def deep_merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; values of ``over`` win. Returns a new dict."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


#: ``profiles.<d>.inherit: <parent>``: the profile is ``<parent>`` with its own sections over it
INHERIT = "inherit"


def resolve_profiles(cfg: dict) -> dict:
    """Resolve ``inherit:`` in ``profiles``: the single place profile inheritance happens.

    ``profiles.<child>`` with ``inherit: <parent>`` becomes ``deep_merge(<parent resolved>,
    <child without inherit>)``: the child's values win, mappings (stage sections,
    ``by_method.<m>``, ``backbone``) merge key by key, and a child value that is not a
    mapping (``null``, a list) replaces the parent's. Parents may inherit in turn.

    Returns:
        ``cfg`` itself when no profile inherits, else a shallow copy with a new ``profiles``
        (no ``inherit`` keys left); ``cfg`` is not modified. Idempotent.
    Raises:
        ConfigError: a parent that is not a profile, or a cycle (naming the chain).
    """
    profiles = cfg.get("profiles")
    if not isinstance(profiles, dict) or not any(
            isinstance(p, dict) and INHERIT in p for p in profiles.values()):
        return cfg
    done: dict = {}

    def resolve(name: str, chain: tuple) -> Any:
        if name in done:
            return done[name]
        prof = profiles[name]
        if not isinstance(prof, dict) or INHERIT not in prof:
            done[name] = prof
            return prof
        parent = prof[INHERIT]
        if not isinstance(parent, str) or parent not in profiles:
            raise ConfigError(
                f"params.yaml: `profiles.{name}.{INHERIT}: {parent}` names no profile"
                f"{_suggest(str(parent), profiles)}; profiles are {sorted(profiles)} (name one of "
                f"them, or remove `{INHERIT}` and list every stage section)")
        if parent in chain or parent == name:
            cycle = " -> ".join((*chain, name, parent))
            raise ConfigError(
                f"params.yaml: `profiles.{name}.{INHERIT}` makes a cycle ({cycle}); remove "
                f"`{INHERIT}` from one profile of the cycle and give it its stage sections")
        base = resolve(parent, (*chain, name))
        own = {k: v for k, v in prof.items() if k != INHERIT}
        done[name] = deep_merge(base if isinstance(base, dict) else {}, own)
        return done[name]

    return {**cfg, "profiles": {name: resolve(name, ()) for name in profiles}}


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
    """Raise ConfigError with the valid choices (and the closest one) if dataset or method is unknown.

    Used by every stage CLI (``--dataset`` / ``--method``) and by the Snakefile's fallback rules
    for targets like ``results/vocc/acr/miou.json`` (see :func:`unknown_target`).
    """
    if dataset not in _get(cfg, "datasets"):
        raise ConfigError(f"unknown dataset {dataset!r}{_suggest(dataset, datasets(cfg))}; "
                          f"params.yaml defines {datasets(cfg)} (add a `datasets.{dataset}` entry "
                          f"and a `profiles.{dataset}` profile to define a new one)")
    if method is not None and method not in _get(cfg, "methods"):
        raise ConfigError(f"unknown method {method!r}{_suggest(method, methods(cfg))}; "
                          f"params.yaml defines {methods(cfg)} (a new method is a plug-in in "
                          f"pipeline/methods/ plus a `methods.{method}` section)")


def unknown_target(cfg: dict, target: str, dataset: str, method: str | None = None) -> str:
    """The message for a Snakemake target whose ``{dataset}`` or ``{method}`` part is unknown.

    Args:
        target: the requested path, e.g. ``results/voc/acrr/miou.json``.
    Returns:
        one line naming the target, the bad part, the closest valid name and the valid names.
    """
    try:
        check_names(cfg, dataset, method)
    except ConfigError as e:
        return f"cannot build {target}: {e}"
    return f"cannot build {target}: no rule makes this file"


def check_complete(cfg: dict) -> None:
    """Check the structure dvc.yaml relies on.

    Every ``methods.<m>`` must have a mapping (``{}`` allowed) for each of
    :data:`METHOD_STAGES`, and every ``profiles.<d>`` a section for each of :data:`STAGES`.

    Run it on the config as written (``load_params(..., resolve=False)``; the Snakefile calls
    it before resolving): an inheriting profile (``inherit: <parent>``) must still list every
    stage, ``{}`` for "as the parent", because DVC reads params.yaml without resolving.

    Raises:
        ConfigError: naming every missing key and how to add it.
    """
    missing = []
    for m, sec in (_get(cfg, "methods") or {}).items():
        for st in METHOD_STAGES:
            if not isinstance((sec or {}).get(st), dict):
                missing.append(f"methods.{m}.{st}")
    for d in _get(cfg, "datasets"):
        prof = _get(cfg, "profiles").get(d)
        if not isinstance(prof, dict):
            missing.append(f"profiles.{d}")
            continue
        for st in STAGES:
            if not isinstance(prof.get(st), dict):
                missing.append(f"profiles.{d}.{st}")
    if missing:
        raise ConfigError("params.yaml lacks " + ", ".join(missing) +
                          " (add them, `{}` if empty: dvc.yaml declares every one as a param)")


#: the profile whose stage sections define the allowed keys of every profile
REFERENCE_PROFILE = "voc"
#: mappings whose keys are free-form (passed through to timm / per-method sections)
FREE_FORM = {"overrides", "by_method", "generate"}
TOP_LEVEL = {"seed", "run", "datasets", "methods", "profiles", "report"}
RUN_KEYS = {"datasets", "methods", "shards", "gpus"}
#: keys of the optional top-level `report` section (figures of `snakemake --report`)
REPORT_KEYS = {"gallery_images"}


def _suggest(key: str, known) -> str:
    import difflib
    m = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean `{m[0]}`?)" if m else ""


def unknown_key(where: str, key: str, known, valid: str) -> ConfigError:
    """The error of a misspelt or misplaced key: ``params.yaml: unknown key `<where>.<key>`
    (did you mean `<closest of known>`?); <valid>`` (used by :func:`validate` and
    :meth:`pipeline.io.settings.StageSettings.from_params`)."""
    return ConfigError(f"params.yaml: unknown key `{where}.{key}`{_suggest(key, known)}; {valid}")


def validate(cfg: dict) -> None:
    """Catch misspelt or misplaced keys before anything runs.

    * top level: ``seed``, ``run``, ``datasets``, ``methods``, ``profiles``, ``report``;
    * ``run``: ``datasets`` / ``methods`` naming defined ones, ``shards``, ``gpus``;
    * ``report``: ``gallery_images`` (a positive integer);
    * every ``profiles.<d>.<stage>`` key must exist in the reference profile ``profiles.voc``
      (recursively, except free-form mappings such as ``backbone.overrides``) or be a field of
      the stage's settings class (:func:`pipeline.io.settings.profile_keys`: e.g. ``split``,
      ``num_threads``, whose defaults live there); ``by_method.<m>`` must name a defined method;
    * ``profiles.<d>.inherit`` must name another profile without a cycle; an inheriting
      profile is checked after resolution (its own keys and its parent's, against ``voc``).

    Raises:
        ConfigError: naming the bad key, where it is, and the closest valid key.
    """
    for k in cfg:
        if k not in TOP_LEVEL:
            raise ConfigError(f"params.yaml: unknown top-level key `{k}`{_suggest(k, TOP_LEVEL)}")
    run = cfg.get("run") or {}
    for k in run:
        if k not in RUN_KEYS:
            raise ConfigError(f"params.yaml: unknown key `run.{k}`{_suggest(k, RUN_KEYS)}")
    rep = cfg.get("report") or {}
    for k in rep:
        if k not in REPORT_KEYS:
            raise ConfigError(f"params.yaml: unknown key `report.{k}`{_suggest(k, REPORT_KEYS)}")
    n = rep.get("gallery_images", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"params.yaml: `report.gallery_images` must be a positive integer "
                          f"(images per report gallery), got {n!r}")
    for kind in ("datasets", "methods"):
        for name in run.get(kind) or []:
            if name not in (cfg.get(kind) or {}):
                raise ConfigError(f"params.yaml: run.{kind} lists `{name}`, which `{kind}` does "
                                  f"not define{_suggest(name, cfg.get(kind) or {})}")
    profiles = resolve_profiles(cfg).get("profiles") or {}
    ref = profiles.get(REFERENCE_PROFILE) or {}
    from pipeline.io.settings import SETTINGS, profile_keys   # (imports this module)

    def walk(node: dict, schema: dict, where: str, fields: tuple = (), valid: str = "") -> None:
        for k, v in node.items():
            if k == "by_method":
                for m in v or {}:
                    if m not in (cfg.get("methods") or {}):
                        raise ConfigError(f"params.yaml: `{where}.by_method.{m}` names no method"
                                          f"{_suggest(m, cfg.get('methods') or {})}")
                continue
            if k not in schema and k not in fields:
                raise unknown_key(where, k, [*schema, *fields],
                                  f"valid keys are those of profiles.{REFERENCE_PROFILE}{valid}")
            if isinstance(v, dict) and isinstance(schema.get(k), dict) and k not in FREE_FORM:
                walk(v, schema[k], f"{where}.{k}")

    for d, prof in profiles.items():
        for st, sec in (prof or {}).items():
            if st not in STAGES:
                raise ConfigError(f"params.yaml: unknown stage `profiles.{d}.{st}`{_suggest(st, STAGES)}")
            if d != REFERENCE_PROFILE and isinstance(sec, dict):
                cls = SETTINGS.get(st)
                walk(sec, ref.get(st) or {}, f"profiles.{d}.{st}", profile_keys(st),
                     f" and the fields of pipeline.io.settings.{cls.__name__}" if cls else "")
    for m, sec in (cfg.get("methods") or {}).items():
        for st in sec or {}:
            if st not in STAGES:
                raise ConfigError(f"params.yaml: unknown stage `methods.{m}.{st}`{_suggest(st, STAGES)}")


def stage_params(cfg: dict, dataset: str, method: str | None, stage: str) -> dict:
    """The merged parameters one stage reads, for one (dataset, method).

    Returns ``{"data": datasets[dataset], "seed": ..., **profiles[dataset][stage]}`` with
    ``methods[method][stage]`` merged over it, and finally
    ``profiles[dataset][stage].by_method[method]`` (dataset-specific method settings). The
    ``by_method`` key itself is removed.

    Raises:
        ConfigError: unknown dataset/method or missing section.
    """
    check_names(cfg, dataset, method)
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages are {STAGES}")
    cfg = resolve_profiles(cfg)   # a no-op on a config from load_params / the Snakefile
    prof = copy.deepcopy(_get(cfg, "profiles", dataset).get(stage, {}) or {})
    by_method = prof.pop("by_method", None) or {}
    out: dict = {"data": copy.deepcopy(_get(cfg, "datasets", dataset)),
                 "seed": int(cfg.get("seed", 0))}
    out = deep_merge(out, prof)
    if method is not None:
        msec = (_get(cfg, "methods", method) or {}).get(stage)
        if msec:
            out = deep_merge(out, msec)
        over = by_method.get(method)
        if over:
            out = deep_merge(out, over)
    return out


def method_keys(cfg: dict, dataset: str, method: str | None, stage: str) -> dict[str, str]:
    """The keys of :func:`stage_params` that the method sets, each with the section it comes
    from: ``methods.<method>.<stage>``, or ``profiles.<dataset>.<stage>.by_method.<method>``
    (merged last, so it wins). :meth:`pipeline.io.settings.StageSettings.from_params` keeps
    those that are not stage fields for the method's plug-in, and names the section when it
    refuses one."""
    if method is None:
        return {}
    cfg = resolve_profiles(cfg)
    msec = (_get(cfg, "methods", method) or {}).get(stage) or {}
    by = ((_get(cfg, "profiles", dataset).get(stage) or {}).get("by_method") or {}).get(method) or {}
    return {**{k: f"methods.{method}.{stage}" for k in msec},
            **{k: f"profiles.{dataset}.{stage}.by_method.{method}" for k in by}}
