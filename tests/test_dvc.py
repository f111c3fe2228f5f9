"""DVC reproduces the same DAG as the Snakefile (issue: DVC tracks every intermediate artifact).

Each test works on a throw-away copy of the working tree made into a git repository (what a
fresh clone is), with the tiny settings of tests/test_dag.py and `run` = demo x cam, so one
chain takes about a minute on 2 cores.
"""
import ast
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.io.config import deep_merge
from tests.conftest import REPO, TINY, copy_demo_chains, snakemake

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
       "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "OMP_NUM_THREADS": "1"}
CHAIN = ["make_dataset@demo", "prepare_dataset@demo"] + [
    f"{s}@demo-cam" for s in ("train_cls", "export_seeds", "eval_seeds", "train_affinity",
                              "refine_seeds", "make_pseudo_labels", "train_seg", "eval_own_seg",
                              "eval_seg")]


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 1200) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, check=check)


def fresh_clone(dest: Path, tiny: bool = True) -> Path:
    """Copy the files git would clone (tracked + untracked-but-not-ignored) into a new repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        if f.startswith("results/"):
            continue  # local run outputs a clone would not have
        src, dst = REPO / f, dest / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)
    if tiny:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        params = deep_merge(params, TINY)
        params["run"] = {"datasets": ["demo"], "methods": ["cam"]}
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "clone"], dest)
    return dest


def ran_stages(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifact_hashes(d: Path) -> dict[str, str]:
    r = d / "results/demo/cam"
    out = {"seeds.h5": sha(r / "seeds.h5")}
    out.update({f"pseudo/{p.name}": sha(p) for p in sorted((r / "pseudo").glob("*.png"))})
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    d = fresh_clone(tmp_path_factory.mktemp("dvc") / "clone")
    r = dvc(d, "repro")
    assert ran_stages(r.stdout) == set(CHAIN), r.stdout
    return d


@pytest.mark.slow
def test_repro_on_fresh_clone_builds_demo_chain_and_status_is_clean(repo):
    assert (repo / "results/demo/cam/miou.json").is_file()
    assert len(list((repo / "results/demo/cam/pseudo").glob("*.png"))) == 24
    assert "up to date" in dvc(repo, "status").stdout
    # the lock records exactly the declared params of a stage, not the whole file
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    params = lock["stages"]["make_pseudo_labels@demo-cam"]["params"]["params.yaml"]
    assert set(params) == {"seed", "datasets.demo", "profiles.demo.make_pseudo_labels",
                           "methods.cam.make_pseudo_labels"}
    # metrics and plots give the cross-stage view
    m = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    files = next(iter(m.values()))["data"]
    assert {"results/demo/cam/miou.json", "results/demo/cam/seeds_miou.json"} <= set(files)
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert "results/demo/cam/cls/metrics.json" in plots["data"]


@pytest.mark.slow
def test_crf_edit_reruns_only_pseudo_labels_and_descendants(repo):
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first repro"], repo)
    p = repo / "params.yaml"
    original = p.read_text()
    params = yaml.safe_load(original)
    params["profiles"]["demo"]["make_pseudo_labels"]["crf"]["bilateral_srgb"] += 5
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = set(json.loads(dvc(repo, "status", "--json").stdout))
        assert changed == {"make_pseudo_labels@demo-cam"}
        r = dvc(repo, "repro")
        descendants = {"make_pseudo_labels@demo-cam", "train_seg@demo-cam", "eval_seg@demo-cam"}
        ran = ran_stages(r.stdout)
        assert "make_pseudo_labels@demo-cam" in ran and ran <= descendants, r.stdout
        for st in set(CHAIN) - descendants:
            assert f"Stage '{st}' didn't change, skipping" in r.stdout
        diff = json.loads(dvc(repo, "params", "diff", "--json").stdout)
        assert set(diff["params.yaml"]) == {"profiles.demo.make_pseudo_labels.crf.bilateral_srgb"}
    finally:
        p.write_text(original)
        dvc(repo, "repro")  # back to the committed state (restored from the run cache)
    assert "up to date" in dvc(repo, "status").stdout


@pytest.mark.slow
def test_exp_run_with_set_param_is_listed(repo):
    r = dvc(repo, "exp", "run", "-S", "profiles.demo.eval_seg.flip=true", "-n", "withflip")
    assert ran_stages(r.stdout) == {"eval_seg@demo-cam"}, r.stdout
    shown = dvc(repo, "exp", "show", "--json").stdout
    assert "withflip" in shown
    exps = json.loads(shown)
    found = [e for b in exps for e in (b.get("experiments") or [])
             if any(rev.get("name") == "withflip" for rev in e.get("revs", []))]
    assert found, shown[:2000]
    dvc(repo, "exp", "apply", "withflip")
    assert yaml.safe_load((repo / "params.yaml").read_text())["profiles"]["demo"]["eval_seg"]["flip"] is True
    run(["git", "checkout", "--", "params.yaml"], repo)
    dvc(repo, "checkout")


@pytest.mark.slow
def test_remote_round_trip_is_byte_identical(repo, tmp_path):
    before = artifact_hashes(repo)
    dvc(repo, "remote", "modify", "--local", "local", "url", str(tmp_path / "remote"))
    dvc(repo, "push")
    shutil.rmtree(repo / "results")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull")
    assert artifact_hashes(repo) == before


@pytest.mark.slow
def test_snakemake_result_is_adopted_by_dvc_without_recomputation(tiny_dag, tmp_path):
    d = fresh_clone(tmp_path / "clone")
    # the Snakemake-built demo/cam chain of the session's tiny build (same TINY params as
    # this clone; mtimes kept) instead of building it again here
    copy_demo_chains(tiny_dag, d, ("cam",), workdir_files=False)
    plan = run([sys.executable, "-m", "snakemake", "-n", "results/demo/cam/miou.json"], d).stdout
    assert "Nothing to be done" in plan, plan[-2000:]       # complete and up to date for Snakemake
    model = d / "results/demo/cam/seg/model.pt"
    before = sha(model)
    r = dvc(d, "status", "--json")
    assert json.loads(r.stdout)  # nothing recorded yet
    dvc(d, "commit", "-f")
    assert "up to date" in dvc(d, "status").stdout
    r = dvc(d, "repro")
    assert ran_stages(r.stdout) == set(), r.stdout
    assert sha(model) == before  # dvc commit moved it into the cache; same bytes


# ------------------------------------------------------------------ Snakefile == dvc.yaml


def snakemake_graph(d: Path, target: str) -> tuple[set, set]:
    """(nodes, edges) of the Snakemake job graph of one chain; node = (rule, frozenset(outputs)).

    Edges come from ``--dag dot``; output files per rule from ``--detailed-summary`` (one
    (dataset, method) chain has one job per rule, checked via the log files).
    """
    rows = [line.split("\t") for line in snakemake(d, "-D", target).stdout.splitlines()
            if "\t" in line]
    head, outs, logs = rows[0], {}, {}
    for row in rows[1:]:
        rec = dict(zip(head, row))
        outs.setdefault(rec["rule"], set()).add(rec["output_file"].rstrip("/"))
        logs.setdefault(rec["rule"], set()).add(rec["log-file(s)"])
    assert all(len(v) == 1 for v in logs.values()), logs
    dot = snakemake(d, "--dag", "dot", "--", target).stdout
    rule_of = {m[0]: m[1] for m in re.findall(r'^\s*(\d+)\[label = "([A-Za-z_]+)', dot, re.M)}
    node = {i: (r, frozenset(outs[r])) for i, r in rule_of.items()}
    edges = {(node[a], node[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)}
    return set(node.values()), edges


def dvc_graph(d: Path, target_stage: str) -> tuple[set, set]:
    from dvc.repo import Repo
    with Repo(str(d)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        jobs = {name: {"rule": name.split("@")[0],
                       "outs": {str(o.def_path).rstrip("/") for o in s.outs},
                       "ins": {str(x.def_path).rstrip("/") for x in s.deps}}
                for name, s in stages.items()}
    # restrict to the ancestors of the target, as Snakemake does for a target file
    producer = {o: n for n, j in jobs.items() for o in j["outs"]}
    keep, todo = set(), [target_stage]
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo += [producer[i] for i in jobs[n]["ins"] if i in producer]
    return graph(jobs[n] for n in keep)


def graph(jobs) -> tuple[set, set]:
    jobs = list(jobs)
    node = {id(j): (j["rule"], frozenset(j["outs"])) for j in jobs}
    producer = {o: node[id(j)] for j in jobs for o in j["outs"]}
    edges = {(producer[i], node[id(j)]) for j in jobs for i in j["ins"] if i in producer}
    return set(node.values()), edges


@pytest.mark.parametrize("dataset,method", [("demo", "acr"), ("demo", "cam"), ("vocsample", "acr")])
def test_snakefile_and_dvc_have_the_same_dag(tmp_path, dataset, method):
    d = fresh_clone(tmp_path / "clone", tiny=False)
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["run"] = {"datasets": [dataset], "methods": [method]}
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    s_nodes, s_edges = snakemake_graph(d, f"results/{dataset}/{method}/miou.json")
    d_nodes, d_edges = dvc_graph(d, f"eval_seg@{dataset}-{method}")
    assert len(s_nodes) >= 9
    assert s_nodes == d_nodes
    assert s_edges == d_edges


# ------------------------------------------------------------------ dvc.yaml code deps == imports

CODE_DIRS = ("pipeline", "stages")  # the project's own code: what a stage's code deps must cover


def module_file(name: str) -> Path | None:
    """The repo file of module ``name`` (``a/b.py`` or ``a/b/__init__.py``); None if not ours."""
    if name.split(".")[0] not in CODE_DIRS:
        return None
    p = REPO.joinpath(*name.split("."))
    return next((f for f in (p.with_suffix(".py"), p / "__init__.py") if f.is_file()), None)


@functools.cache
def direct_imports(mod: str, f: Path) -> list[str]:
    """Module names file ``f`` (module ``mod``) imports, anywhere in it: for
    ``from a import c`` both ``a`` and ``a.c`` (``c`` may be a submodule)."""
    package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def project_imports(module: str) -> set[Path]:
    """Repo files that running ``python -m module`` may execute, found statically with `ast`.

    An import is every ``import a.b`` / ``from a.b import c`` anywhere in a file (module level
    or inside a function, e.g. lazy or error-path imports), relative ones (``from ..x import y``)
    resolved against the file's package; ``c`` counts too when it is a submodule. Importing
    ``a.b`` also runs the package files ``a/__init__.py``, so those count; plug-ins reached
    through a registry count because the registry (pipeline/methods/__init__.py) imports each
    of them. Followed transitively, restricted to ``pipeline/`` and ``stages/``.
    """
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # a.b.c runs a/__init__, a/b/__init__, a/b/c
            mod = ".".join(parts[:i])
            if mod not in seen and (f := module_file(mod)):
                seen[mod] = f
                todo += direct_imports(mod, f)
    return set(seen.values())


def dvc_code_deps() -> dict[str, tuple[str, list[str]]]:
    """stage name -> (module its ``cmd`` runs, its deps inside pipeline/ or stages/)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        st = st.get("do", st)  # foreach stages nest their definition under `do`
        module = re.search(r"python -m (\S+)", st["cmd"])[1]
        out[name] = (module, [d for d in st["deps"] if d.split("/")[0] in CODE_DIRS])
    return out


def under(f: str, dep: str) -> bool:
    """Dep ``dep`` (a file or a directory) covers repo file ``f``."""
    return f == dep or f.startswith(dep.rstrip("/") + "/")


def test_dvc_code_deps_cover_the_stage_imports():
    """Each stage's `deps` cover every project file its code imports (an edit reruns it).

    Empty files (the bare package ``__init__.py``) are exempt: they run no code. Code deps
    that no import reaches fail too (an edit of them would rerun the stage for nothing).
    """
    missing, stale = {}, {}
    for stage, (module, deps) in dvc_code_deps().items():
        used = {f.relative_to(REPO).as_posix() for f in project_imports(module) if f.read_text().strip()}
        missing[stage] = sorted(f for f in used if not any(under(f, d) for d in deps))
        stale[stage] = [d for d in deps if not any(under(f, d) for f in used)]
    lines = [f"  {s} lacks (imported, not in deps): {', '.join(fs)}" for s, fs in missing.items() if fs]
    lines += [f"  {s} lists (never imported): {', '.join(fs)}" for s, fs in stale.items() if fs]
    assert not lines, "dvc.yaml code deps differ from the stage imports:\n" + "\n".join(lines)
