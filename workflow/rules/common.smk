# Helpers shared by workflow/rules/*.smk - names from params.yaml, wildcard constraints, the
# artifact paths (pipeline.io.paths), the one shell-command builder of the chain stages and the
# one sharding mechanism. Functions live here only (snakemake --lint: rules and functions are
# not mixed in one file).
#
# Jobs run `python -m stages.<stage>`. Without `--sdm conda` that `python` is the interpreter
# running Snakemake (the project venv): its folder goes first on the PATH the jobs inherit.
# With `--sdm conda` each rule's `conda:` environment (workflow/envs/wsss.yaml, the lock's
# versions) is activated in the job and its `python` comes first instead.
import json
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.io import is_flagged

from pipeline.io.config import stage_params
from pipeline.io.paths import artifacts, manifest

envvars: "PATH"

_BIN = os.path.dirname(sys.executable)
if not os.path.isfile(os.path.join(_BIN, "python")):
    raise WorkflowError(f"Snakemake runs under {sys.executable}, but its folder has no `python` "
                        f"for the jobs; run it from the project venv (`make install`, then "
                        f"`.venv/bin/snakemake ...`) or another venv/conda environment.")
os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
DATASETS = sorted(config["datasets"])
METHODS = sorted(config["methods"])
GENERATED = [d for d in DATASETS if config["datasets"][d].get("generate")]
# datasets converted from the official COCO download by the prepare_coco rule (only `coco` by default)
CONVERTED = [d for d in DATASETS if config["datasets"][d].get("classes") == "coco"
             and config["datasets"][d].get("source")]
# run.shards > 1 splits every per-image stage (per_image_stage below: export_seeds,
# refine_seeds, make_pseudo_labels) into that many `<stage>_shard` jobs merged by the main
# rule; outputs are identical to an unsharded run.
SHARDS = int(config.get("run", {}).get("shards", 1) or 1)
# run.gpus G > 1: train_cls and train_seg ask for G GPUs and run under torchrun (one process
# per GPU, data parallel: pipeline/engine/distributed.py); stages._launch picks torchrun or plain
# `python -m` from {resources.gpu}, so the GPU count is not a param (no rerun when it changes).
GPUS = int(config.get("run", {}).get("gpus", 1) or 1)

wildcard_constraints:
    dataset="|".join(DATASETS),
    method="|".join(METHODS),
    shard=r"\d+",


# ------------------------------------------------------------------ paths
# Every artifact of a chain as a wildcard pattern, from the one table the stage CLIs and
# dvc.yaml also follow (pipeline/io/paths.py): A["seeds"] == "results/{dataset}/{method}/seeds.h5".
A = artifacts("{dataset}", "{method}")
MANIFEST = manifest("{dataset}")
# Snakemake-only files of a chain: logs, benchmarks, report figures
REPORT_DIR = "results/{dataset}/{method}/report"
GALLERY_IMAGES = int((config.get("report") or {}).get("gallery_images", 4))
REPORT_FIGURES = ("curves.png", "iou.html", "gallery_train.png", "gallery_val.png")


def chain_log(name):
    return f"results/{{dataset}}/logs/{{method}}/{name}.log"


def chain_benchmark(name):
    return f"results/{{dataset}}/benchmarks/{{method}}/{name}.tsv"


def report_figures(dataset, methods):
    """Every report figure of the chains (dataset, m) for m in methods."""
    return expand(f"{REPORT_DIR}/{{fig}}", dataset=dataset, method=methods, fig=REPORT_FIGURES)


# ------------------------------------------------------------------ params and resources
def P(stage, with_method=True):
    """The rule's params: the stage's merged sub-tree as canonical JSON."""
    def f(w):
        return json.dumps(stage_params(config, w.dataset, w.method if with_method else None, stage),
                          sort_keys=True)
    return f


def gpu(w):
    return 0 if stage_params(config, w.dataset, None, "train_cls").get("device") == "cpu" else 1


def gpus(w):
    return gpu(w) and GPUS


# ------------------------------------------------------------------ inputs
def coco_splits(name):
    """Split files rendered by prepare_coco for a COCO dataset (`classes: coco` + `source`)."""
    d = config["datasets"][name]
    return sorted({f"{d['root']}/{f}" for f in d["splits"].values()})


def dataset_inputs(w):
    """Generated datasets depend on their generator rule, COCO ones on prepare_coco; real VOC
    ones are checked by prepare_dataset."""
    if w.dataset in GENERATED:
        return [f"data/{w.dataset}"]
    return coco_splits(w.dataset) if w.dataset in CONVERTED else []


