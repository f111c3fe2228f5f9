# Misspelt targets: `snakemake results/vocc/acr/miou.json` names the unknown part and the
# closest valid name instead of Snakemake's generic MissingRuleException (common.smk: _not,
# _unknown). No log: they never run (their input function stops DAG building).


rule unknown_dataset:
    input: _unknown
    output: "results/{bad_dataset}/{rest}"
    wildcard_constraints: bad_dataset=_not(DATASETS + ["bench"]), rest=".+"


rule unknown_method:
    input: _unknown
    output: "results/{dataset}/{bad_method}/{rest}"
    wildcard_constraints: bad_method=_not(METHODS + ["logs", "benchmarks", "report"]), rest=".+"
