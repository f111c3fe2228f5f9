"""End-to-end runs of the Snakemake DAG on tiny settings (demo and the real VOC sample),
rerun selectivity after a params edit, and the fail-fast message without VOC data."""
import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO, copy_snakefile, snakemake


@pytest.fixture(scope="module")
def workdir(tiny_dag):
    """The session's tiny build of every demo chain + vocsample/acr (tests/conftest.py); each
    test below re-requests its targets (nothing to do, or the failing rule's log)."""
    return tiny_dag


def check_chain(d: Path, dataset: str, method: str):
    r = d / "results" / dataset / method
    man = json.loads((d / "results" / dataset / "dataset.json").read_text())
    for name in ("seeds_miou", "refined_miou", "pseudo_miou", "miou"):
        m = json.loads((r / f"{name}.json").read_text())
        assert 0.0 <= m["miou"] <= 1.0 and m["num_images"] > 0
    final = json.loads((r / "miou.json").read_text())
    own = json.loads((r / "own_seg_miou.json").read_text())
    expected = {"seeds", "refined", "pseudo", "segmentation"}
    if own["miou"] is None:           # no segmentation head (acr, cam)
        assert own["note"] == f"method {method} has no segmentation head"
    else:                             # single-stage methods (afa, mcc)
        assert 0.0 <= own["miou"] <= 1.0 and own["num_images"] == len(man["splits"]["val"])
        assert final["stages"]["own_segmentation"] == own["miou"]
        expected.add("own_segmentation")
    assert set(final["stages"]) == expected
    assert final["num_images"] == len(man["splits"]["val"])
    assert "aeroplane" in final["iou"] and final["params"]["scales"]
    with h5py.File(r / "seeds.h5") as f:
        assert sorted(f.keys()) == sorted(set(man["splits"]["train"]))
        iid = man["splits"]["train"][0]
        g = f[iid]
        assert g["cams"].dtype == np.float16
        assert list(g["class_ids"][()]) == man["labels"][iid]
        assert tuple(g["image_size"][()]) == g["cams"].shape[1:]
    pngs = sorted((r / "pseudo").glob("*.png"))
    assert len(pngs) == len(set(man["splits"]["train"]))
    lab = np.asarray(Image.open(pngs[0]))
    assert Image.open(pngs[0]).mode == "P" and set(np.unique(lab)) <= set(range(21))
    assert len(list((r / "predictions").glob("*.png"))) == len(man["splits"]["val"])


@pytest.mark.slow
def test_demo_chain_acr_and_cam(workdir):
    snakemake(workdir, "results/demo/acr/miou.json", "results/demo/cam/miou.json")
    check_chain(workdir, "demo", "acr")
    check_chain(workdir, "demo", "cam")
    with h5py.File(workdir / "results/demo/acr/seeds.h5") as f:
        assert {"cams", "cams_star"} <= set(f[next(iter(f.keys()))].keys())
    # everything is up to date now
    r = snakemake(workdir, "-n", "results/demo/acr/miou.json")
    assert "Nothing to be done" in r.stdout + r.stderr


@pytest.mark.slow
def test_demo_chain_mcc(workdir):
    """MCC (single-stage network) through the same DAG: final + aux CAM seeds stored."""
    snakemake(workdir, "results/demo/mcc/miou.json")
    check_chain(workdir, "demo", "mcc")
    with h5py.File(workdir / "results/demo/mcc/seeds.h5") as f:
        assert {"cams", "cams_aux"} <= set(f[next(iter(f.keys()))].keys())
    curve = json.loads((workdir / "results/demo/mcc/cls/metrics.json").read_text())["curve"]
    assert {"cls", "cls_aux", "aff", "mcc", "seg"} <= set(curve[-1])
    assert curve[-1]["seg"] > 0        # the decoder loss is on after seg_start_iter


