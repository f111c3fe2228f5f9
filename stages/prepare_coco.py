"""Convert the official MS COCO 2014 download (datasets.<name>.source: annotations/ +
train2014/ + val2014/) into the VOC layout the pipeline reads (datasets.<name>.root):
JPEGImages symlinks, one palette label PNG per image rendered from the instance annotations
with pycocotools (80 classes + background, crowd regions per datasets.<name>.crowd), and
ImageSets/Segmentation/{train,val}.txt. Streams one image at a time, resumable (existing PNGs
are kept). Rules: pipeline/data/coco.py."""
from __future__ import annotations

from stages._common import parser, run_cli, stage_config


def main() -> str:
    ap = parser("prepare_coco", __doc__, method=False)
    ap.add_argument("--source", default=None, help="raw COCO 2014 folder (default datasets.<name>.source)")
    ap.add_argument("--root", default=None, help="output VOC-layout root (default datasets.<name>.root)")
    ap.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                    help="which COCO 2014 splits to render (default both)")
    args = ap.parse_args()
    data = stage_config(args, "prepare_dataset")["data"]
    from pipeline.data.coco import convert_coco
    from pipeline.data.voc import DatasetError
    if data.get("classes") != "coco" or not (args.source or data.get("source")):
        raise DatasetError(f"datasets.{args.dataset} is not a COCO dataset (needs `classes: coco` "
                           f"and `source:` in params.yaml); prepare_coco converts COCO only.")
    s = convert_coco(args.source or data["source"], args.root or data["root"], args.splits,
                     label_dir=data.get("label_dir", "SegmentationClass"),
                     crowd=data.get("crowd", "ignore"))
    return str(s)


if __name__ == "__main__":
    run_cli("prepare_coco", main)
