"""The mistakes a new user makes, each answered by one actionable line (issue 7).

Covered here: VOC/SBD partially extracted, pretrained weights unreachable offline (local file
missing, hub unreachable), CUDA requested without a GPU, an unknown method or dataset in a
Snakemake target or a stage CLI. Elsewhere: VOC missing entirely
(test_dag::test_voc_without_data_fails_fast_and_clearly), misspelt params.yaml keys
(test_config), missing/truncated images and masks (test_bad_inputs), COCO missing (test_coco).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.io.config import load_params, stage_params
from pipeline.data.prepare import build_manifest
from tests.conftest import REPO, copy_snakefile
from tests.test_bad_inputs import make_voc


def run_stage(args, tmp_path, **env):
    e = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=e)


def run_stage_inprocess(args, tmp_path, monkeypatch, capsys):
    """``python -m stages.<name> ARGS`` in this process (no 5 s torch/timm import per call):
    the stage's ``run_cli`` must end in exit code 2; returns (captured stderr, exit code)."""
    import importlib

    from stages._common import run_cli
    name = args[0].split(".", 1)[1]
    mod = importlib.import_module(args[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"stages/{name}.py", *args[1:]])
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        run_cli(name, mod.main)
    return subprocess.CompletedProcess(args, ei.value.code, "", capsys.readouterr().err)


def one_line_error(r, stage):
    """The stage failed with exit 2 and a single ERROR line, no traceback; returns that line."""
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"ERROR [{stage}]:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


# ------------------------------------------------------------------ VOC / SBD partially extracted
def test_voc_without_sbd_names_the_missing_parts_and_the_fix(tmp_path):
    """VOC 2012 extracted, SBD not: SegmentationClassAug and train_aug.txt are missing."""
    voc = tmp_path / "data/voc/VOCdevkit/VOC2012"
    data, _ = make_voc(voc)
    (voc / "ImageSets/Segmentation/val.txt").write_text("im0\n")
    cfg = load_params(REPO / "params.yaml")
    p = stage_params(cfg, "voc", None, "prepare_dataset")
    p["data"]["root"] = str(voc)
    out = tmp_path / "dataset.json"
    r = run_stage(["stages.prepare_dataset", "--dataset", "voc", "--params-json", json.dumps(p),
                   "--out", str(out)], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr
    assert str(voc / "SegmentationClassAug") in err
    assert str(voc / "ImageSets/SegmentationAug/train_aug.txt") in err
    assert "download_voc" in err and "SBD augmentation is not" in err   # the diagnosis and the fix
    assert str(voc / "ImageSets/Segmentation/train.txt") not in err.split("\n")[1]  # present: not listed
    assert not out.exists() and not list(tmp_path.glob("dataset.json*"))


# ------------------------------------------------------------------ stage CLIs: weights, CUDA, names
@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    data, _ = make_voc(d / "ds", n=2, size=(32, 32))
    m = build_manifest(data, log=lambda s: None)
    (d / "dataset.json").write_text(json.dumps(m))
    return d / "dataset.json"


def train_cls_args(tmp_path, manifest, **over):
    p = stage_params(load_params(REPO / "params.yaml"), "demo", "cam", "train_cls")
    for k, v in over.items():
        if isinstance(v, dict):
            p[k] = {**p[k], **v}
        else:
            p[k] = v
    return ["stages.train_cls", "--dataset", "demo", "--method", "cam", "--params-json", json.dumps(p),
            "--manifest", str(manifest), "--out", str(tmp_path / "cls/model.pt"),
            "--metrics", str(tmp_path / "cls/metrics.json")]


def test_missing_local_weights_file_is_named(tmp_path, tiny_manifest, monkeypatch, capsys):
    r = run_stage_inprocess(train_cls_args(tmp_path, tiny_manifest,
                                           backbone={"pretrained": "data/weights/vit.pth"}),
                            tmp_path, monkeypatch, capsys)
    line = one_line_error(r, "train_cls")
    assert "data/weights/vit.pth" in line and "does not exist" in line and "pretrained" in line
    assert not (tmp_path / "cls").exists() or not any((tmp_path / "cls").iterdir())


def test_hub_weights_offline_say_which_file_to_place_where(tmp_path, monkeypatch):
    """No route to the hub and an empty cache: fails at once, naming the hub repository and
    file, a local path and the params value to set (checked in-process: a stage turns the
    same WeightsError into its one-line message, as the local-file test above shows)."""
    import huggingface_hub.constants as hf
    import timm

    from pipeline.models import backbones
    monkeypatch.setattr(backbones, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(backbones.WeightsError) as ei:
        backbones.create_backbone("vit_tiny_patch16_224", "hub")
    msg = str(ei.value)
    repo = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    assert f"`{repo}`" in msg and "model.safetensors" in msg
    assert "data/weights/vit_tiny_patch16_224.safetensors" in msg
    assert "pretrained: data/weights/vit_tiny_patch16_224.safetensors" in msg
    assert hf.HF_HUB_OFFLINE is False or os.environ.get("HF_HUB_OFFLINE")  # restored


def test_hub_reachability_probe_reads_the_endpoint():
    from pipeline.models.backbones import _hub_reachable
    assert _hub_reachable("http://127.0.0.1:9", timeout=1.0) is False   # discard port: closed


def test_cuda_requested_without_gpu(tmp_path, tiny_manifest, monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # also on a GPU machine
    r = run_stage_inprocess(train_cls_args(tmp_path, tiny_manifest, device="cuda"), tmp_path,
                            monkeypatch, capsys)
    line = one_line_error(r, "train_cls")
    assert "cuda" in line and "device: cpu" in line and "params.yaml" in line


def test_unknown_method_in_stage_cli_suggests_the_closest(tmp_path, tiny_manifest, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")   # read by name, no --params-json
    args = ["stages.train_cls", "--dataset", "demo", "--method", "acrr", "--manifest", str(tiny_manifest),
            "--out", str(tmp_path / "m.pt"), "--metrics", str(tmp_path / "m.json")]
    r = run_stage_inprocess(args, tmp_path, monkeypatch, capsys)
    line = one_line_error(r, "train_cls")
    assert "unknown method 'acrr'" in line and "did you mean `acr`" in line


# ------------------------------------------------------------------ Snakemake targets
@pytest.mark.parametrize("target, expected", [
    ("results/voc/acrr/miou.json", ["unknown method 'acrr'", "did you mean `acr`", "results/voc/acrr/miou.json"]),
    ("results/vocc/acr/miou.json", ["unknown dataset 'vocc'", "did you mean `voc`", "results/vocc/acr/miou.json"]),
    ("results/vocsampel/comparison.md", ["unknown dataset 'vocsampel'", "did you mean `vocsample`"]),
])
def test_unknown_wildcard_in_target_is_named(tmp_path, target, expected):
    copy_snakefile(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--", target], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    for e in expected:
        assert e in out, out[-3000:]
    assert "MissingRuleException" not in out


def test_fallback_rules_never_shadow_real_targets(tmp_path):
    """Known names still plan the real chain (the fallbacks match only unknown names)."""
    copy_snakefile(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--", "results/vocsample/acr/miou.json",
                        "results/demo/comparison.md", "results/demo/cam/pseudo",
                        "results/demo/report/comparison.html", "results/demo/acr/report/curves.png"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "unknown_method" not in out and "unknown_dataset" not in out
    assert "eval_seg" in out and "compare" in out and "report_comparison" in out
