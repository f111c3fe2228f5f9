# Datasets: downloads (by hand: they need internet), the COCO label rendering, the synthetic
# generator and the layout check + manifest every chain starts from.


rule download_voc:
    """PASCAL VOC 2012 + SBD via torchvision downloaders (needs internet)."""
    output: "data/voc/VOCdevkit/VOC2012/ImageSets/SegmentationAug/train_aug.txt"
    log: "results/voc/logs/download_voc.log"
    benchmark: "results/voc/benchmarks/download_voc.tsv"
    threads: 1
    resources: mem_mb=4000, gpu=0
    conda: "../envs/wsss.yaml"
    shell: "python -m stages.download --dest data/voc 2>&1 | tee {log}"


rule download_coco:
    """MS COCO 2014 train/val images + instance annotations from images.cocodataset.org (needs
    internet, ~20 GB)."""
    output: "data/coco/annotations/instances_train2014.json", "data/coco/annotations/instances_val2014.json"
    log: "results/coco/logs/download_coco.log"
    benchmark: "results/coco/benchmarks/download_coco.tsv"
    threads: 1
    resources: mem_mb=4000, gpu=0
    conda: "../envs/wsss.yaml"
    shell: "python -m stages.download_coco --dest data/coco 2>&1 | tee {log}"


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
        conda: "../envs/wsss.yaml"
        shell: "python -m stages.prepare_coco --dataset coco --params-json {params.p:q} 2>&1 | tee {log}"


rule make_dataset:
    """Synthetic VOC-format dataset (datasets with a `generate` section, e.g. demo)."""
    output: directory("data/{dataset}")       # the dataset root is data/{dataset}/VOC2012
    params: p=lambda w: json.dumps(config["datasets"][w.dataset], sort_keys=True)
    log: "results/{dataset}/logs/make_dataset.log"
    benchmark: "results/{dataset}/benchmarks/make_dataset.tsv"
    wildcard_constraints: dataset="|".join(GENERATED) if GENERATED else "^$"
    threads: 1
    resources: mem_mb=2000, gpu=0
    conda: "../envs/wsss.yaml"
    shell: "python -m stages.make_dataset --dataset {wildcards.dataset} --params-json {params.p:q} --out {output}/VOC2012 > {log} 2>&1"


rule prepare_dataset:
    """Layout check + manifest (split ids, image-level labels from masks). Its error message
    (missing dataset, expected layout, how to get it) is shown on the console."""
    input: dataset_inputs
    output: MANIFEST
    params: p=P("prepare_dataset", with_method=False)
    log: "results/{dataset}/logs/prepare_dataset.log"
    benchmark: "results/{dataset}/benchmarks/prepare_dataset.tsv"
    threads: 1
    resources: mem_mb=2000, gpu=0
    conda: "../envs/wsss.yaml"
    shell: "python -m stages.prepare_dataset --dataset {wildcards.dataset} --params-json {params.p:q} --out {output} 2>&1 | tee {log}"
