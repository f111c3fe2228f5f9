"""Export multi-scale + flip class maps (seeds) of the trained classifier to seeds.h5 (stage 2)."""
from __future__ import annotations

import logging

from stages._common import add_manifest, add_shard_args, parse_stage, parser, run_cli


def main() -> str:
    ap = parser("export_seeds", __doc__)
    add_manifest(ap)
    ap.add_argument("--model", default=None, help="classifier checkpoint (default .../cls/model.pt)")
    ap.add_argument("--out", default=None, help="HDF5 output (default .../seeds.h5)")
    add_shard_args(ap)
    args, d, s, m = parse_stage(ap, "export_seeds")
    from pipeline.data.classes import manifest_classes
    from pipeline.steps.seeds import export_seeds
    from pipeline.io.shards import merge_map_files, shard_ids
    ids = m["splits"][s.split]
    if args.merge:
        merge_map_files(args.merge, args.out or d["seeds"], ids)
        return f"merged {len(args.merge)} shards ({len(ids)} images) into {args.out or d['seeds']}"
    if args.shard:
        ids = shard_ids(ids, *args.shard)
    summary = export_seeds(args.model or d["cls_model"], m["root"], ids, m["labels"], s,
                           args.out or d["seeds"], log=logging.getLogger("wsss").info,
                           class_names=manifest_classes(m))
    return str(summary)


if __name__ == "__main__":
    run_cli("export_seeds", main)
