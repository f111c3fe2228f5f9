"""A chain's mIoU summary, and its comparison with committed expected values.

``python -m pipeline.steps.summary FILE...`` prints where each ``miou.json`` is and its per-stage
mIoU. ``python -m pipeline.steps.summary --check EXPECTED CHAIN_DIR`` compares every
``CHAIN_DIR/*miou.json`` with the values recorded in ``EXPECTED`` (exit 1 naming each value
that differs); ``--write EXPECTED CHAIN_DIR`` records them. CI runs ``make demo`` and then
the check against ``tests/expected/demo-acr/`` (``make check-demo``).

Under the locked environment (``requirements/lock.txt``) the demo chain is deterministic on
one CPU type, so the comparison is exact. The lock pins the software, not the CPU: torch
picks its vectorised kernels (and MKL / oneDNN their code paths) by the CPU's vendor and
instruction set, and 160 toy training images amplify the different rounding (measured: on an
AMD EPYC AVX2 machine the classifier already differs from the Intel AVX-512 record). So
``EXPECTED`` may be a folder of records, one per :func:`cpu_signature`
(``AuthenticAMD-AVX2.json``, ...): the check takes this CPU's record and compares exactly. A
CPU type without a record cannot be compared exactly; the check then says so and checks what
does not depend on the kernels (:func:`compare_structure`), and ``--write FOLDER`` adds its
record.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
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


def _compared_leaves(values: dict) -> dict:
    """``{dotted key: leaf}`` of a :func:`chain_values` result, timing leaves left out."""
    return {k: v for k, v in _leaves(values) if not _is_timing(k)}


def compare(expected: dict, actual: dict) -> list[str]:
    """Every difference between two :func:`chain_values` results, one line each (empty when
    they are identical). Floats are compared exactly: the locked demo chain is deterministic."""
    e, a = _compared_leaves(expected), _compared_leaves(actual)
    lines = []
    for key in sorted(set(e) | set(a)):
        if key not in a:
            lines.append(f"{key}: expected {e[key]!r}, missing")
        elif key not in e:
            lines.append(f"{key}: {a[key]!r}, not in the expected file")
        elif e[key] != a[key]:
            lines.append(f"{key}: expected {e[key]!r}, got {a[key]!r}")
    return lines


def cpu_signature() -> str:
    """This CPU's kernel path, the key of a per-CPU expected record.

    Returns:
        ``"{vendor}-{capability}"``: the ``vendor_id`` of ``/proc/cpuinfo`` (``GenuineIntel``,
        ``AuthenticAMD``; else :func:`platform.machine`) and torch's ATen CPU capability
        (``torch.backends.cpu.get_cpu_capability()``: ``AVX2``, ``AVX512``, ``DEFAULT``, ...;
        it honours ``ATEN_CPU_CAPABILITY``). E.g. ``"AuthenticAMD-AVX2"``. The thread count,
        the other thing the sums depend on, is fixed by the Makefile's ``CORES``, not here.
    """
    import torch

    vendor = platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"


def compare_structure(expected: dict, actual: dict) -> list[str]:
    """The differences that do not depend on the CPU's kernels, for a CPU type without a record.

    Every key of ``expected`` must be present and no other; every float on either side (the
    measured values: mIoU, IoU, accuracies, thresholds) must be a finite number in [0, 1] in
    ``actual``; every other leaf (settings such as CRF parameters and scales, protocol texts,
    ``None`` for an undefined value) must be equal. Timing leaves are ignored.

    Returns:
        One line per difference (empty when the structure holds).
    """
    e, a = _compared_leaves(expected), _compared_leaves(actual)
    lines = [f"{k}: missing" for k in sorted(set(e) - set(a))]
    lines += [f"{k}: not in the expected file" for k in sorted(set(a) - set(e))]
    for key in sorted(set(e) & set(a)):
        ev, av = e[key], a[key]
        if isinstance(ev, float) or isinstance(av, float):
            ok = (isinstance(av, (int, float)) and not isinstance(av, bool)
                  and math.isfinite(av) and 0.0 <= av <= 1.0)
            if not ok:
                lines.append(f"{key}: {av!r} is not a value in [0, 1]")
        elif ev != av:
            lines.append(f"{key}: expected {ev!r}, got {av!r}")
    return lines


def _record(expected: str | Path) -> Path:
    """The record file: ``expected`` itself, or for a folder its ``{cpu_signature()}.json``."""
    p = Path(expected)
    return p / f"{cpu_signature()}.json" if p.is_dir() or not p.suffix else p


def _print_diffs(diffs: list[str], shown: int = 40) -> None:
    for line in diffs[:shown]:
        print(f"  {line}", file=sys.stderr)
    if len(diffs) > shown:
        print(f"  ... and {len(diffs) - shown} more", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.steps.summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", metavar="EXPECTED", help="compare CHAIN_DIR's *miou.json with "
                   "this expected-values JSON (a folder: this CPU's record in it); exit 1 "
                   "listing each difference")
    g.add_argument("--write", metavar="EXPECTED", help="record CHAIN_DIR's values in this file "
                   "(a folder: in its {cpu_signature}.json)")
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
        target = _record(args.write)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(actual, indent=2, sort_keys=True) + "\n"
        atomic_write(target, lambda tmp: tmp.write_text(text))
        print(f"wrote {target} from {args.paths[0]}")
        return 0
    record = _record(args.check)
    if not record.is_file():
        others = sorted(record.parent.glob("*.json")) if record.parent.is_dir() else []
        if not others:
            raise FileNotFoundError(f"no expected record {record}; record one with `make "
                                    f"expected` (summary --write {args.check} CHAIN_DIR)")
        diffs = compare_structure(json.loads(others[0].read_text()), actual)
        print(f"NOTE: no record for this CPU type ({record.name}) in {record.parent} (recorded: "
              f"{', '.join(o.stem for o in others)}); the values cannot be compared exactly "
              f"(torch's kernels differ per CPU type). Checked the structure against "
              f"{others[0].name} instead; `make expected` records this CPU type.", file=sys.stderr)
        if diffs:
            print(f"{args.paths[0]}: {len(diffs)} structural difference(s):", file=sys.stderr)
            _print_diffs(diffs)
            return 1
        print(f"{args.paths[0]}: every key of {others[0].name} present, every value in [0, 1], "
              f"every setting equal (not compared exactly: no record for {record.stem})")
        return 0
    diffs = compare(json.loads(record.read_text()), actual)
    if diffs:
        print(f"{args.paths[0]} differs from {record} in {len(diffs)} value(s):", file=sys.stderr)
        _print_diffs(diffs)
        print("If the change is intended, run `make expected` and update the README's demo row "
              "in the same commit.", file=sys.stderr)
        return 1
    print(f"{args.paths[0]}: every value equals {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
