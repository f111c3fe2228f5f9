"""Benchmarks of the pipeline (reported numbers, not timed tests).

    python -m bench                      # every benchmark, JSON under results/bench/, table on stdout
    python -m bench crf randomwalk       # a subset
    python -m bench --list
    python -m bench gpu                  # ACR ViT-B/16 @384 step time + export img/s (only when named)
    python -m bench rw_ceiling           # the random walk with ground-truth affinity over built chains' seeds (only when named)
    python -m bench cam_probe            # the frozen CNN CAM's seeds under three ways of training its head (only when named)
    python -m bench cam_in_out           # built chains' seed maps: mean inside the objects vs on the background (only when named)
    python -m bench stem_probe           # linear CAM heads on the hybrid ViT's frozen stem features, two cut points (only when named)

Each benchmark writes ``results/bench/<name>.json`` with the machine description, the measured
numbers and, for the ratio targets of the performance issue, the target and whether it was met.
Ratios are measured in the same run, side by side. Per-stage numbers (``stages``) come from the
Snakemake ``benchmark:`` files of chains already built (``make demo``, ``make vocsample``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import gpu, micro, quality, scaling, stages
from pipeline.io.storage import atomic_write

BENCHES = {
    "crf": micro.crf_pool,
    "randomwalk": micro.random_walk,
    "radius_mask": micro.radius_mask,
    "par": micro.par,
    "miou": micro.miou,
    "storage": micro.storage,
    "rss": scaling.rss_scaling,
    "stages": stages.stage_table,
    "rw_ceiling": quality.rw_ceiling,
    "cam_probe": quality.cam_probe,
    "cam_in_out": quality.cam_in_out,
    "stem_probe": quality.stem_probe,
    "gpu": gpu.gpu_bench,
}
#: run only when named (on a CPU machine it measures a reduced version, see bench/gpu.py)
ON_REQUEST = {"gpu", "rw_ceiling", "cam_probe", "cam_in_out", "stem_probe"}


def machine() -> dict:
    import torch
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default all but "
                    f"{sorted(ON_REQUEST)}): {list(BENCHES)}")
    ap.add_argument("--dataset", default="vocsample", help="real images for crf/miou/rss (default vocsample)")
    ap.add_argument("--out", default="results/bench", help="output folder")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args()
    if args.list:
        for k, f in BENCHES.items():
            print(f"{k:12s} {(f.__doc__ or '').strip().splitlines()[0]}")
        return
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mach = machine()
    rows = []
    for name in args.names or [b for b in BENCHES if b not in ON_REQUEST]:
        t0 = time.time()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            res = BENCHES[name](args.dataset)
        except (FileNotFoundError, ImportError) as e:
            res = {"skipped": str(e)}
        res = {"benchmark": name, "machine": mach, "seconds": round(time.time() - t0, 1), **res}
        text = json.dumps(res, indent=2, sort_keys=True) + "\n"
        atomic_write(out / f"{name}.json", lambda t: t.write_text(text))
        rows.append(res)
        print(f"[bench] {name}: {res.get('summary', res.get('skipped', ''))}", file=sys.stderr,
              flush=True)
    print("| benchmark | measured | target | met |\n|---|---|---|---|")
    for r in rows:
        for t in r.get("targets", []):
            print(f"| {r['benchmark']}: {t['what']} | {t['measured']} | {t['target']} | "
                  f"{'yes' if t['met'] else 'NO'} |")
        if "skipped" in r:
            print(f"| {r['benchmark']} | skipped: {r['skipped']} | | |")


if __name__ == "__main__":
    main()
