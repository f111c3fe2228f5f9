# The WSSS DAG. Every (dataset, method) chain:
#   [make_dataset] -> prepare_dataset -> train_cls -> export_seeds -> eval_seeds
#   -> train_affinity -> refine_seeds -> make_pseudo_labels -> train_seg -> eval_seg
#   (+ train_cls -> eval_own_seg -> eval_seg: a single-stage method's own segmentation head)
# Each rule's `params:` is exactly the params.yaml sub-tree its stage reads
# (pipeline.config.stage_params), so editing one value reruns only that rule and its
# descendants. Stages are thin CLIs (`python -m stages.<name>`), runnable by hand and by DVC.
import json
import sys

from pipeline.config import check_complete, stage_params, validate
from pipeline.paths import artifacts, manifest

configfile: "params.yaml"
report: "report/workflow.rst"   # the landing page of `snakemake --report report.html`
validate(config)         # misspelt keys stop here, named, before any job runs
check_complete(config)

PY = sys.executable            # the interpreter running Snakemake (the project venv)
DATASETS = sorted(config["datasets"])
METHODS = sorted(config["methods"])
GENERATED = [d for d in DATASETS if config["datasets"][d].get("generate")]
# run.shards > 1 splits export_seeds, refine_seeds and make_pseudo_labels into that many jobs
# (rules *_shard) merged by the main rule; outputs are identical to an unsharded run.
SHARDS = int(config.get("run", {}).get("shards", 1) or 1)

wildcard_constraints:
    dataset="|".join(DATASETS),
    method="|".join(METHODS),
    shard=r"\d+",


def P(stage, with_method=True):
    """The rule's params: the stage's merged sub-tree as canonical JSON."""
    def f(w):
        return json.dumps(stage_params(config, w.dataset, w.method if with_method else None, stage),
                          sort_keys=True)
    return f


def A(key):
    return lambda w: artifacts(w.dataset, w.method)[key]


def coco_splits(name):
    """Split files the prepare_coco rule renders for a COCO dataset (`classes: coco` + `source`)."""
    d = config["datasets"][name]
    return sorted({f"{d['root']}/{f}" for f in d["splits"].values()})


# datasets converted from the official COCO download by rule prepare_coco (only `coco` by default)
CONVERTED = [d for d in DATASETS if config["datasets"][d].get("classes") == "coco"
             and config["datasets"][d].get("source")]


def dataset_inputs(w):
    """Generated datasets depend on their generator rule, COCO ones on prepare_coco; real VOC
    ones are checked by prepare_dataset."""
    if w.dataset in GENERATED:
        return [f"data/{w.dataset}"]
    return coco_splits(w.dataset) if w.dataset in CONVERTED else []


def gpu(w):
    return 0 if stage_params(config, w.dataset, None, "train_cls").get("device") == "cpu" else 1


# run.gpus G > 1: train_cls and train_seg ask for G GPUs and run under torchrun (one process
# per GPU, data parallel: pipeline/distributed.py); stages._launch picks torchrun or plain
# `python -m` from {resources.gpu}, so the GPU count is not a param (no rerun when it changes).
GPUS = int(config.get("run", {}).get("gpus", 1) or 1)


def gpus(w):
    return gpu(w) and GPUS


def parts(pattern):
    """Shard outputs a merge rule needs ([] when unsharded)."""
    return lambda w: ([pattern.format(dataset=w.dataset, method=w.method, shard=i) for i in range(SHARDS)]
                      if SHARDS > 1 else [])


R = "results/{dataset}/{method}"
L = "results/{dataset}/logs/{method}"
B = "results/{dataset}/benchmarks/{method}"
ENV = "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "

RF = R + "/report"
GALLERY_IMAGES = int((config.get("report") or {}).get("gallery_images", 4))
REPORT_FIGURES = ("curves.png", "iou.html", "gallery_train.png", "gallery_val.png")


def report_figures(dataset, methods):
    """Every report figure of the chains (dataset, m) for m in methods."""
    return expand(RF + "/{fig}", dataset=dataset, method=methods, fig=REPORT_FIGURES)


