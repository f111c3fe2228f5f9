"""Cross-method comparison of one dataset: one row per method, one column per stage's mIoU.

Reads ``results/<dataset>/<method>/miou.json`` (which gathers the seed, refined, pseudo-label
and segmentation mIoU), ``own_seg_miou.json`` where a method has its own segmentation head,
and the Snakemake benchmark files for the chain's wall time; adds the all-background
prediction's val mIoU as the floor every method must beat.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.classes import VOC_CLASSES, manifest_classes
from pipeline.engine.evaluator import Evaluator

COLUMNS = [("seeds", "seeds"), ("refined", "refined (PSA RW)"), ("pseudo", "pseudo (CRF)"),
           ("segmentation", "DeepLabV2 val"), ("own_segmentation", "own seg head val")]

#: The second table, "as papers report them": (row key, column title). ``*_best_on_gt`` is the
#: official seed protocol (best of 100 background thresholds on the evaluation ground truth,
#: not a fair number); ``seg_*`` are the three test protocols of ``miou.json`` ``protocols``.
PROTOCOL_COLUMNS = [("seeds", "seeds, fixed τ"), ("seeds_best_on_gt", "seeds, best τ on GT †"),
                    ("refined", "refined, arg-max"), ("refined_best_on_gt", "refined, best τ on GT †"),
                    ("pseudo", "pseudo labels"),
                    ("seg_single_scale", "DeepLabV2 single scale"),
                    ("seg_multi_scale_flip", "DeepLabV2 MS + flip"),
                    ("seg_multi_scale_flip_crf", "DeepLabV2 MS + flip + CRF")]

#: Footnote of the protocol table.
PROTOCOL_NOTE = ("† official protocol (ACR `evaluation.py --curve True`): the background "
                 "threshold is chosen on the evaluation ground truth among 100 values i/100 — "
                 "not a fair number; the chosen τ in parentheses. Pseudo labels are hard labels: "
                 "no threshold sweep is defined for them. Single scale = scale 1.0 without flip; "
                 "MS = the eval_seg scales; CRF = eval_seg.crf, else the DeepLab-v2 common "
                 "settings. – = not computed (see eval_seg.protocols).")


def _pct(v) -> float | None:
    return None if v is None else round(100 * v, 1)


def protocol_numbers(chain: Path) -> dict:
    """The protocol-table numbers of one chain folder (mIoU in %, None where missing):
    ``seeds_best_on_gt`` / ``refined_best_on_gt`` (+ ``*_best_threshold``) from
    ``seeds_miou.json`` / ``refined_miou.json`` ``best_threshold_on_gt``, ``seg_<protocol>``
    from ``miou.json`` ``protocols`` and ``seg_configured_as``."""
    out: dict = {}
    for stage in ("seeds", "refined"):
        f = chain / f"{stage}_miou.json"
        b = (json.loads(f.read_text()).get("best_threshold_on_gt") or {}) if f.is_file() else {}
        out[f"{stage}_best_on_gt"] = _pct(b.get("miou"))
        out[f"{stage}_best_threshold"] = b.get("bg_threshold")
    f = chain / "miou.json"
    d = json.loads(f.read_text()) if f.is_file() else {}
    protocols = d.get("protocols") or {}
    for name in ("single_scale", "multi_scale_flip", "multi_scale_flip_crf"):
        out[f"seg_{name}"] = _pct((protocols.get(name) or {}).get("miou"))
    out["seg_configured_as"] = d.get("configured_as")
    return out


def all_background_miou(root: str | Path, ids: Sequence[str], label_dir: str,
                        class_names: Sequence[str] = VOC_CLASSES) -> float:
    """mIoU (VOC definition, over the ``len(class_names)`` classes) of predicting background
    everywhere, in [0, 1]."""
    ev = Evaluator(root, label_dir, class_names)
    return ev.run(ids, lambda iid: np.zeros_like(ev.ground_truth(iid)))["miou"]


def chain_seconds(results: Path, dataset: str, method: str) -> float | None:
    """Sum of the Snakemake benchmark seconds of a chain (None when it was not built by Snakemake)."""
    files = list((results / dataset / "benchmarks" / method).glob("*.tsv"))
    if not files:
        return None
    return sum(float(next(csv.DictReader(f.open(), delimiter="\t"))["s"]) for f in files)


def comparison(dataset: str, methods: Sequence[str], results: str | Path = "results") -> dict:
    """Rows ``{method, seeds, refined, pseudo, segmentation, own_segmentation, seed_key,
    other_seeds, chain_minutes}`` plus :func:`protocol_numbers` (mIoU in %, None where
    missing) and ``all_background``.

    Raises:
        FileNotFoundError: no method of the list has a ``miou.json`` yet.
    """
    results = Path(results)
    rows = []
    for m in methods:
        f = results / dataset / m / "miou.json"
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        st = dict(d.get("stages", {}))
        own = results / dataset / m / "own_seg_miou.json"
        if own.is_file() and json.loads(own.read_text()).get("miou") is not None:
            st["own_segmentation"] = json.loads(own.read_text())["miou"]
        seeds = results / dataset / m / "seeds_miou.json"
        sd = json.loads(seeds.read_text()) if seeds.is_file() else {}
        secs = chain_seconds(results, dataset, m)
        rows.append({"method": m, **{k: (None if st.get(k) is None else round(100 * st[k], 1))
                                      for k, _ in COLUMNS},
                     "seed_key": sd.get("key"),
                     "other_seeds": {k: round(100 * v, 1) for k, v in (sd.get("other_keys") or {}).items()},
                     "chain_minutes": None if secs is None else round(secs / 60, 1),
                     **protocol_numbers(results / dataset / m)})
    if not rows:
        raise FileNotFoundError(f"no results/{dataset}/<method>/miou.json for {list(methods)}; "
                                f"build them first (snakemake results/{dataset}/comparison.md)")
    out = {"dataset": dataset, "rows": rows}
    man = results / dataset / "dataset.json"
    if man.is_file():
        mf = json.loads(man.read_text())
        out["all_background"] = round(100 * all_background_miou(mf["root"], mf["splits"]["val"],
                                                                mf["label_dir"], manifest_classes(mf)), 1)
    return out


def to_markdown(c: dict) -> str:
    """The comparison as a Markdown table (mIoU in %)."""
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    head = "| method | " + " | ".join(t for _, t in COLUMNS) + " | other seed maps | chain (min) |"
    lines = [f"# {c['dataset']}: mIoU (%) per stage", "",
             head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in c["rows"]:
        other = ", ".join(f"{k} {v:.1f}" for k, v in r["other_seeds"].items()) or "–"
        lines.append(f"| {r['method']} | " + " | ".join(fmt(r[k]) for k, _ in COLUMNS)
                     + f" | {other} | {fmt(r['chain_minutes'])} |")
    if "all_background" in c:
        lines += ["", f"All-background prediction on val: {c['all_background']:.1f} mIoU."]
    lines += ["", "## Evaluation protocols as papers report them: mIoU (%)", "",
              "| method | " + " | ".join(t for _, t in PROTOCOL_COLUMNS) + " |",
              "|" + "---|" * (len(PROTOCOL_COLUMNS) + 1)]
    for r in c["rows"]:
        lines.append(f"| {r['method']} | "
                     + " | ".join(protocol_cell(r, k) for k, _ in PROTOCOL_COLUMNS) + " |")
    lines += ["", PROTOCOL_NOTE]
    return "\n".join(lines) + "\n"


def protocol_cell(row: dict, key: str) -> str:
    """One cell of the protocol table: the mIoU in % ("–" when missing), with the chosen
    threshold for ``*_best_on_gt`` and "n/a" for pseudo labels' (undefined) sweep."""
    v = row.get(key)
    if v is None:
        return "–"
    if key.endswith("_best_on_gt"):
        t = row.get(key.replace("_best_on_gt", "_best_threshold"))
        return f"{v:.1f}" + ("" if t is None else f" (τ {t:.2f})")
    return f"{v:.1f}"
