"""Check a dataset's layout and write its manifest (split ids + image-level labels derived
from the masks) to results/{dataset}/dataset.json."""
from __future__ import annotations

from stages._common import default_paths, parser, run_cli, stage_config


def main() -> str:
    ap = parser("prepare_dataset", __doc__, method=False)
    ap.add_argument("--out", default=None, help="manifest path (default results/{dataset}/dataset.json)")
    args = ap.parse_args()
    p = stage_config(args, "prepare_dataset")
    from pipeline.data.prepare import build_manifest
    from pipeline.io.storage import write_json
    m = build_manifest(p["data"], verify_images=bool(p.get("verify_images", True)))
    out = args.out or default_paths(args)["manifest"]
    write_json(out, m)
    return f"{out}: {m['counts']}"


if __name__ == "__main__":
    run_cli("prepare_dataset", main)
