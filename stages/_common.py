"""Shared CLI plumbing of the stage modules (``python -m stages.<name>``).

Every stage reads its parameters either from ``--params-json`` (what Snakemake passes: the
exact ``params:`` of the rule) or from ``params.yaml`` via
:func:`pipeline.io.config.stage_params`, so running a stage by hand and under Snakemake/DVC uses
the same values; chain stages turn them into their typed settings once
(:func:`stage_settings`, :mod:`pipeline.io.settings`). Known user errors are printed as one
clear line (no traceback) with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Callable

from pipeline.io.config import ConfigError, load_params, stage_params
from pipeline.io.paths import artifacts, manifest

if TYPE_CHECKING:
    from pipeline.io.settings import StageSettings

log = logging.getLogger("wsss")


def parser(stage: str, doc: str, method: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="dataset name from params.yaml `datasets` "
                    "(selects data location and compute profile), e.g. demo, vocsample, voc")
    if method:
        ap.add_argument("--method", required=True, help="method plug-in, e.g. acr, cam")
    ap.add_argument("--params", default="params.yaml", help="parameter file (default params.yaml)")
    ap.add_argument("--params-json", default=None,
                    help="the stage's merged parameters as JSON (Snakemake passes this); "
                         "overrides --params")
    return ap


def add_manifest(ap: argparse.ArgumentParser) -> None:
    """``--manifest``: the dataset manifest written by prepare_dataset."""
    ap.add_argument("--manifest", default=None,
                    help="dataset manifest: split ids, image labels, class names "
                         "(default results/{dataset}/dataset.json, made by prepare_dataset)")


def _shard_spec(spec: str) -> tuple[int, int]:
    from pipeline.io.shards import parse_shard
    try:
        return parse_shard(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_shard_args(ap: argparse.ArgumentParser) -> None:
    """``--shard I/N`` (one cluster job: every N-th image from I, no metrics) and
    ``--merge PART ...`` (merge shard outputs into ``--out``, then evaluate)."""
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--shard", type=_shard_spec, metavar="I/N", default=None,
                   help="process only images I, I+N, I+2N, ... of the split (a shard job); "
                        "writes --out only, no metrics")
    g.add_argument("--merge", nargs="+", metavar="PART", default=None,
                   help="merge these shard outputs into --out (identical to an unsharded run), "
                        "then evaluate")


def stage_config(args: argparse.Namespace, stage: str) -> dict:
    if args.params_json:
        return json.loads(args.params_json)
    from pipeline.io.config import validate
    cfg = load_params(args.params)
    validate(cfg)
    return stage_params(cfg, args.dataset, getattr(args, "method", None), stage)


def default_paths(args: argparse.Namespace) -> dict[str, str]:
    paths = {"manifest": manifest(args.dataset)}
    if getattr(args, "method", None):
        paths.update(artifacts(args.dataset, args.method))
    return paths


def load_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset manifest {path} not found; run "
                                f"`python -m stages.prepare_dataset --dataset <name>` or "
                                f"`snakemake {path}` first") from None


def stage_settings(args: argparse.Namespace, stage: str) -> StageSettings:
    """The stage's typed settings (:data:`pipeline.io.settings.SETTINGS`), built once from its
    merged params (:func:`stage_config`).

    From params.yaml the method's keys are known (:func:`pipeline.io.config.method_keys`), so a
    key that is neither a field nor the method's is refused; from ``--params-json`` (the
    Snakefile validated the whole params.yaml before any job) every key that is not a field
    is taken as the method's.

    Raises:
        ConfigError: unknown key (named with its params.yaml section), missing required key,
            wrong type (:meth:`pipeline.io.settings.StageSettings.from_params`).
    """
    from pipeline.io.settings import SETTINGS
    cls, method = SETTINGS[stage], getattr(args, "method", None)
    if args.params_json:
        p = json.loads(args.params_json)
        keys = [k for k in p if k not in cls.field_names()]
    else:
        from pipeline.io.config import method_keys, validate
        cfg = load_params(args.params)
        validate(cfg)
        p = stage_params(cfg, args.dataset, method, stage)
        keys = method_keys(cfg, args.dataset, method, stage)
    return cls.from_params(p, keys, where=f"profiles.{args.dataset}.{stage}")


def parse_stage(ap: argparse.ArgumentParser, stage: str) -> tuple[argparse.Namespace, dict, StageSettings, dict]:
    """Parse a chain stage's command line and load what every such stage needs.

    Returns:
        ``(args, default_paths(args), stage_settings(args, stage), manifest)``: the parsed
        arguments, the chain's default artifact paths (:func:`pipeline.io.paths.artifacts`), the
        stage's settings (e.g. :class:`pipeline.io.settings.TrainSeg`) and the dataset manifest
        (``--manifest`` or the default one).
    Raises:
        FileNotFoundError: the manifest is missing (names the stage that writes it).
        ConfigError: bad params (:func:`stage_settings`).
    """
    args = ap.parse_args()
    d = default_paths(args)
    return args, d, stage_settings(args, stage), load_manifest(args.manifest or d["manifest"])


def run_cli(stage: str, main: Callable[[], str | None]) -> None:
    """Run ``main`` with logging set up; turn known user errors into one-line messages."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from pipeline.data.voc import DatasetError
    from pipeline.engine.metrics import PredictionRangeError
    from pipeline.models.backbones import WeightsError
    from pipeline.io.storage import StorageError, is_disk_full
    from pipeline.engine.runtime import deterministic_torch
    deterministic_torch()
    t0 = time.time()
    try:
        summary = main()
    except (DatasetError, ConfigError, WeightsError, StorageError, PredictionRangeError,
            FileNotFoundError, FloatingPointError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"\nERROR [{stage}]: {msg}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if not is_disk_full(e):
            raise
        print(f"\nERROR [{stage}]: disk full while writing ({e}). Nothing was published: the "
              f"stage writes to *.tmp and renames on success. Free space (or point results/ "
              f"elsewhere) and rerun.", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)  # skip interpreter teardown: HDF5 may crash freeing a file it failed to flush
    except RuntimeError as e:
        if "CUDA" in str(e) or "cuda" in str(e):
            print(f"\nERROR [{stage}]: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    print(f"[{stage}] done in {time.time() - t0:.1f}s" + (f": {summary}" if summary else ""),
          file=sys.stderr)
