"""Download the official MS COCO 2014 train/val images and instance annotations
(images.cocodataset.org, ~20 GB) into data/coco/ with torchvision's
download_and_extract_archive. Fails within seconds when offline."""
from __future__ import annotations

import argparse

from stages._common import run_cli


def main() -> str:
    ap = argparse.ArgumentParser(prog="python -m stages.download_coco", description=__doc__)
    ap.add_argument("--dest", default="data/coco", help="folder that receives annotations/, "
                    "train2014/, val2014/ (default data/coco)")
    args = ap.parse_args()
    from pipeline.data.coco import download_coco
    return str(download_coco(args.dest))


if __name__ == "__main__":
    run_cli("download_coco", main)
