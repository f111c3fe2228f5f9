"""Evaluate seeds.h5 against ground truth at the FIXED background threshold of params.yaml
(`miou`; a threshold curve is reported for information, never used to choose the threshold),
and, labelled `best_threshold_on_gt`, the official protocol's number: the best of 100
background thresholds i/100 scored on the ground truth (not a fair number)."""
from __future__ import annotations

from stages._common import add_manifest, parse_stage, parser, run_cli


def main() -> str:
    ap = parser("eval_seeds", __doc__)
    add_manifest(ap)
    ap.add_argument("--seeds", default=None, help="seeds HDF5 (default .../seeds.h5)")
    ap.add_argument("--out", default=None, help="metrics json (default .../seeds_miou.json)")
    args, d, s, m = parse_stage(ap, "eval_seeds")
    from pipeline.data.classes import manifest_classes
    from pipeline.methods import get_method
    from pipeline.engine.evaluator import OFFICIAL_SWEEP
    from pipeline.steps.seeds import evaluate_maps
    from pipeline.io.storage import write_json
    method = get_method(args.method)
    ids = m["splits"][s.split]
    res = evaluate_maps(args.seeds or d["seeds"], m["root"], ids, m["label_dir"],
                        method.seed_keys[0], s.bg_threshold, s.curve,
                        class_names=manifest_classes(m), sweep=OFFICIAL_SWEEP)
    if len(method.seed_keys) > 1:   # e.g. ACR* next to ACR
        other = {k: evaluate_maps(args.seeds or d["seeds"], m["root"], ids, m["label_dir"], k,
                                  s.bg_threshold, class_names=manifest_classes(m),
                                  sweep=OFFICIAL_SWEEP)
                 for k in method.seed_keys[1:]}
        res["other_keys"] = {k: r["miou"] for k, r in other.items()}
        res["other_keys_best_threshold_on_gt"] = {
            k: {f: r["best_threshold_on_gt"][f] for f in ("miou", "bg_threshold", "protocol")}
            for k, r in other.items()}
    res["params"] = s.as_dict()
    write_json(args.out or d["seeds_miou"], res)
    return f"seed mIoU {res['miou']:.4f} on {len(ids)} images"


if __name__ == "__main__":
    run_cli("eval_seeds", main)
