"""Fault injection: SIGKILL mid-stage, a full disk, and run-to-run determinism."""
import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml

from tests.conftest import copy_demo_cam, make_workdir, snakemake
from tests.test_shards import h5_content

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def built(tiny_dag, tmp_path_factory) -> Path:
    """A copy of the session's tiny demo/cam chain (the kill tests below modify it)."""
    return copy_demo_cam(tiny_dag, tmp_path_factory.mktemp("rel") / "a")


def digest(p: Path) -> str:
    if p.is_dir():
        return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes()
                                       for f in sorted(p.glob("*")))).hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()


def stage_cmd(stage: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}", "--dataset", "demo", "--method", "cam", *extra]


@pytest.mark.slow
def test_two_runs_give_identical_seeds_and_pseudo_labels(built, tmp_path):
    """Same seed and params, a second CPU run from scratch: identical seeds.h5 datasets and
    pseudo-label PNGs (runs before the kill tests below modify `built`)."""
    other = make_workdir(tmp_path / "b")
    snakemake(other, "results/demo/cam/pseudo_miou.json")
    a, b = built / "results/demo/cam", other / "results/demo/cam"
    assert digest(a / "cls/model.pt") == digest(b / "cls/model.pt")
    assert h5_content(a / "seeds.h5") == h5_content(b / "seeds.h5")
    assert h5_content(a / "refined.h5") == h5_content(b / "refined.h5")
    assert digest(a / "pseudo") == digest(b / "pseudo")


KILLS = {
    # stage: its artifact, the temporary it writes first (None: a training, killed after 12 s)
    "export_seeds": ("results/demo/cam/seeds.h5", "results/demo/cam/seeds.h5.tmp"),
    "refine_seeds": ("results/demo/cam/refined.h5", "results/demo/cam/refined.h5.tmp"),
    "make_pseudo_labels": ("results/demo/cam/pseudo", "results/demo/cam/pseudo.tmp"),
    "train_cls": ("results/demo/cam/cls/model.pt", None),
    "train_affinity": ("results/demo/cam/affinity/model.pt", None),
    "train_seg": ("results/demo/cam/seg/model.pt", None),   # none before: "none" after the kill
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(KILLS))
def test_sigkill_leaves_old_artifact_and_rerun_completes(built, stage):
    art, tmp = KILLS[stage]
    art = built / art
    before = digest(art) if art.exists() else None
    # make the rerun produce something different (and slower) so a partial write would show
    params = yaml.safe_load((built / "params.yaml").read_text())
    prof = params["profiles"]["demo"]
    if tmp is None:
        prof[stage]["iters"] = 10**6   # never done when killed
    (built / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen(stage_cmd(stage, []), cwd=built, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120:
        if tmp and (built / tmp).exists() and (not (built / tmp).is_dir() or any((built / tmp).iterdir())):
            break
        if not tmp and time.time() - t0 > 12:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "stage finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the old complete artifact untouched, or still none
    assert (digest(art) if art.exists() else None) == before
    # a rerun (by hand, as DVC or Snakemake would) ignores the stale temporary and completes
    if tmp is None:
        prof[stage]["iters"] = 6
        (built / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run(stage_cmd(stage, []), cwd=built, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not tmp or not (built / tmp).exists()
    if stage in ("export_seeds", "refine_seeds"):
        with h5py.File(art) as f:
            assert len(f.keys()) == 24
    if stage == "make_pseudo_labels":
        assert len(list(art.glob("*.png"))) == 24
    if tmp is None:
        import torch
        assert torch.load(art, weights_only=False)["params"]["iters"] == 6
        assert not list(art.parent.glob("*.tmp"))


@pytest.mark.slow
def test_full_disk_gives_clear_error_and_no_partial_artifact(built, tmp_path):
    out = tmp_path / "seeds.h5"

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_200_000, 1_200_000))

    r = subprocess.run(stage_cmd("export_seeds", ["--out", str(out)]), cwd=built, env=ENV,
                       capture_output=True, text=True, timeout=600, preexec_fn=small_disk)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "disk full" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not Path(str(out) + ".tmp").exists()


