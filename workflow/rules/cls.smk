# The classifier of a chain and the seeds (CAM-like maps) exported from it.


rule train_cls:
    # a method with a `teacher` (smaf) also needs that method's classifier (cls_inputs)
    input: unpack(cls_inputs)
    output: model=A["cls_model"], metrics=A["cls_metrics"]
    params: p=P("train_cls")
    log: chain_log("train_cls")
    benchmark: chain_benchmark("train_cls")
    threads: 2
    resources: mem_mb=8000, gpu=gpus
    conda: "../envs/wsss.yaml"
    shell: stage_shell("train_cls", "--out {output.model} --metrics {output.metrics}", launch=True)


# rules export_seeds + export_seeds_shard (common.smk: per_image_stage)
per_image_stage("export_seeds", input={"manifest": MANIFEST, "model": A["cls_model"]},
                args="--model {input.model}", output=A["seeds"], gpu=gpu)


rule eval_seeds:
    input: manifest=MANIFEST, seeds=A["seeds"]
    output: A["seeds_miou"]
    params: p=P("eval_seeds")
    log: chain_log("eval_seeds")
    benchmark: chain_benchmark("eval_seeds")
    threads: 1
    resources: mem_mb=2000, gpu=0
    conda: "../envs/wsss.yaml"
    shell: stage_shell("eval_seeds", "--seeds {input.seeds} --out {output}")
