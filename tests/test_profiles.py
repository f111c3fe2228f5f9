"""Snakemake profiles: the cluster profile plans the same jobs as a local run."""
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, copy_snakefile


def dry_run(tmp_path, *args):
    copy_snakefile(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles", dirs_exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", *args,
                        "results/demo/acr/miou.json"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def job_counts(out: str) -> dict[str, int]:
    table = out.split("Job stats:")[1].split("total")[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_profile_dry_run_plans_the_whole_chain(tmp_path, profile):
    pytest.importorskip("snakemake_executor_plugin_slurm") if profile == "slurm" else None
    out = dry_run(tmp_path, "--profile", f"profiles/{profile}")
    plain = job_counts(dry_run(tmp_path, "--cores", "2"))
    assert job_counts(out) == plain
    assert plain["make_dataset"] == 1 and plain["eval_seg"] == 1 and len(plain) >= 10


def test_slurm_profile_maps_gpu_rules_to_a_gpu_partition():
    import yaml
    prof = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert prof["executor"] == "slurm"
    gpu_rules = {"train_cls", "export_seeds", "train_affinity", "refine_seeds", "train_seg", "eval_seg"}
    assert {r for r, v in prof["set-resources"].items() if v.get("slurm_partition") == "gpu"} == gpu_rules
