# The WSSS DAG. Every (dataset, method) chain:
#   [make_dataset] -> prepare_dataset -> train_cls -> export_seeds -> eval_seeds
#   -> train_affinity -> refine_seeds -> make_pseudo_labels -> train_seg -> eval_seg
#   (+ train_cls -> eval_own_seg -> eval_seg: a single-stage method's own segmentation head)
# Each rule's `params:` is exactly the params.yaml sub-tree its stage reads
# (pipeline.io.config.stage_params), so editing one value reruns only that rule and its
# descendants. Stages are thin CLIs (`python -m stages.<name>`), runnable by hand and by DVC.
#
# Layout (snakemake-workflows standard): this entry point validates params.yaml and includes
# workflow/rules/common.smk (helpers, wildcard constraints, paths from pipeline/io/paths.py, the
# shell-command builder, sharding) and one rule file per step.
from snakemake.utils import validate

from pipeline.io.config import check_complete, resolve_profiles
from pipeline.io.config import validate as validate_keys

configfile: "params.yaml"
report: "report/workflow.rst"   # the landing page of `snakemake --report report.html`
validate_keys(config)   # misspelt keys stop here, named with the closest valid key, before any job runs
validate(config, "workflow/schemas/config.schema.yaml")   # structure and types (JSON Schema)
check_complete(config)   # as written: every profile lists every stage (DVC params)
config.update(resolve_profiles(config))   # `profiles.<d>.inherit: <parent>`, as load_params does


include: "workflow/rules/common.smk"


rule all:
    input:
        expand(A["miou"], dataset=config["run"]["datasets"], method=config["run"]["methods"]),
        [report_figures(d, config["run"]["methods"]) for d in config["run"]["datasets"]]


include: "workflow/rules/data.smk"       # download_voc, download_coco, prepare_coco, make_dataset, prepare_dataset
include: "workflow/rules/cls.smk"        # train_cls, export_seeds(_shard), eval_seeds
include: "workflow/rules/refine.smk"     # train_affinity, refine_seeds(_shard), make_pseudo_labels(_shard)
include: "workflow/rules/seg.smk"        # train_seg, eval_own_seg, eval_seg
include: "workflow/rules/report.smk"     # compare, report_figures, report_comparison
include: "workflow/rules/fallback.smk"   # unknown_dataset, unknown_method (misspelt targets)
