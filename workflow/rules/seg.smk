# Segmentation: the DeepLab trained on the pseudo labels, the single-stage methods' own head,
# and the final evaluation that gathers every stage's score into miou.json.


rule train_seg:
    input: manifest=MANIFEST, labels=A["pseudo"]
    output: model=A["seg_model"], metrics=A["seg_metrics"]
    params: p=P("train_seg")
    log: chain_log("train_seg")
    benchmark: chain_benchmark("train_seg")
    threads: 2
    resources: mem_mb=8000, gpu=gpus
    conda: "../envs/wsss.yaml"
    shell: stage_shell("train_seg", "--pseudo {input.labels} --out {output.model} --metrics {output.metrics}", launch=True)


rule eval_own_seg:
    """The method's own segmentation head (single-stage AFA / MCC; null for the others)."""
    input: manifest=MANIFEST, model=A["cls_model"]
    output: A["own_seg_miou"]
    params: p=P("eval_own_seg")
    log: chain_log("eval_own_seg")
    benchmark: chain_benchmark("eval_own_seg")
    threads: 2
    resources: mem_mb=4000, gpu=gpu
    conda: "../envs/wsss.yaml"
    shell: stage_shell("eval_own_seg", "--model {input.model} --out {output}")


rule eval_seg:
    input:
        manifest=MANIFEST, model=A["seg_model"],
        # the earlier stages' scores are gathered into miou.json, so one target builds all four
        seeds=A["seeds_miou"], refined=A["refined_miou"], pseudo=A["pseudo_miou"], own=A["own_seg_miou"]
    output: metrics=A["miou"], predictions=directory(A["predictions"])
    params: p=P("eval_seg")
    log: chain_log("eval_seg")
    benchmark: chain_benchmark("eval_seg")
    threads: 2
    resources: mem_mb=4000, gpu=gpu
    conda: "../envs/wsss.yaml"
    shell: stage_shell("eval_seg", "--model {input.model} --out {output.metrics} --predictions {output.predictions} --stage-metrics {input.seeds} {input.refined} {input.pseudo} --own-seg {input.own}")
