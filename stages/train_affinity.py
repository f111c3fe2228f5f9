"""Train the PSA AffinityNet from confident foreground/background regions of the seeds (stage 3)."""
from __future__ import annotations

import logging

from stages._common import add_manifest, parse_stage, parser, run_cli


def main() -> str:
    ap = parser("train_affinity", __doc__)
    add_manifest(ap)
    ap.add_argument("--seeds", default=None, help="seeds HDF5 (default .../seeds.h5)")
    ap.add_argument("--out", default=None, help="checkpoint (default .../affinity/model.pt)")
    ap.add_argument("--metrics", default=None, help="metrics json (default .../affinity/metrics.json)")
    args, d, s, m = parse_stage(ap, "train_affinity")
    from pipeline.methods import get_method
    from pipeline.steps.refine.affinity_train import train_affinity_net
    from pipeline.engine.runtime import get_device
    from pipeline.io.storage import write_json
    ids = m["splits"][s.split]
    key = s.seed_key or get_method(args.method).affinity_key
    met = train_affinity_net(m["root"], ids, args.seeds or d["seeds"], key, s,
                             args.out or d["aff_model"], device=get_device(s.device),
                             log=logging.getLogger("wsss").info)
    met["seed_key"] = key
    write_json(args.metrics or d["aff_metrics"], met)
    return f"affinity net trained on {len(ids)} images from `{key}` maps"


if __name__ == "__main__":
    run_cli("train_affinity", main)
