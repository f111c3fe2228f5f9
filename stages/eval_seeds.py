"""Evaluate seeds.h5 against ground truth at the FIXED background threshold of params.yaml
(a threshold curve is reported for information, never used to choose the threshold)."""
from __future__ import annotations

from stages._common import add_manifest, default_paths, load_manifest, parser, run_cli, stage_config


def main() -> str:
    ap = parser("eval_seeds", __doc__)
    add_manifest(ap)
    ap.add_argument("--seeds", default=None, help="seeds HDF5 (default .../seeds.h5)")
    ap.add_argument("--out", default=None, help="metrics json (default .../seeds_miou.json)")
    args = ap.parse_args()
    d = default_paths(args)
    p = stage_config(args, "eval_seeds")
    m = load_manifest(args.manifest or d["manifest"])
    from pipeline.data.classes import manifest_classes
    from pipeline.methods import get_method
    from pipeline.seeds import evaluate_maps
    from pipeline.utils import write_json
    method = get_method(args.method)
    ids = m["splits"][p.get("split", "eval_train")]
    res = evaluate_maps(args.seeds or d["seeds"], m["root"], ids, m["label_dir"],
                        method.seed_keys[0], float(p["bg_threshold"]), p.get("curve", []),
                        class_names=manifest_classes(m))
    if len(method.seed_keys) > 1:   # e.g. ACR* next to ACR
        res["other_keys"] = {k: evaluate_maps(args.seeds or d["seeds"], m["root"], ids,
                                              m["label_dir"], k, float(p["bg_threshold"]),
                                              class_names=manifest_classes(m))["miou"]
                             for k in method.seed_keys[1:]}
    res["params"] = p
    write_json(args.out or d["seeds_miou"], res)
    return f"seed mIoU {res['miou']:.4f} on {len(ids)} images"


if __name__ == "__main__":
    run_cli("eval_seeds", main)