@pytest.mark.slow
def test_demo_chain_vitpcm_and_smaf(workdir):
    """ViT-PCM and SMAF run the same DAG; SMAF's train_cls depends on the cam classifier."""
    r = snakemake(workdir, "-n", "results/demo/smaf/cls/model.pt")
    if not (workdir / "results/demo/cam/cls/model.pt").exists():
        assert "results/demo/cam/cls/model.pt" in r.stdout + r.stderr   # the teacher edge
    snakemake(workdir, "results/demo/vitpcm/miou.json", "results/demo/smaf/miou.json")
    check_chain(workdir, "demo", "vitpcm")
    check_chain(workdir, "demo", "smaf")
    with h5py.File(workdir / "results/demo/vitpcm/seeds.h5") as f:
        g = f[next(iter(f.keys()))]
        assert {"cams", "bpm_bg", "bpm_fg", "probs"} <= set(g.keys())
        assert float(np.asarray(g["cams"]).max()) <= 1.0
    seeds = json.loads((workdir / "results/demo/vitpcm/seeds_miou.json").read_text())
    assert seeds["bg_threshold"] == 0.5 and "probs" in seeds["other_keys"]
    assert "bpm_fg" not in seeds["other_keys"]          # stored for the CRF, not a seed
    # official ViT-PCM: pseudo labels from the BPM + CRF (the refined maps are still scored)
    pseudo = json.loads((workdir / "results/demo/vitpcm/pseudo_miou.json").read_text())
    assert pseudo["params"]["source"] == "seeds" and pseudo["timing"]["source"] == "seeds"
    curve = json.loads((workdir / "results/demo/smaf/cls/metrics.json").read_text())["curve"]
    assert {"cls", "mac"} <= set(curve[-1])
    # a teacher edit reruns the student; an acr edit leaves both chains alone
    p = workdir / "params.yaml"
    original = p.read_text()
    params = yaml.safe_load(original)
    try:
        params["methods"]["acr"]["train_cls"]["beta"] = 0.5
        p.write_text(yaml.safe_dump(params, sort_keys=False))
        r = snakemake(workdir, "-n", "results/demo/smaf/miou.json", "results/demo/vitpcm/miou.json")
        assert "Nothing to be done" in r.stdout + r.stderr
        params["methods"]["cam"]["train_cls"]["head"] = "gap"
        p.write_text(yaml.safe_dump(params, sort_keys=False))
        r = snakemake(workdir, "-n", "results/demo/smaf/miou.json")
        out = r.stdout + r.stderr
        assert "results/demo/cam/cls/model.pt" in out and "results/demo/smaf/cls/model.pt" in out
    finally:
        p.write_text(original)


@pytest.mark.slow
def test_demo_chain_afa(workdir):
    """AFA (single-stage network) through the same DAG: CAM + propagated CAM seeds stored,
    all three training phases (cls warm-up, refined labels, propagated labels) run."""
    snakemake(workdir, "results/demo/afa/miou.json")
    check_chain(workdir, "demo", "afa")
    with h5py.File(workdir / "results/demo/afa/seeds.h5") as f:
        assert {"cams", "cams_aff"} <= set(f[next(iter(f.keys()))].keys())
    curve = json.loads((workdir / "results/demo/afa/cls/metrics.json").read_text())["curve"]
    assert {"cls", "seg", "aff", "reg", "prop"} <= set(curve[-1])
    assert curve[0]["seg"] == 0 and curve[-1]["seg"] > 0 and curve[-1]["aff"] > 0
    assert curve[-1]["prop"] > 0      # the last window trains on propagated labels


def planned_jobs(out: str) -> set[str]:
    jobs, in_table = set(), False
    for line in out.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if not parts or parts[0] == "total":
                break
            if not parts[0].startswith("-"):
                jobs.add(parts[0])
    return jobs


@pytest.mark.slow
def test_crf_edit_reruns_only_descendants(workdir):
    if not (workdir / "results/demo/acr/miou.json").exists():
        snakemake(workdir, "results/demo/acr/miou.json")
    p = workdir / "params.yaml"
    original = p.read_text()
    params = yaml.safe_load(original)
    params["profiles"]["demo"]["make_pseudo_labels"]["crf"]["bilateral_srgb"] += 1
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        r = snakemake(workdir, "-n", "results/demo/acr/miou.json")
        assert planned_jobs(r.stdout + r.stderr) == {"make_pseudo_labels", "train_seg", "eval_seg"}
        # an ACR-only edit does not touch the cam chain
        params["methods"]["acr"]["train_cls"]["alpha"] = 0.5
        p.write_text(yaml.safe_dump(params, sort_keys=False))
        r = snakemake(workdir, "-n", "results/demo/cam/miou.json")
        assert planned_jobs(r.stdout + r.stderr) == {"make_pseudo_labels", "train_seg", "eval_seg"}
    finally:
        p.write_text(original)


@pytest.mark.slow
def test_vocsample_chain_on_real_images(workdir, vocsample_root):
    snakemake(workdir, "results/vocsample/acr/miou.json")
    check_chain(workdir, "vocsample", "acr")
    man = json.loads((workdir / "results/vocsample/dataset.json").read_text())
    assert man["counts"] == {"train": 46, "eval_train": 46, "val": 54}


def test_voc_without_data_fails_fast_and_clearly(tmp_path):
    copy_snakefile(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    t0 = time.time()
    r = snakemake(tmp_path, "results/voc/acr/miou.json", check=False)
    elapsed = time.time() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "expected layout" in out and "download_voc" in out and "data/voc/VOCdevkit/VOC2012" in out
    assert "Traceback" not in out
    assert elapsed < 60
    assert not (tmp_path / "results/voc/acr").exists()