rule all:
    input:
        expand("results/{dataset}/{method}/miou.json",
               dataset=config["run"]["datasets"], method=config["run"]["methods"]),
        [report_figures(d, config["run"]["methods"]) for d in config["run"]["datasets"]]


rule download_voc:
    """PASCAL VOC 2012 + SBD via torchvision downloaders (needs internet)."""
    output: "data/voc/VOCdevkit/VOC2012/ImageSets/SegmentationAug/train_aug.txt"
    log: "results/voc/logs/download_voc.log"
    benchmark: "results/voc/benchmarks/download_voc.tsv"
    threads: 1
    resources: mem_mb=4000, gpu=0
    shell: "{PY} -m stages.download --dest data/voc 2>&1 | tee {log}"


rule download_coco:
    """MS COCO 2014 train/val images + instance annotations from images.cocodataset.org (needs
    internet, ~20 GB)."""
    output: "data/coco/annotations/instances_train2014.json", "data/coco/annotations/instances_val2014.json"
    log: "results/coco/logs/download_coco.log"
    benchmark: "results/coco/benchmarks/download_coco.tsv"
    threads: 1
    resources: mem_mb=4000, gpu=0
    shell: "{PY} -m stages.download_coco --dest data/coco 2>&1 | tee {log}"


if "coco" in CONVERTED:
    rule prepare_coco:
        """Render the COCO label PNGs + split lists (VOC layout) from the raw download at
        datasets.coco.source; stops with the missing path and `snakemake --cores 1
        download_coco` when the download is absent (never downloads by itself)."""
        output: coco_splits("coco")
        params: p=json.dumps({"data": config["datasets"].get("coco")}, sort_keys=True)
        log: "results/coco/logs/prepare_coco.log"
        benchmark: "results/coco/benchmarks/prepare_coco.tsv"
        threads: 1
        resources: mem_mb=8000, gpu=0
        shell: "{PY} -m stages.prepare_coco --dataset coco --params-json {params.p:q} 2>&1 | tee {log}"


rule make_dataset:
    """Synthetic VOC-format dataset (datasets with a `generate` section, e.g. demo)."""
    output: directory("data/{dataset}")       # the dataset root is data/{dataset}/VOC2012
    params: p=lambda w: json.dumps(config["datasets"][w.dataset], sort_keys=True)
    log: "results/{dataset}/logs/make_dataset.log"
    benchmark: "results/{dataset}/benchmarks/make_dataset.tsv"
    wildcard_constraints: dataset="|".join(GENERATED) if GENERATED else "^$"
    threads: 1
    resources: mem_mb=2000, gpu=0
    shell: "{PY} -m stages.make_dataset --dataset {wildcards.dataset} --params-json {params.p:q} --out {output}/VOC2012 > {log} 2>&1"


rule prepare_dataset:
    """Layout check + manifest (split ids, image-level labels from masks). Its error message
    (missing dataset, expected layout, how to get it) is shown on the console."""
    input: dataset_inputs
    output: "results/{dataset}/dataset.json"
    params: p=P("prepare_dataset", with_method=False)
    log: "results/{dataset}/logs/prepare_dataset.log"
    benchmark: "results/{dataset}/benchmarks/prepare_dataset.tsv"
    threads: 1
    resources: mem_mb=2000, gpu=0
    shell: "{PY} -m stages.prepare_dataset --dataset {wildcards.dataset} --params-json {params.p:q} --out {output} 2>&1 | tee {log}"


def teacher_model(w):
    """A method whose train_cls params name a `teacher` (smaf) trains from that method's
    classifier: the DAG edge results/{dataset}/{teacher}/cls/model.pt -> this train_cls.
    The stage reads the same path (pipeline.paths.artifacts) from the `teacher` param, so the
    rule's params and shell command stay those of every other method (no rerun of existing
    chains)."""
    t = stage_params(config, w.dataset, w.method, "train_cls").get("teacher")
    if not t:
        return None
    if t == w.method or t not in config["methods"]:
        raise ValueError(f"methods.{w.method}.train_cls.teacher must be another method of "
                         f"params.yaml ({sorted(set(config['methods']) - {w.method})}), got {t!r}")
    return artifacts(w.dataset, t)["cls_model"]


def cls_inputs(w):
    t = teacher_model(w)
    return {"manifest": f"results/{w.dataset}/dataset.json", **({"teacher": t} if t else {})}


