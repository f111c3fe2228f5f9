"""Train a method's classifier on image-level labels (stage 1)."""
from __future__ import annotations

import logging

from stages._common import add_manifest, parse_stage, parser, run_cli


def main() -> str:
    ap = parser("train_cls", __doc__)
    add_manifest(ap)
    ap.add_argument("--out", default=None, help="checkpoint path (default results/{dataset}/{method}/cls/model.pt)")
    ap.add_argument("--metrics", default=None, help="metrics json (default .../cls/metrics.json)")
    ap.add_argument("--teacher", default=None,
                    help="teacher classifier checkpoint for methods with a `teacher` param (smaf); "
                         "default results/{dataset}/{teacher}/cls/model.pt")
    args, d, s, m = parse_stage(ap, "train_cls")
    from pipeline.data.classes import manifest_classes
    from pipeline.steps.cls import train_classifier
    from pipeline.io.paths import artifacts
    from pipeline.io.storage import write_json
    ids = m["splits"][s.split]
    inputs = {}
    teacher = s.method.get("teacher")          # a method key (smaf)
    if teacher:
        inputs["teacher"] = args.teacher or artifacts(args.dataset, teacher)["cls_model"]
    met = train_classifier(args.method, m["root"], ids, m["labels"], s, args.out or d["cls_model"],
                           log=logging.getLogger("wsss").info, inputs=inputs,
                           class_names=manifest_classes(m), no_background=m.get("no_background"))
    from pipeline.engine.distributed import is_main_process
    if is_main_process():          # torchrun: rank 0 writes (the model too, see train_classifier)
        write_json(args.metrics or d["cls_metrics"], met)
    return f"{met['iters']} iterations on {met['images']} images, final {met['final']}"


if __name__ == "__main__":
    run_cli("train_cls", main)