def teacher_model(w):
    """A method whose train_cls params name a `teacher` (smaf) trains from that method's
    classifier: the DAG edge results/{dataset}/{teacher}/cls/model.pt -> this train_cls.
    The stage reads the same path (pipeline.io.paths.artifacts) from the `teacher` param, so the
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
    return {"manifest": manifest(w.dataset), **({"teacher": t} if t else {})}


# ------------------------------------------------------------------ shell commands
ENV = "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "


def stage_shell(stage, args, env=ENV, launch=False):
    """The command of a chain stage (one (dataset, method)):
    `<env>python -m stages.<stage> --dataset .. --method .. --params-json .. --manifest .. <args>`
    with the log. ``launch``: through stages._launch, which starts torchrun when
    {resources.gpu} > 1. The returned template is the rule's code for Snakemake's rerun
    triggers: keep it byte-identical when refactoring."""
    mod = f"stages._launch {{resources.gpu}} stages.{stage}" if launch else f"stages.{stage}"
    return (f"{env}python -m {mod} --dataset {{wildcards.dataset}} --method {{wildcards.method}}"
            f" --params-json {{params.p:q}} --manifest {{input.manifest}} {args} > {{log}} 2>&1")


# ------------------------------------------------------------------ sharding
def shard_path(path):
    """Where shard {shard} of a per-image artifact goes: results/d/m/seeds.h5 ->
    results/d/m/shards/seeds.{shard}.h5 (a folder stays a folder); temporary."""
    head, name = os.path.split(str(path))
    stem, ext = os.path.splitext(name)
    part = f"{head}/shards/{stem}.{{shard}}{ext}"
    return temp(directory(part) if is_flagged(path, "directory") else part)


def parts(pattern):
    """Shard outputs a merge rule needs ([] when unsharded)."""
    return lambda w: ([pattern.format(dataset=w.dataset, method=w.method, shard=i) for i in range(SHARDS)]
                      if SHARDS > 1 else [])


def per_image_stage(stage, *, input, args, output, opts="", env=ENV, threads=2, mem_mb=4000, gpu=0):
    """Define the rules `stage` and `<stage>_shard` of a stage that maps each image on its own.

    input: the named inputs (``manifest`` + the stage's); args: their command-line options.
    output: the per-image artifact (a path), or {name: path} whose first entry is it and
        whose others become `--<name> {output.<name>}` options of the main rule only.
    opts: options after the outputs (both rules).

    With run.shards = N > 1, `<stage>_shard` jobs each write shard k of N of the per-image
    artifact (`--shard k/N`, shard_path) and the main rule merges them (`--merge`) on the CPU,
    then writes the rest of its outputs (metrics). With N = 1 the main rule does it all and no
    shard job is planned. Sharding another stage is one call in its rule file; its CLI needs
    `--shard k/N` and `--merge` (stages._common.add_shard_args, pipeline/io/shards.py).
    """
    named = output if isinstance(output, dict) else {}
    first = next(iter(named), None)
    out = [f"--out {{output.{first}}}" if first else "--out {output}"]
    out += [f"--{k} {{output.{k}}}" for k in list(named)[1:]]
    tail = f" {opts}" if opts else ""
    part = shard_path(named[first] if first else output)

    rule:
        name: stage
        input: **input, parts=parts(str(part))
        output: *([] if named else [output]), **named
        params: p=P(stage)
        log: chain_log(stage)
        benchmark: chain_benchmark(stage)
        threads: threads
        resources: mem_mb=mem_mb, gpu=0 if SHARDS > 1 else gpu   # shards use the GPU, the merge does not
        conda: "../envs/wsss.yaml"
        shell: stage_shell(stage, f"{args} {' '.join(out)}{tail}" + (" --merge {input.parts}" if SHARDS > 1 else ""), env)

    rule:
        name: f"{stage}_shard"
        input: **input
        output: part
        params: p=P(stage), n=SHARDS
        log: chain_log(f"{stage}.{{shard}}")
        benchmark: chain_benchmark(f"{stage}.{{shard}}")
        threads: threads
        resources: mem_mb=mem_mb, gpu=gpu
        conda: "../envs/wsss.yaml"
        shell: stage_shell(stage, f"{args} --out {{output}}{tail} --shard {{wildcards.shard}}/{{params.n}}", env)


# ------------------------------------------------------------------ misspelt targets
# Without the fallback rules (fallback.smk), `snakemake results/vocc/acr/miou.json` ends in
# Snakemake's generic MissingRuleException. The negative look-aheads make them match only
# unknown names, so they never compete with the real rules; their input function stops DAG
# building with one line.
def _not(names):
    return "(?!(?:" + "|".join(names) + ")/)[^/]+"


def _unknown(w):
    from pipeline.io.config import unknown_target
    method = getattr(w, "bad_method", None)
    dataset = getattr(w, "bad_dataset", None) or w.dataset
    target = f"results/{dataset}/" + (f"{method}/" if method else "") + w.rest
    raise WorkflowError(unknown_target(config, target, dataset, method))