rule train_cls:
    input: unpack(cls_inputs)
    output: model=R + "/cls/model.pt", metrics=R + "/cls/metrics.json"
    params: p=P("train_cls")
    log: L + "/train_cls.log"
    benchmark: B + "/train_cls.tsv"
    threads: 2
    resources: mem_mb=8000, gpu=gpus
    shell: ENV + "{PY} -m stages._launch {resources.gpu} stages.train_cls --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule export_seeds:
    input:
        manifest="results/{dataset}/dataset.json", model=R + "/cls/model.pt",
        parts=parts(R + "/shards/seeds.{shard}.h5")
    output: R + "/seeds.h5"
    params: p=P("export_seeds")
    log: L + "/export_seeds.log"
    benchmark: B + "/export_seeds.tsv"
    threads: 2
    resources: mem_mb=4000, gpu=lambda w: 0 if SHARDS > 1 else gpu(w)
    shell: ENV + "{PY} -m stages.export_seeds --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --model {input.model} --out {output}" + (" --merge {input.parts}" if SHARDS > 1 else "") + " > {log} 2>&1"


rule export_seeds_shard:
    input: manifest="results/{dataset}/dataset.json", model=R + "/cls/model.pt"
    output: temp(R + "/shards/seeds.{shard}.h5")
    params: p=P("export_seeds"), n=SHARDS
    log: L + "/export_seeds.{shard}.log"
    benchmark: B + "/export_seeds.{shard}.tsv"
    threads: 2
    resources: mem_mb=4000, gpu=gpu
    shell: ENV + "{PY} -m stages.export_seeds --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --model {input.model} --out {output} --shard {wildcards.shard}/{params.n} > {log} 2>&1"


rule eval_seeds:
    input: manifest="results/{dataset}/dataset.json", seeds=R + "/seeds.h5"
    output: R + "/seeds_miou.json"
    params: p=P("eval_seeds")
    log: L + "/eval_seeds.log"
    benchmark: B + "/eval_seeds.tsv"
    threads: 1
    resources: mem_mb=2000, gpu=0
    shell: ENV + "{PY} -m stages.eval_seeds --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --seeds {input.seeds} --out {output} > {log} 2>&1"


rule train_affinity:
    input: manifest="results/{dataset}/dataset.json", seeds=R + "/seeds.h5"
    output: model=R + "/affinity/model.pt", metrics=R + "/affinity/metrics.json"
    params: p=P("train_affinity")
    log: L + "/train_affinity.log"
    benchmark: B + "/train_affinity.tsv"
    threads: 2
    resources: mem_mb=8000, gpu=gpu
    shell: ENV + "{PY} -m stages.train_affinity --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --seeds {input.seeds} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule refine_seeds:
    input:
        manifest="results/{dataset}/dataset.json", seeds=R + "/seeds.h5", model=R + "/affinity/model.pt",
        parts=parts(R + "/shards/refined.{shard}.h5")
    output: maps=R + "/refined.h5", metrics=R + "/refined_miou.json"
    params: p=P("refine_seeds")
    log: L + "/refine_seeds.log"
    benchmark: B + "/refine_seeds.tsv"
    threads: 2
    resources: mem_mb=4000, gpu=lambda w: 0 if SHARDS > 1 else gpu(w)
    shell: ENV + "{PY} -m stages.refine_seeds --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --seeds {input.seeds} --model {input.model} --out {output.maps} --metrics {output.metrics}" + (" --merge {input.parts}" if SHARDS > 1 else "") + " > {log} 2>&1"


rule refine_seeds_shard:
    input: manifest="results/{dataset}/dataset.json", seeds=R + "/seeds.h5", model=R + "/affinity/model.pt"
    output: temp(R + "/shards/refined.{shard}.h5")
    params: p=P("refine_seeds"), n=SHARDS
    log: L + "/refine_seeds.{shard}.log"
    benchmark: B + "/refine_seeds.{shard}.tsv"
    threads: 2
    resources: mem_mb=4000, gpu=gpu
    shell: ENV + "{PY} -m stages.refine_seeds --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --seeds {input.seeds} --model {input.model} --out {output} --shard {wildcards.shard}/{params.n} > {log} 2>&1"


