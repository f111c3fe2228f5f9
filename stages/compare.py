"""Cross-method comparison of a dataset -> results/{dataset}/comparison.md and .json
(one row per method, one column per stage's mIoU, plus the all-background floor)."""
from __future__ import annotations

from pathlib import Path

from stages._common import load_params, parser, run_cli


def main() -> str:
    ap = parser("compare", __doc__, method=False)
    ap.add_argument("--methods", nargs="*", default=None,
                    help="methods to compare (default: every method of params.yaml)")
    ap.add_argument("--results", default="results", help="results folder (default results)")
    ap.add_argument("--out", default=None, help="Markdown output (default results/{dataset}/comparison.md); "
                                                "the .json goes beside it")
    args = ap.parse_args()
    from pipeline.steps.compare import comparison, to_markdown
    from pipeline.io.storage import atomic_write
    from pipeline.io.storage import write_json
    methods = args.methods or sorted(load_params(args.params)["methods"])
    c = comparison(args.dataset, methods, args.results)
    out = Path(args.out or f"{args.results}/{args.dataset}/comparison.md")
    write_json(out.with_suffix(".json"), c)
    md = to_markdown(c)
    atomic_write(out, lambda t: t.write_text(md))
    print(md)
    return f"{out} ({len(c['rows'])} methods)"


if __name__ == "__main__":
    run_cli("compare", main)
