"""Evaluate DeepLabV2 on the validation split (multi-scale + flip, optional CRF) ->
miou.json with per-class IoU, pixel accuracy, image count and the params; saves predictions.
`miou` is the configured protocol; `protocols` (eval_seg.protocols) adds, from the same pass,
single scale / multi-scale + flip / multi-scale + flip + CRF as separate numbers."""
from __future__ import annotations

import json
import logging
import os

from stages._common import add_manifest, parse_stage, parser, run_cli


def gather_stages(files) -> dict:
    """``{stage: mIoU}`` from ``<stage>_miou.json`` files that exist (``own_seg`` is named
    ``own_segmentation``); a null mIoU (method without a segmentation head) is skipped."""
    out = {}
    for f in files:
        if os.path.isfile(f):
            with open(f) as fh:
                v = json.load(fh)["miou"]
            if v is not None:
                name = os.path.basename(f).replace("_miou.json", "")
                out["own_segmentation" if name == "own_seg" else name] = v
    return out


def main() -> str:
    ap = parser("eval_seg", __doc__)
    add_manifest(ap)
    ap.add_argument("--model", default=None, help="DeepLabV2 checkpoint (default .../seg/model.pt)")
    ap.add_argument("--out", default=None, help="metrics json (default .../miou.json)")
    ap.add_argument("--predictions", default=None, help="PNG folder (default .../predictions)")
    ap.add_argument("--stage-metrics", nargs="*", default=None,
                    help="seeds/refined/pseudo mIoU files summarised into the output "
                         "(default: the chain's own, where they exist)")
    ap.add_argument("--own-seg", default=None,
                    help="own_seg_miou.json of the method's own segmentation head, gathered as "
                         "`own_segmentation` when not null (default: the chain's, if it exists)")
    args, d, s, m = parse_stage(ap, "eval_seg")
    from pipeline.data.classes import manifest_classes
    from pipeline.steps.segment_eval import evaluate, load_model
    from pipeline.engine.runtime import get_device
    from pipeline.io.storage import write_json
    dev = get_device(s.device)
    ids = m["splits"][s.split]
    res = evaluate(load_model(args.model or d["seg_model"], dev), m["root"], ids, m["label_dir"],
                   args.predictions or d["predictions"], s, dev, log=logging.getLogger("wsss").info,
                   class_names=manifest_classes(m))
    res.update(params=s.as_dict(), dataset=args.dataset, method=args.method)
    stage_files = args.stage_metrics if args.stage_metrics is not None else [
        d["seeds_miou"], d["refined_miou"], d["pseudo_miou"]]
    stage_files = [*stage_files, args.own_seg or d["own_seg_miou"]]
    res["stages"] = {**gather_stages(stage_files), "segmentation": res["miou"]}
    write_json(args.out or d["miou"], res)
    return f"segmentation mIoU {res['miou']:.4f} on {res.get('num_images', len(ids))} images"


if __name__ == "__main__":
    run_cli("eval_seg", main)