rule make_pseudo_labels:
    input:
        manifest="results/{dataset}/dataset.json", maps=R + "/refined.h5",
        parts=parts(R + "/shards/pseudo.{shard}")
    output: labels=directory(R + "/pseudo"), metrics=R + "/pseudo_miou.json"
    params: p=P("make_pseudo_labels")
    log: L + "/make_pseudo_labels.log"
    benchmark: B + "/make_pseudo_labels.tsv"
    threads: workflow.cores
    resources: mem_mb=4000, gpu=0
    shell: "OMP_NUM_THREADS=1 {PY} -m stages.make_pseudo_labels --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --maps {input.maps} --out {output.labels} --metrics {output.metrics} --workers {threads}" + (" --merge {input.parts}" if SHARDS > 1 else "") + " > {log} 2>&1"


rule make_pseudo_labels_shard:
    input: manifest="results/{dataset}/dataset.json", maps=R + "/refined.h5"
    output: temp(directory(R + "/shards/pseudo.{shard}"))
    params: p=P("make_pseudo_labels"), n=SHARDS
    log: L + "/make_pseudo_labels.{shard}.log"
    benchmark: B + "/make_pseudo_labels.{shard}.tsv"
    threads: workflow.cores
    resources: mem_mb=4000, gpu=0
    shell: "OMP_NUM_THREADS=1 {PY} -m stages.make_pseudo_labels --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --maps {input.maps} --out {output} --workers {threads} --shard {wildcards.shard}/{params.n} > {log} 2>&1"


rule train_seg:
    input: manifest="results/{dataset}/dataset.json", labels=R + "/pseudo"
    output: model=R + "/seg/model.pt", metrics=R + "/seg/metrics.json"
    params: p=P("train_seg")
    log: L + "/train_seg.log"
    benchmark: B + "/train_seg.tsv"
    threads: 2
    resources: mem_mb=8000, gpu=gpus
    shell: ENV + "{PY} -m stages._launch {resources.gpu} stages.train_seg --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --pseudo {input.labels} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule eval_own_seg:
    """The method's own segmentation head (single-stage AFA / MCC; null for the others)."""
    input: manifest="results/{dataset}/dataset.json", model=R + "/cls/model.pt"
    output: R + "/own_seg_miou.json"
    params: p=P("eval_own_seg")
    log: L + "/eval_own_seg.log"
    benchmark: B + "/eval_own_seg.tsv"
    threads: 2
    resources: mem_mb=4000, gpu=gpu
    shell: ENV + "{PY} -m stages.eval_own_seg --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --model {input.model} --out {output} > {log} 2>&1"


rule eval_seg:
    input:
        manifest="results/{dataset}/dataset.json", model=R + "/seg/model.pt",
        # the earlier stages' scores are gathered into miou.json, so one target builds all four
        seeds=R + "/seeds_miou.json", refined=R + "/refined_miou.json", pseudo=R + "/pseudo_miou.json",
        own=R + "/own_seg_miou.json"
    output: metrics=R + "/miou.json", predictions=directory(R + "/predictions")
    params: p=P("eval_seg")
    log: L + "/eval_seg.log"
    benchmark: B + "/eval_seg.tsv"
    threads: 2
    resources: mem_mb=4000, gpu=gpu
    shell: ENV + "{PY} -m stages.eval_seg --dataset {wildcards.dataset} --method {wildcards.method} --params-json {params.p:q} --manifest {input.manifest} --model {input.model} --out {output.metrics} --predictions {output.predictions} --stage-metrics {input.seeds} {input.refined} {input.pseudo} --own-seg {input.own} > {log} 2>&1"


rule compare:
    """All methods of params.yaml on one dataset: `snakemake results/voc/comparison.md` builds
    every chain, then one row per method and one column per stage's mIoU (+ .json)."""
    input: lambda w: expand(R + "/miou.json", dataset=w.dataset, method=METHODS)
    output: md="results/{dataset}/comparison.md", js="results/{dataset}/comparison.json"
    params: methods=" ".join(METHODS)
    log: "results/{dataset}/logs/compare.log"
    benchmark: "results/{dataset}/benchmarks/compare.tsv"
    threads: 1
    resources: mem_mb=2000, gpu=0
    shell: "{PY} -m stages.compare --dataset {wildcards.dataset} --methods {params.methods} --out {output.md} > {log} 2>&1"


