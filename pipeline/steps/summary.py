"""A chain's mIoU summary, and its comparison with committed expected values.

``python -m pipeline.steps.summary FILE...`` prints where each ``miou.json`` is and its per-stage
mIoU. ``python -m pipeline.steps.summary --check EXPECTED CHAIN_DIR`` compares every
``CHAIN_DIR/*miou.json`` with the values recorded in ``EXPECTED`` (exit 1 naming each value
that differs); ``--write EXPECTED CHAIN_DIR`` records them. CI runs ``make demo`` and then
the check against ``tests/expected/demo-acr.json`` (``make check-demo``): under the locked
environment (``requirements/lock.txt``) the demo chain is deterministic on the CPU, so the
comparison is exact.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: keys of a ``*miou.json`` that hold results (everything else is provenance: params, timing)
RESULT_KEYS = ("miou", "iou", "other_keys", "stages", "best_threshold_on_gt",
               "other_keys_best_threshold_on_gt", "protocols")


def _is_timing(key: str) -> bool:
    """Wall-clock leaves inside result sections (e.g. ``protocols.*.crf_seconds``) differ run
    to run and are not compared."""
    return key.rsplit(".", 1)[-1].endswith("seconds")


def summarise(path: str | Path) -> str:
    """One line per stage of a ``miou.json`` written by ``eval_seg``."""
    p = Path(path)
    d = json.loads(p.read_text())
    stages = d.get("stages", {"segmentation": d["miou"]})
    body = "  ".join(f"{k}={100 * v:.1f}" if v is not None else f"{k}=–"
                     for k, v in stages.items())
    prot = "  ".join(f"{k}={100 * v['miou']:.1f}" for k, v in (d.get("protocols") or {}).items())
    return (f"{p.resolve()}\n  {d.get('dataset', '?')}/{d.get('method', '?')} mIoU (%): {body}"
            f"  [{d.get('num_images', '?')} val images]"
            + (f"\n  segmentation protocols (%): {prot}" if prot else ""))


def chain_values(chain_dir: str | Path) -> dict[str, dict]:
    """The result values of every ``*miou.json`` of one chain folder.

    Args:
        chain_dir: ``results/{dataset}/{method}``.

    Returns:
        ``{file name: {key: value}}`` for the :data:`RESULT_KEYS` present in each file
        (mIoU and IoUs as fractions in [0, 1], floats exactly as stored).

    Raises:
        FileNotFoundError: no ``*miou.json`` in ``chain_dir`` (names the folder and the fix).
    """
    files = sorted(Path(chain_dir).glob("*miou.json"))
    if not files:
        raise FileNotFoundError(f"no *miou.json in {chain_dir}; build the chain first "
                                f"(`make demo` for results/demo/acr)")
    out = {}
    for f in files:
        d = json.loads(f.read_text())
        out[f.name] = {k: d[k] for k in RESULT_KEYS if k in d}
    return out


def _leaves(d, prefix=""):
    if isinstance(d, dict):
        for k in sorted(d):
            yield from _leaves(d[k], f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, d


def compare(expected: dict, actual: dict) -> list[str]:
    """Every difference between two :func:`chain_values` results, one line each (empty when
    they are identical). Floats are compared exactly: the locked demo chain is deterministic."""
    e = {k: v for k, v in _leaves(expected) if not _is_timing(k)}
    a = {k: v for k, v in _leaves(actual) if not _is_timing(k)}
    lines = []
    for key in sorted(set(e) | set(a)):
        if key not in a:
            lines.append(f"{key}: expected {e[key]!r}, missing")
        elif key not in e:
            lines.append(f"{key}: {a[key]!r}, not in the expected file")
        elif e[key] != a[key]:
            lines.append(f"{key}: expected {e[key]!r}, got {a[key]!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.steps.summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", metavar="EXPECTED", help="compare CHAIN_DIR's *miou.json with "
                   "this expected-values JSON; exit 1 listing each difference")
    g.add_argument("--write", metavar="EXPECTED", help="record CHAIN_DIR's values in this file")
    ap.add_argument("paths", nargs="+", help="miou.json files to summarise, or with "
                    "--check/--write one chain folder (results/{dataset}/{method})")
    args = ap.parse_args(argv)
    if not (args.check or args.write):
        for f in args.paths:
            print(summarise(f))
        return 0
    if len(args.paths) != 1:
        ap.error("--check/--write take exactly one chain folder")
    actual = chain_values(args.paths[0])
    if args.write:
        from pipeline.io.storage import atomic_write
        text = json.dumps(actual, indent=2, sort_keys=True) + "\n"
        atomic_write(args.write, lambda tmp: tmp.write_text(text))
        print(f"wrote {args.write} from {args.paths[0]}")
        return 0
    diffs = compare(json.loads(Path(args.check).read_text()), actual)
    if diffs:
        print(f"{args.paths[0]} differs from {args.check} in {len(diffs)} value(s):", file=sys.stderr)
        for line in diffs[:40]:
            print(f"  {line}", file=sys.stderr)
        print("If the change is intended, run `make expected` and update the README's demo row "
              "in the same commit.", file=sys.stderr)
        return 1
    print(f"{args.paths[0]}: every value equals {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
