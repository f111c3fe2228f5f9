"""The rules' conda environment follows the lock, and the workflow passes `snakemake --lint`."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _conda_env_module():
    spec = importlib.util.spec_from_file_location("conda_env", REPO / "requirements" / "conda_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lock_names_versions(text: str) -> dict[str, str]:
    """Brute force: every unindented `name==version \\` line of the lock."""
    out = {}
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.split()[0].rstrip("\\").strip()
    return out


def test_conda_env_pins_exactly_the_lock():
    env = yaml.safe_load((REPO / "workflow" / "envs" / "wsss.yaml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    got = dict(p.lower().split("==") for p in pip)
    want = _lock_names_versions((REPO / "requirements" / "lock.txt").read_text())
    assert len(want) > 100 and "torch" in want
    assert got == want, ("workflow/envs/wsss.yaml differs from requirements/lock.txt: "
                         "run `python requirements/conda_env.py`")


def test_conda_env_generator_reads_pins_and_refuses_a_non_lock(tmp_path):
    mod = _conda_env_module()
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\nfoo-bar==1.2.3 \\\n    --hash=sha256:00\n    # via x\n"
                    "baz[extra]==0.1; python_version >= '3'\n")
    assert mod.lock_pins(lock) == ["foo-bar==1.2.3", "baz[extra]==0.1"]
    text = mod.env_yaml(mod.lock_pins(lock))
    assert yaml.safe_load(text)["dependencies"][2] == {"pip": ["foo-bar==1.2.3", "baz[extra]==0.1"]}
    lock.write_text("numpy>=1\n")
    try:
        mod.lock_pins(lock)
    except ValueError as e:
        assert "make lock" in str(e)
    else:
        raise AssertionError("a file without pins was accepted")


def test_every_shell_rule_names_the_conda_env_and_lint_is_clean():
    """`snakemake --lint` reports nothing (it would flag a rule without `conda:` or a shell
    command reading a global such as the interpreter path)."""
    r = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "--lint"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Lints for" not in out, out[-3000:]
    for f in (REPO / "workflow" / "rules").glob("*.smk"):
        lines = f.read_text().splitlines()
        shells = [i for i, l in enumerate(lines) if l.strip().startswith("shell:")]
        for i in shells:
            assert lines[i - 1].strip() == 'conda: "../envs/wsss.yaml"', f"{f.name}:{i + 1}"
