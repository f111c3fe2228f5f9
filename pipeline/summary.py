"""Print where a chain's ``miou.json`` is and its per-stage mIoU: ``python -m pipeline.summary FILE...``."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def summarise(path: str | Path) -> str:
    """One line per stage of a ``miou.json`` written by ``eval_seg``."""
    p = Path(path)
    d = json.loads(p.read_text())
    stages = d.get("stages", {"segmentation": d["miou"]})
    body = "  ".join(f"{k}={100 * v:.1f}" for k, v in stages.items())
    prot = "  ".join(f"{k}={100 * v['miou']:.1f}" for k, v in (d.get("protocols") or {}).items())
    return (f"{p.resolve()}\n  {d.get('dataset', '?')}/{d.get('method', '?')} mIoU (%): {body}"
            f"  [{d.get('num_images', '?')} val images]"
            + (f"\n  segmentation protocols (%): {prot}" if prot else ""))


if __name__ == "__main__":
    for f in sys.argv[1:]:
        print(summarise(f))
