"""Evaluate a single-stage method's own segmentation head (AFA, MCC) on the validation split
(multi-scale + flip) -> own_seg_miou.json; methods without a head (acr, cam) get
``{"miou": null, "note": ...}``."""
from __future__ import annotations

import logging

from stages._common import add_manifest, parse_stage, parser, run_cli


def main() -> str:
    ap = parser("eval_own_seg", __doc__)
    add_manifest(ap)
    ap.add_argument("--model", default=None, help="classifier checkpoint (default .../cls/model.pt)")
    ap.add_argument("--out", default=None, help="metrics json (default .../own_seg_miou.json)")
    args, d, s, m = parse_stage(ap, "eval_own_seg")
    from pipeline.data.classes import manifest_classes
    from pipeline.steps.own_seg import evaluate_own_seg
    from pipeline.engine.runtime import get_device
    from pipeline.io.storage import write_json
    ids = m["splits"][s.split]
    res = evaluate_own_seg(args.model or d["cls_model"], m["root"], ids, m["label_dir"], s,
                           get_device(s.device), log=logging.getLogger("wsss").info,
                           class_names=manifest_classes(m))
    res.update(params=s.as_dict(), dataset=args.dataset, method=args.method)
    write_json(args.out or d["own_seg_miou"], res)
    return (f"own segmentation mIoU {res['miou']:.4f} on {res['num_images']} images"
            if res["miou"] is not None else res["note"])


if __name__ == "__main__":
    run_cli("eval_own_seg", main)
