"""Train DeepLabV2 (ResNet + ASPP) on the pseudo labels (stage 6)."""
from __future__ import annotations

import logging

from stages._common import add_manifest, parse_stage, parser, run_cli


def main() -> str:
    ap = parser("train_seg", __doc__)
    add_manifest(ap)
    ap.add_argument("--pseudo", default=None, help="pseudo-label folder (default .../pseudo)")
    ap.add_argument("--out", default=None, help="checkpoint (default .../seg/model.pt)")
    ap.add_argument("--metrics", default=None, help="default .../seg/metrics.json")
    args, d, s, m = parse_stage(ap, "train_seg")
    from pipeline.data.classes import manifest_classes
    from pipeline.steps.segment import train_seg
    from pipeline.engine.runtime import get_device
    from pipeline.io.storage import write_json
    ids = m["splits"][s.split]
    s = s.updated(num_classes=len(manifest_classes(m)))   # background included
    met = train_seg(m["root"], ids, args.pseudo or d["pseudo"], args.out or d["seg_model"], s,
                    device=get_device(s.device), log=logging.getLogger("wsss").info)
    from pipeline.engine.distributed import is_main_process
    if is_main_process():          # torchrun: rank 0 writes (the model too, see train_seg)
        write_json(args.metrics or d["seg_metrics"], met)
    return f"DeepLabV2 trained on {len(ids)} pseudo labels"


if __name__ == "__main__":
    run_cli("train_seg", main)
