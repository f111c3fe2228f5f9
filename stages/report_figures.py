"""Report figures of one (dataset, method) chain -> <out-dir>/{curves.png, iou.html,
gallery_train.png, gallery_val.png}, or (--comparison) a dataset's comparison.json as HTML.

Shown by `snakemake --report report.html` (the Snakefile marks them with report()). Imports
no torch/timm; all paths are explicit, so it runs alone:

  python -m stages.report_figures --manifest results/demo/dataset.json \
      --chain results/demo/acr --out-dir results/demo/acr/report --gallery-images 4
  python -m stages.report_figures --comparison results/demo/comparison.json \
      --out results/demo/report/comparison.html
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m stages.report_figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", help="results/{dataset}/dataset.json (prepare_dataset)")
    ap.add_argument("--chain", help="the chain's results folder, results/{dataset}/{method}")
    ap.add_argument("--out-dir", help="where the figures go (results/{dataset}/{method}/report)")
    ap.add_argument("--gallery-images", type=int, default=4,
                    help="images per gallery: the first N sorted ids of eval_train and of val "
                         "(params.yaml report.gallery_images)")
    ap.add_argument("--comparison", help="instead: results/{dataset}/comparison.json to render")
    ap.add_argument("--out", help="with --comparison: the HTML file to write")
    args = ap.parse_args(argv)
    from pipeline.steps import report
    if args.comparison:
        if not args.out:
            ap.error("--comparison needs --out")
        text = report.comparison_html(report.read_json(args.comparison, "compare"))
        report.atomic_write(args.out, lambda t: t.write_text(text, encoding="utf-8"))
        return args.out
    if not (args.manifest and args.chain and args.out_dir):
        ap.error("give --manifest, --chain and --out-dir (or --comparison and --out)")
    done = report.chain_report(args.manifest, args.chain, args.out_dir, args.gallery_images)
    return ", ".join(str(p) for p in done.values())


if __name__ == "__main__":
    from pipeline.data.voc import DatasetError
    from pipeline.steps.report import ReportError
    from pipeline.io.storage import StorageError
    t0 = time.time()
    try:
        out = main()
    except (ReportError, DatasetError, StorageError, ValueError) as e:
        print(f"\nERROR [report_figures]: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[report_figures] done in {time.time() - t0:.1f}s: {out}")
