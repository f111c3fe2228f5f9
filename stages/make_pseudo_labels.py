"""Dense-CRF pseudo labels (palette PNGs) from the refined maps - or, with
`make_pseudo_labels.source: seeds` (ViT-PCM's official pipeline), from the seeds' own
distribution - and their mIoU (stage 5).
pseudo_miou.json's `best_threshold_on_gt` says the official threshold sweep is not defined for
hard labels (its miou is null); `miou` is the only number."""
from __future__ import annotations

import logging

from stages._common import add_manifest, add_shard_args, parse_stage, parser, run_cli


def main() -> str:
    ap = parser("make_pseudo_labels", __doc__)
    add_manifest(ap)
    ap.add_argument("--maps", default=None, help="refined HDF5 (default .../refined.h5)")
    ap.add_argument("--seeds", default=None,
                    help="seeds HDF5, read instead with `source: seeds` (default .../seeds.h5)")
    ap.add_argument("--out", default=None, help="PNG folder (default .../pseudo)")
    ap.add_argument("--metrics", default=None, help="default .../pseudo_miou.json")
    ap.add_argument("--workers", type=int, default=1, help="processes (Snakemake passes {threads})")
    add_shard_args(ap)
    args, d, s, m = parse_stage(ap, "make_pseudo_labels")
    from pipeline.data.classes import manifest_classes
    from pipeline.steps.pseudo import evaluate_label_dir, make_pseudo_labels
    from pipeline.io.storage import write_json
    ids = m["splits"][s.split]
    out = args.out or d["pseudo"]
    if args.merge:
        from pipeline.io.shards import merge_png_dirs
        merge_png_dirs(args.merge, out, ids)
        t = {"images": len(ids), "merged_shards": len(args.merge)}
    else:
        if args.shard:
            from pipeline.io.shards import shard_ids
            ids = shard_ids(ids, *args.shard)
        src = (args.seeds or d["seeds"]) if s.source == "seeds" else (args.maps or d["refined"])
        t = make_pseudo_labels(src, s.key, m["root"], ids, s, out,
                               workers=args.workers, log=logging.getLogger("wsss").info)
        if args.shard:
            return f"shard {args.shard[0]}/{args.shard[1]}: {len(ids)} pseudo labels -> {out}"
    eval_ids = m["splits"][s.eval_split]
    res = evaluate_label_dir(out, m["root"], eval_ids, m["label_dir"], manifest_classes(m))
    res.update(params=s.as_dict(), timing=t)
    write_json(args.metrics or d["pseudo_miou"], res)
    return f"pseudo-label mIoU {res['miou']:.4f} on {len(eval_ids)} images"


if __name__ == "__main__":
    run_cli("make_pseudo_labels", main)
