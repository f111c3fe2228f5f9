"""Per-stage throughput, peak RSS and output bytes from the Snakemake benchmark files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.io.paths import artifacts

#: stage -> (artifact keys it writes, split role it processes)
STAGE_IO = {
    "train_cls": (["cls_model"], "train"), "export_seeds": (["seeds"], "train"),
    "eval_seeds": (["seeds_miou"], "eval_train"), "train_affinity": (["aff_model"], "train"),
    "refine_seeds": (["refined"], "train"), "make_pseudo_labels": (["pseudo"], "train"),
    "train_seg": (["seg_model"], "train"), "eval_seg": (["predictions", "miou"], "val"),
}


def _bytes(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def stage_table(dataset: str) -> dict:
    """Per stage of every built chain: seconds, images/s, peak RSS (MiB), output bytes."""
    rows = []
    for ds in sorted({dataset, "demo"}):
        man = Path(f"results/{ds}/dataset.json")
        if not man.is_file():
            continue
        counts = json.loads(man.read_text())["counts"]
        for bdir in sorted(Path(f"results/{ds}/benchmarks").glob("*/")):
            method = bdir.name
            art = artifacts(ds, method)
            for stage, (keys, role) in STAGE_IO.items():
                tsv = bdir / f"{stage}.tsv"
                if not tsv.is_file():
                    continue
                rec = next(csv.DictReader(tsv.open(), delimiter="\t"))
                secs, rss = float(rec["s"]), float(rec["max_rss"])
                n = counts[role]
                rows.append({"dataset": ds, "method": method, "stage": stage,
                             "seconds": round(secs, 1), "images": n,
                             "images_per_s": round(n / secs, 2) if secs > 0 else None,
                             "peak_rss_mib": round(rss, 0),
                             "output_bytes": sum(_bytes(Path(art[k])) for k in keys)})
    if not rows:
        raise FileNotFoundError("no results/<dataset>/benchmarks/*: build a chain first "
                                "(`make demo`, `make vocsample`)")
    worst = max(r["peak_rss_mib"] for r in rows if r["dataset"] == dataset) if any(
        r["dataset"] == dataset for r in rows) else None
    return {"rows": rows, "summary": f"{len(rows)} stage runs; peak RSS on {dataset}: {worst} MiB"}
