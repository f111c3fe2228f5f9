"""Generate the synthetic `demo` dataset (VOC layout) deterministically from params.yaml."""
from __future__ import annotations

from pathlib import Path

from stages._common import load_params, parser, run_cli


def main() -> str:
    ap = parser("make_dataset", __doc__, method=False)
    ap.add_argument("--out", default=None, help="dataset root (default datasets.<name>.root)")
    args = ap.parse_args()
    import json
    cfg = (json.loads(args.params_json) if args.params_json
           else load_params(args.params)["datasets"][args.dataset])
    from pipeline.data.demo import make_demo_dataset
    gen = cfg.get("generate")
    if not gen:
        raise SystemExit(f"dataset {args.dataset!r} has no `generate` section: it is not synthetic")
    out = Path(args.out or cfg["root"])
    summary = make_demo_dataset(out, **gen)
    return f"{out} ({summary.get('num_train', '?')} train / {summary.get('num_val', '?')} val)"


if __name__ == "__main__":
    run_cli("make_dataset", main)
