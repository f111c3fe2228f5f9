"""Refine seeds by the PSA random walk over the learned affinity -> refined.h5, and evaluate
the refined maps (argmax, background channel included: `miou`) -> refined_miou.json (stage 4);
`best_threshold_on_gt` adds the official protocol's number (background channel replaced by a
constant threshold, the best of 100 on the ground truth; not a fair number)."""
from __future__ import annotations

import logging

from stages._common import add_manifest, add_shard_args, parse_stage, parser, run_cli


def main() -> str:
    ap = parser("refine_seeds", __doc__)
    add_manifest(ap)
    ap.add_argument("--seeds", default=None, help="seeds HDF5 to refine (default .../seeds.h5)")
    ap.add_argument("--model", default=None, help="AffinityNet checkpoint")
    ap.add_argument("--out", default=None, help="refined HDF5 (default .../refined.h5)")
    ap.add_argument("--metrics", default=None, help="default .../refined_miou.json")
    add_shard_args(ap)
    args, d, s, m = parse_stage(ap, "refine_seeds")
    from pipeline.data.classes import manifest_classes
    from pipeline.methods import get_method
    from pipeline.steps.refine.random_walk import refine_seeds
    from pipeline.engine.evaluator import OFFICIAL_SWEEP
    from pipeline.steps.seeds import evaluate_maps
    from pipeline.engine.runtime import get_device
    from pipeline.io.storage import write_json
    ids = m["splits"][s.split]
    out = args.out or d["refined"]
    key = s.seed_key or get_method(args.method).refine_key
    if args.merge:
        from pipeline.io.shards import merge_map_files
        merge_map_files(args.merge, out, ids)
    else:
        if args.shard:
            from pipeline.io.shards import shard_ids
            ids = shard_ids(ids, *args.shard)
        refine_seeds(m["root"], ids, args.seeds or d["seeds"], key,
                     args.model or d["aff_model"], out, s,
                     device=get_device(s.device), log=logging.getLogger("wsss").info)
        if args.shard:
            return f"shard {args.shard[0]}/{args.shard[1]}: {len(ids)} images -> {out}"
    eval_ids = m["splits"][s.eval_split]
    res = evaluate_maps(out, m["root"], eval_ids, m["label_dir"], "probs", None,
                        class_names=manifest_classes(m), sweep=OFFICIAL_SWEEP)
    res.update(params=s.as_dict(), seed_key=key)
    write_json(args.metrics or d["refined_miou"], res)
    return f"refined mIoU {res['miou']:.4f} on {len(eval_ids)} images"


if __name__ == "__main__":
    run_cli("refine_seeds", main)
