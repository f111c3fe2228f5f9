"""Class sets of the datasets: VOC 2012 (21) and MS COCO 2014 (81), background first.

A dataset's class set is ``datasets.<name>.classes`` in params.yaml (``voc`` when absent,
so the VOC-format datasets ``demo`` / ``vocsample`` / ``voc`` need no key). ``prepare_dataset``
writes the names into the manifest ``results/{dataset}/dataset.json`` under ``"classes"``
and every later stage takes the class names and count from there
(:func:`manifest_classes`), never from the VOC constants.

Index conventions (what the label PNGs hold): 0 = background, 1..K = object classes,
255 = ignored. For COCO the object index is the rank of the official category id among the
80 ids sorted ascending (1 person ... 80 toothbrush), the order of the COCO-format WSSS
repositories (MCTformer, AFA, ToCo, MCC class lists). Source: the ``categories`` of
``instances_{train,val}2014.json``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

#: (official COCO category id, name) of the 80 "things" categories, ids ascending.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CLASSES: tuple[str, ...] = ("background",) + tuple(n for _, n in COCO_CATEGORIES)
#: official COCO category id -> label index 1..80
COCO_ID_TO_INDEX: dict[int, int] = {cid: i + 1 for i, (cid, _) in enumerate(COCO_CATEGORIES)}

CLASS_SETS: dict[str, tuple[str, ...]] = {"voc": VOC_CLASSES, "coco": COCO_CLASSES}


def class_names(name: str = "voc") -> tuple[str, ...]:
    """Names of a class set (``voc``: 21, ``coco``: 81), background first.

    Raises:
        ValueError: unknown set name (lists the known ones; fix ``datasets.<name>.classes``).
    """
    try:
        return CLASS_SETS[name]
    except KeyError:
        raise ValueError(f"unknown class set {name!r} in `datasets.<name>.classes` of "
                         f"params.yaml; known: {sorted(CLASS_SETS)}") from None


def dataset_classes(data: Mapping) -> tuple[str, ...]:
    """Class names of a ``datasets.<name>`` params entry (``classes`` key, default ``voc``)."""
    return class_names(str(data.get("classes", "voc")))


def manifest_classes(manifest: Mapping) -> tuple[str, ...]:
    """Class names of a dataset manifest (``"classes"``; a manifest written before the key
    existed is a VOC-format one, so it falls back to :data:`VOC_CLASSES`).

    Raises:
        ValueError: ``classes`` present but not a list of >= 2 names with background first.
    """
    names = manifest.get("classes")
    if names is None:
        return VOC_CLASSES
    if not isinstance(names, Sequence) or len(names) < 2 or names[0] != "background":
        raise ValueError(f"manifest `classes` must list the class names with 'background' "
                         f"first, got {names!r:.80}; rerun prepare_dataset.")
    return tuple(str(n) for n in names)
