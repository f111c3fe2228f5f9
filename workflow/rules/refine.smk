# Seed refinement: the affinity network, the refined maps and the CRF pseudo labels.


rule train_affinity:
    input: manifest=MANIFEST, seeds=A["seeds"]
    output: model=A["aff_model"], metrics=A["aff_metrics"]
    params: p=P("train_affinity")
    log: chain_log("train_affinity")
    benchmark: chain_benchmark("train_affinity")
    threads: 2
    resources: mem_mb=8000, gpu=gpu
    conda: "../envs/wsss.yaml"
    shell: stage_shell("train_affinity", "--seeds {input.seeds} --out {output.model} --metrics {output.metrics}")


# rules refine_seeds + refine_seeds_shard, make_pseudo_labels + make_pseudo_labels_shard
# (common.smk: per_image_stage)
per_image_stage("refine_seeds",
                input={"manifest": MANIFEST, "seeds": A["seeds"], "model": A["aff_model"]},
                args="--seeds {input.seeds} --model {input.model}",
                output={"maps": A["refined"], "metrics": A["refined_miou"]}, gpu=gpu)

# the dense CRF is a process pool over images (--workers), one BLAS thread each; it reads the
# refined maps, or the seeds with `make_pseudo_labels.source: seeds` (ViT-PCM's official BPM +
# CRF). Both are inputs either way (the refined stages also run then: refined_miou.json), so the
# DAG has one shape for every method, as dvc.yaml's matrix.
per_image_stage("make_pseudo_labels",
                input={"manifest": MANIFEST, "maps": A["refined"], "seeds": A["seeds"]},
                args="--maps {input.maps} --seeds {input.seeds}",
                output={"labels": directory(A["pseudo"]), "metrics": A["pseudo_miou"]},
                opts="--workers {threads}", env="OMP_NUM_THREADS=1 ", threads=workflow.cores)