# ------------------------------------------------------------------ snakemake --report
# Outputs marked with report() are embedded (as data URIs) in the one self-contained HTML page
# of `snakemake --report report.html <targets>`; category = chain, subcategory = stage.
CAT = "{dataset} / {method}"


rule report_figures:
    """Training curves, per-class IoU table and fixed-image galleries of one chain
    (pipeline/report.py; no torch import, ~3 s)."""
    input:
        manifest="results/{dataset}/dataset.json", miou=R + "/miou.json", predictions=R + "/predictions",
        seeds=R + "/seeds.h5", refined=R + "/refined.h5", pseudo=R + "/pseudo",
        stage_metrics=[R + "/seeds_miou.json", R + "/refined_miou.json", R + "/pseudo_miou.json",
                       R + "/own_seg_miou.json"],
        curves=[R + "/cls/metrics.json", R + "/affinity/metrics.json", R + "/seg/metrics.json"]
    output:
        curves=report(RF + "/curves.png", caption="report/curves.rst", category=CAT,
                      subcategory="training curves", labels={"chain": CAT, "figure": "losses"}),
        iou=report(RF + "/iou.html", caption="report/iou.rst", category=CAT,
                   subcategory="per-class IoU", labels={"chain": CAT, "figure": "IoU table"}),
        gallery_train=report(RF + "/gallery_train.png", caption="report/gallery_train.rst", category=CAT,
                             subcategory="galleries", labels={"chain": CAT, "figure": "train: CAM / refined / pseudo"}),
        gallery_val=report(RF + "/gallery_val.png", caption="report/gallery_val.rst", category=CAT,
                           subcategory="galleries", labels={"chain": CAT, "figure": "val: prediction"})
    params: n=GALLERY_IMAGES
    log: L + "/report_figures.log"
    benchmark: B + "/report_figures.tsv"
    threads: 1
    resources: mem_mb=2000, gpu=0
    shell: "{PY} -m stages.report_figures --manifest {input.manifest} --chain results/{wildcards.dataset}/{wildcards.method} --out-dir results/{wildcards.dataset}/{wildcards.method}/report --gallery-images {params.n} > {log} 2>&1"


rule report_comparison:
    """The cross-method comparison table (rule compare) as HTML, after every method's figures:
    `snakemake results/{dataset}/report/comparison.html` builds all chains, figures included."""
    input: js="results/{dataset}/comparison.json", figures=lambda w: report_figures(w.dataset, METHODS)
    output:
        report("results/{dataset}/report/comparison.html", caption="report/comparison.rst",
               category="comparison", subcategory="{dataset}", labels={"dataset": "{dataset}"})
    log: "results/{dataset}/logs/report_comparison.log"
    threads: 1
    resources: mem_mb=1000, gpu=0
    shell: "{PY} -m stages.report_figures --comparison {input.js} --out {output} > {log} 2>&1"


# ------------------------------------------------------------------ misspelt targets
# Without these, `snakemake results/vocc/acr/miou.json` ends in Snakemake's generic
# MissingRuleException. The negative look-aheads make them match only unknown names, so they
# never compete with the real rules; their input function stops DAG building with one line.
def _not(names):
    return "(?!(?:" + "|".join(names) + ")/)[^/]+"


def _unknown(w):
    from pipeline.config import unknown_target
    method = getattr(w, "bad_method", None)
    dataset = getattr(w, "bad_dataset", None) or w.dataset
    target = f"results/{dataset}/" + (f"{method}/" if method else "") + w.rest
    raise WorkflowError(unknown_target(config, target, dataset, method))


rule unknown_dataset:
    input: _unknown
    output: "results/{bad_dataset}/{rest}"
    wildcard_constraints: bad_dataset=_not(DATASETS + ["bench"]), rest=".+"


rule unknown_method:
    input: _unknown
    output: "results/{dataset}/{bad_method}/{rest}"
    wildcard_constraints: bad_method=_not(METHODS + ["logs", "benchmarks", "report"]), rest=".+"
