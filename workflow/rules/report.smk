# Cross-method comparison and the figures of `snakemake --report report.html <targets>`.
# Outputs marked with report() are embedded (as data URIs) in its one self-contained HTML
# page; category = chain, subcategory = stage. Caption paths are relative to this file.

CAT = "{dataset} / {method}"


rule compare:
    """All methods of params.yaml on one dataset: `snakemake results/voc/comparison.md` builds
    every chain, then one row per method and one column per stage's mIoU (+ .json)."""
    input: lambda w: [artifacts(w.dataset, m)["miou"] for m in METHODS]
    output: md="results/{dataset}/comparison.md", js="results/{dataset}/comparison.json"
    params: methods=" ".join(METHODS)
    log: "results/{dataset}/logs/compare.log"
    benchmark: "results/{dataset}/benchmarks/compare.tsv"
    threads: 1
    resources: mem_mb=2000, gpu=0
    conda: "../envs/wsss.yaml"
    shell: "python -m stages.compare --dataset {wildcards.dataset} --methods {params.methods} --out {output.md} > {log} 2>&1"


rule report_figures:
    """Training curves, per-class IoU table and fixed-image galleries of one chain
    (pipeline/steps/report.py; no torch import, ~3 s)."""
    input:
        manifest=MANIFEST, miou=A["miou"], predictions=A["predictions"],
        seeds=A["seeds"], refined=A["refined"], pseudo=A["pseudo"],
        stage_metrics=[A["seeds_miou"], A["refined_miou"], A["pseudo_miou"], A["own_seg_miou"]],
        curves=[A["cls_metrics"], A["aff_metrics"], A["seg_metrics"]]
    output:
        curves=report(f"{REPORT_DIR}/curves.png", caption="../../report/curves.rst", category=CAT,
                      subcategory="training curves", labels={"chain": CAT, "figure": "losses"}),
        iou=report(f"{REPORT_DIR}/iou.html", caption="../../report/iou.rst", category=CAT,
                   subcategory="per-class IoU", labels={"chain": CAT, "figure": "IoU table"}),
        gallery_train=report(f"{REPORT_DIR}/gallery_train.png", caption="../../report/gallery_train.rst", category=CAT,
                             subcategory="galleries", labels={"chain": CAT, "figure": "train: CAM / refined / pseudo"}),
        gallery_val=report(f"{REPORT_DIR}/gallery_val.png", caption="../../report/gallery_val.rst", category=CAT,
                           subcategory="galleries", labels={"chain": CAT, "figure": "val: prediction"})
    params: n=GALLERY_IMAGES
    log: chain_log("report_figures")
    benchmark: chain_benchmark("report_figures")
    threads: 1
    resources: mem_mb=2000, gpu=0
    conda: "../envs/wsss.yaml"
    shell: "python -m stages.report_figures --manifest {input.manifest} --chain results/{wildcards.dataset}/{wildcards.method} --out-dir results/{wildcards.dataset}/{wildcards.method}/report --gallery-images {params.n} > {log} 2>&1"


rule report_comparison:
    """The cross-method comparison table (rule compare) as HTML, after every method's figures:
    `snakemake results/{dataset}/report/comparison.html` builds all chains, figures included."""
    input: js="results/{dataset}/comparison.json", figures=lambda w: report_figures(w.dataset, METHODS)
    output:
        report("results/{dataset}/report/comparison.html", caption="../../report/comparison.rst",
               category="comparison", subcategory="{dataset}", labels={"dataset": "{dataset}"})
    log: "results/{dataset}/logs/report_comparison.log"
    threads: 1
    resources: mem_mb=1000, gpu=0
    conda: "../envs/wsss.yaml"
    shell: "python -m stages.report_figures --comparison {input.js} --out {output} > {log} 2>&1"
