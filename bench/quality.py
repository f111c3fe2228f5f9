"""How much the PSA random walk can add to a built chain's seeds (a diagnostic, not a result).

For every chain of ``dataset`` whose seeds exist (``results/<dataset>/<method>/seeds.h5``), on
its ``refine_seeds`` split, with the profile's ``refine_seeds`` settings (background power,
radius, beta, logt) and ``train_affinity`` label settings:

* ``seeds``: the seeds at the fixed background threshold of ``eval_seeds`` (as
  ``seeds_miou.json``);
* ``walk_gt_affinity``: the same walk with the **ground truth** as the affinity
  (:func:`pipeline.steps.refine.random_walk.label_affinity_features`): the upper bound of what a
  perfect AffinityNet could do from these seeds. Uses the ground truth of the images it
  scores; never a setting of the pipeline;
* ``walk_label_affinity``: the walk with the affinity labels the AffinityNet is trained on
  (PSA's two CRFs at ``alpha_low`` / ``alpha_high``, per-pixel combination of
  :func:`pipeline.steps.refine.affinity_labels.make_affinity_label`; ignored pixels are a label
  of their own), i.e. an AffinityNet that learned exactly its training labels;
* ``refined``: the chain's own ``refined_miou.json`` (its trained AffinityNet), if built.

A refinement that stays at the seeds' level with ``walk_gt_affinity`` far above it means the
walk works and the affinity is what limits it; ``walk_label_affinity`` near the seeds means
the seeds' own affinity labels carry little beyond the seeds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.io.paths import artifacts, manifest

STREAMS = ("seeds", "walk_gt_affinity", "walk_label_affinity")


def rw_ceiling(dataset: str, params_path: str = "params.yaml") -> dict:
    """Rows of mIoU (percent) per built chain of ``dataset``: the module docstring's streams
    and the chain's own refined maps.

    Raises:
        FileNotFoundError: no manifest or no chain with seeds under ``results/<dataset>/``.
    """
    from pipeline.data.voc import load_image
    from pipeline.engine.evaluator import Evaluator
    from pipeline.engine.labels import maps_to_label
    from pipeline.io.config import load_params, stage_params
    from pipeline.io.settings import EvalSeeds, RefineSeeds, TrainAffinity
    from pipeline.io.storage import MapReader
    from pipeline.methods import get_method
    from pipeline.steps.refine.affinity_labels import make_affinity_label, resize_maps
    from pipeline.steps.refine.random_walk import label_affinity_features, refine_with_features

    man_path = Path(manifest(dataset))
    if not man_path.is_file():
        raise FileNotFoundError(f"{man_path} missing: build a {dataset} chain first "
                                f"(`snakemake --cores 2 results/{dataset}/cam/refined_miou.json`)")
    man = json.loads(man_path.read_text())
    cfg = load_params(params_path)
    rows = []
    for method_dir in sorted(Path(f"results/{dataset}").iterdir()):
        art = artifacts(dataset, method_dir.name)
        if not Path(art["seeds"]).is_file():
            continue
        method = method_dir.name

        def settings(cls, stage):
            return cls.of(stage_params(cfg, dataset, method, stage), partial=True)
        rs, ta, es = (settings(RefineSeeds, "refine_seeds"), settings(TrainAffinity, "train_affinity"),
                      settings(EvalSeeds, "eval_seeds"))
        key = rs.seed_key or get_method(method).refine_key
        ids = man["splits"][rs.split]
        ev = Evaluator(man["root"], man["label_dir"], man["classes"], streams=STREAMS)

        def predict(image_id, reader):
            cams, cids, _ = reader.read(image_id, key)
            image = load_image(man["root"], image_id)
            size = image.shape[:2]
            cams = resize_maps(np.asarray(cams, np.float32), size)
            ids_all = np.concatenate([[0], cids])
            gt = ev.ground_truth(image_id)
            aff_label = make_affinity_label(image, cams, cids, ta.alpha_low, ta.alpha_high, ta.crf)
            out = {"seeds": maps_to_label(cams, np.asarray(cids), es.bg_threshold)}
            for name, lab in (("walk_gt_affinity", gt), ("walk_label_affinity", aff_label)):
                probs = refine_with_features(label_affinity_features(lab), cams, size, rs)
                out[name] = ids_all[probs.argmax(0)].astype(np.uint8)
            return out

        with MapReader(art["seeds"]) as reader:
            ev.run(ids, lambda i: predict(i, reader), desc=f"rw_ceiling {method}")
        row = {"dataset": dataset, "method": method, "seed_key": key, "images": len(ids),
               "bg_threshold": es.bg_threshold, "bg_alpha": rs.bg_alpha}
        for s in STREAMS:
            row[s] = round(100 * ev.scores(s)["miou"], 1)
        ref = Path(art["refined_miou"])
        row["refined"] = (round(100 * json.loads(ref.read_text())["miou"], 1)
                          if ref.is_file() else None)
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no results/{dataset}/<method>/seeds.h5: build a chain first")
    summary = "; ".join(f"{r['method']}: seeds {r['seeds']}, refined {r['refined']}, "
                        f"walk with GT affinity {r['walk_gt_affinity']}, with its affinity "
                        f"labels {r['walk_label_affinity']}" for r in rows)
    return {"rows": rows, "summary": summary}
