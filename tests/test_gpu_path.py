"""GPU-path options, tested on CPU: amp (bf16 autocast), channels_last, compile plumbing,
and torchrun-style data parallelism (2 gloo processes == 1 process with the same global batch)."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

import pipeline.steps.cls as cls
import pipeline.steps.segment as seg
from pipeline.engine.accel import Accel, amp_mode
from pipeline.io.config import ConfigError
from pipeline.data.prepare import build_manifest
from pipeline.engine.distributed import Dist
from pipeline.io.settings import TrainSeg
from pipeline.engine.runtime import ResumeFile
from tests.test_bad_inputs import make_voc
from tests.test_resume import P as CLS_P
from tests.test_segment import TINY as SEG_P, _make_dataset

U_BF16 = 2.0 ** -8     # bf16 unit roundoff: 8 significant bits, round to nearest -> rel. error <= 2^-8


def _weights(path):
    return torch.load(path, weights_only=False)["state_dict"]


def _cls_data(tmp_path, n=5):
    data, ids = make_voc(tmp_path / "ds", n=n, size=(40, 40))
    return tmp_path / "ds", ids, build_manifest(data, log=lambda s: None)["labels"]


# ----------------------------------------------------------------------------- options
def test_amp_values_and_bad_value_is_named():
    assert [amp_mode(v) for v in (None, False, "off", "OFF", "bf16", "fp16")] == \
        ["off", "off", "off", "off", "bf16", "fp16"]
    with pytest.raises(ConfigError, match=r"train_seg\.amp.*bf16, fp16 or off"):
        Accel({"amp": "fp8"}, "cpu", "train_seg")


def test_bf16_autocast_is_active_and_fp16_gets_a_scaler():
    lin = torch.nn.Linear(4, 3)
    a = Accel({"amp": "bf16"}, "cpu")
    with a.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    assert a.scaler is None and Accel({"amp": "fp16"}, "cpu").scaler is not None
    with Accel({"amp": "off"}, "cpu").autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_amp_off_is_bit_identical_to_no_options(tmp_path):
    """``amp: off, channels_last: false, compile: false`` runs the code path of params without
    those keys (the determinism/resume tests pin that path's results)."""
    root, ids, labels = _cls_data(tmp_path, n=4)
    p = dict(CLS_P, iters=3, checkpoint_every=0)
    cls.train_classifier("cam", root, ids, labels, p, tmp_path / "a.pt", log=lambda s: None)
    cls.train_classifier("cam", root, ids, labels,
                         dict(p, amp=False, channels_last=False, compile=False),
                         tmp_path / "b.pt", log=lambda s: None)
    a, b = _weights(tmp_path / "a.pt"), _weights(tmp_path / "b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_training_loss_close_to_fp32(tmp_path):
    """bf16 autocast changes the loss curve only by rounding.

    Tolerance (reasoned): autocast rounds the inputs of every matmul/conv to bf16 (relative
    error <= u = 2^-8) and accumulates in float32. The tiny ViT (depth 1) applies D = 7 such
    products in sequence (patch embedding, qkv, q k^T, attn v, proj, fc1, fc2; the gmp head's
    Linear makes 8); relative errors add at most linearly, so the logits move by <= 8 u of
    their scale, and the multilabel soft-margin loss is 1-Lipschitz in each logit (mean over
    classes of BCE, |d/dz| <= 1). Over 4 steps of AdamW at lr 1e-3 the weights differ by far
    less than that, so each logged loss must agree within 8 u * max(1, loss).
    The runs must not be bit-identical (that would mean autocast never ran).
    """
    root, ids, labels = _cls_data(tmp_path, n=4)
    p = dict(CLS_P, iters=4, batch_size=4, log_every=1, checkpoint_every=0)
    m32 = cls.train_classifier("cam", root, ids, labels, p, tmp_path / "f32.pt", log=lambda s: None)
    m16 = cls.train_classifier("cam", root, ids, labels, dict(p, amp="bf16"), tmp_path / "bf16.pt",
                               log=lambda s: None)
    l32 = [r["loss"] for r in m32["curve"]]
    l16 = [r["loss"] for r in m16["curve"]]
    assert len(l32) == len(l16) == 4
    for a, b in zip(l32, l16):
        assert abs(a - b) <= 8 * U_BF16 * max(1.0, abs(a)), (l32, l16)
    assert l32 != l16


def test_fp16_training_runs_with_grad_scaler_state_in_resume_file(tmp_path, monkeypatch):
    """amp fp16 trains through the GradScaler and its state is part of the resume file."""
    root, ids, labels = _cls_data(tmp_path, n=4)
    p = dict(CLS_P, iters=3, batch_size=2, checkpoint_every=2, amp="fp16")
    saved = []
    real_save = ResumeFile.save
    monkeypatch.setattr(ResumeFile, "save", lambda self, **st: (saved.append(st), real_save(self, **st)))
    m = cls.train_classifier("cam", root, ids, labels, p, tmp_path / "h.pt", log=lambda s: None)
    assert m["curve"] and all(torch.isfinite(torch.tensor(r["loss"])) for r in m["curve"])
    assert saved and saved[0]["scaler"]["scale"] > 0


def test_bf16_segmentation_step_close_to_fp32(tmp_path):
    """DeepLabV2 (resnet10t) forward + loss under bf16: loss within the same kind of bound.
    D = 14 rounding stages (resnet10t: stem 3 convs + 4 stages x 2 convs... + ASPP), so
    |dloss| <= 14 u * max(1, loss) with cross-entropy 1-Lipschitz in the logits per pixel
    (|softmax - onehot|_1 <= 2 -> bound 2 * 14 u * logit scale, logits here are O(1))."""
    torch.manual_seed(0)
    model = seg.build_model(TrainSeg(backbone="resnet10t", pretrained=None,
                                     rates=[2, 4, 6, 8])).eval()
    x = torch.randn(2, 3, 48, 48)
    y = torch.randint(0, 21, (2, 48, 48))
    with torch.no_grad():
        l32 = float(seg.seg_loss(model(x), y))
        with Accel({"amp": "bf16"}, "cpu").autocast():
            l16 = float(seg.seg_loss(model(x), y))
    assert abs(l32 - l16) <= 2 * 14 * U_BF16 * max(1.0, l32) and l32 != l16


def test_bf16_export_maps_close_to_fp32():
    """export_seeds under bf16: the normalised maps (in [0, 1]) move by rounding only.
    Tolerance: the CAM is W^T F after D = 8 bf16-rounded products (see the training test),
    so the raw maps move by <= 8 u of their scale and the max-normalised maps by <= 2 * 8 u."""
    import numpy as np
    from pipeline.methods import get_method
    from pipeline.steps.seeds import multiscale_maps
    method = get_method("cam")
    torch.manual_seed(0)
    model = method.build_model(dict(CLS_P, head="gmp"), 20).eval()
    img = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    p = {"scales": [1.0, 0.5], "flip": True, "norm": "max"}
    fg = torch.tensor([2, 7])
    ref = multiscale_maps(method, model, img, fg, p, torch.device("cpu"))["cams"]
    got = multiscale_maps(method, model, img, fg, p, torch.device("cpu"),
                          Accel({"amp": "bf16"}, "cpu"))["cams"]
    assert got.dtype == torch.float32 and got.shape == ref.shape == (2, 40, 56)
    d = (got - ref).abs().max()
    assert 0 < d <= 2 * 8 * U_BF16


def test_channels_last_same_outputs_and_gradients():
    """NHWC changes the memory layout, not the maths: outputs and gradients equal to float32
    summation-order noise. Tolerance: a conv output sums K <= 3*3*512 products; reordering a
    float32 sum of K terms changes it by <= K * 2^-24 of the sum of |terms| (~1e-4 relative
    for K = 4608), compounded over ~20 layers -> 1e-3 of the output scale is a safe bound
    that still catches any real difference (wrong layout handling is O(1))."""
    p = TrainSeg(backbone="resnet10t", pretrained=None, rates=[2, 4, 6, 8])
    torch.manual_seed(0)
    a = seg.build_model(p).eval()
    b = seg.build_model(p).eval()
    b.load_state_dict(a.state_dict())
    acc = Accel({"channels_last": True}, "cpu")
    acc.prepare(b)
    w = next(q for q in b.parameters() if q.dim() == 4)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    x = torch.randn(2, 3, 40, 40)
    y = torch.randint(0, 21, (2, 40, 40))
    oa, ob = a(x), b(acc.input(x))
    scale = oa.abs().max()
    assert (oa - ob).abs().max() <= 1e-3 * scale
    seg.seg_loss(oa, y).backward()
    seg.seg_loss(ob, y).backward()
    for qa, qb in zip(a.parameters(), b.parameters()):
        if qa.grad is not None:
            assert (qa.grad - qb.grad).abs().max() <= 1e-3 * qa.grad.abs().max() + 1e-8


def test_compile_option_is_plumbed_in_place():
    """compile: true compiles in place (``nn.Module.compile``): same state-dict keys, and for
    a ViT classifier every transformer block (the plug-ins call blocks, not forward)."""
    from pipeline.methods import get_method
    m = get_method("cam").build_model(CLS_P, 20)
    keys = list(m.state_dict())
    Accel({"compile": True}, "cpu").prepare(m)
    assert list(m.state_dict()) == keys
    assert all(b._compiled_call_impl is not None for b in m.vit.blocks)
    d = seg.build_model(TrainSeg(backbone="resnet10t", pretrained=None))
    Accel({"compile": True}, "cpu").prepare(d)
    assert d._compiled_call_impl is not None


# ------------------------------------------------------------------- data parallel (gloo)
def test_batch_split_and_divisibility():
    d0, d1 = Dist(2, 0), Dist(2, 1)
    assert d0.shard([5, 3, 8, 1]) + d1.shard([5, 3, 8, 1]) == [5, 3, 8, 1]
    assert d1.per_rank(8, "train_seg") == 4
    with pytest.raises(ConfigError, match=r"train_cls\.batch_size 5 is not divisible by the 2"):
        d0.per_rank(5, "train_cls")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, jobs):
    import os
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    c, s = jobs
    seen = []      # per-rank batch sizes: each rank must train on its half only
    real_loss, real_method = seg.seg_loss, cls.get_method

    def method(name):
        m = real_method(name)
        inner = m.loss
        m.loss = lambda model, x, *a: (seen.append(("cls", x.shape[0])), inner(model, x, *a))[1]
        return m
    cls.get_method = method
    seg.seg_loss = lambda lg, y, *a: (seen.append(("seg", y.shape[0])), real_loss(lg, y, *a))[1]
    cls.train_classifier("cam", *c["args"], log=lambda m: None)
    seg.train_seg(*s["args"], log=lambda m: None)
    torch.save(seen, c["args"][-1].with_name(f"seen{rank}.pt"))


def test_two_process_training_equals_one_process(tmp_path):
    """2 gloo ranks, each on half of every global batch, with averaged gradients, reach the
    weights of 1 process on the whole batch (mean-reduced losses over equal halves give the
    same gradient; train_seg normalises by the global labelled-pixel count so padding of
    unequal size per rank does not matter). Tolerance: float32 summation order only."""
    root, ids, labels = _cls_data(tmp_path, n=5)
    pc = dict(CLS_P, batch_size=4, iters=4, checkpoint_every=0, log_every=2)
    sroot = tmp_path / "seg"
    sids = _make_dataset(sroot, n=5)
    ps = dict(SEG_P, iters=4, batch_size=4, log_every=2, freeze_bn=True, scale_range=[0.6, 1.2])

    def jobs(tag):
        return ({"args": (root, ids, labels, pc, tmp_path / f"cls_{tag}.pt")},
                {"args": (sroot, sids, sroot / "SegmentationClass", tmp_path / f"seg_{tag}.pt", ps)})
    c1, s1 = jobs("one")
    m_c1 = cls.train_classifier("cam", *c1["args"], log=lambda m: None)
    m_s1 = seg.train_seg(*s1["args"], log=lambda m: None)
    mp.spawn(_ddp_worker, args=(2, _free_port(), jobs("two")), nprocs=2, join=True)
    for kind in ("cls", "seg"):
        a, b = _weights(tmp_path / f"{kind}_one.pt"), _weights(tmp_path / f"{kind}_two.pt")
        assert a.keys() == b.keys()
        for k in a:
            if a[k].is_floating_point():
                assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (kind, k)
    for r in (0, 1):
        assert torch.load(tmp_path / f"seen{r}.pt") == [("cls", 2)] * 4 + [("seg", 2)] * 4
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.resume"))
    assert m_c1["curve"] and m_s1["loss_curve"]


# ----------------------------------------------------------------------- GPU benchmark
def test_gpu_bench_cpu_path_runs_with_tiny_override():
    """`python -m bench gpu` without CUDA: reduced CPU measurement, JSON says device cpu."""
    from bench.gpu import gpu_bench
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the CPU path is not taken")
    tiny = {"name": "vit_tiny_patch16_224", "pretrained": "none",
            "overrides": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
    r = gpu_bench(overrides={"train_cls": {"backbone": tiny},
                             "run": {"crop": 32, "image_hw": (24, 40)},
                             "export_seeds": {"scales": [1.0, 0.5], "flip": True}})
    assert r["device"] == "cpu" and r["reduced_cpu_version"] and not r["cuda"] and r["crop"] == 32
    assert [t["compile"] for t in r["train"]] == [False]
    t = r["train"][0]
    assert t["batch_size"] == 2 and t["steps"] == 3 and 0 < t["step_s_min"] <= t["step_s_median"]
    assert r["export"]["images"] == 1 and r["export"]["images_per_s"] > 0
    assert r["amp"] == "off" and "random init" in r["weights"]   # voc acr: fp32 (official code)


def test_launcher_uses_torchrun_only_for_more_than_one_gpu():
    from stages._launch import command
    assert command(0, "stages.train_seg", ["--x", "1"], python="py") == ["py", "-m", "stages.train_seg", "--x", "1"]
    assert command(1, "stages.train_cls", [], python="py") == ["py", "-m", "stages.train_cls"]
    assert command(4, "stages.train_cls", ["--a"], python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m",
        "stages.train_cls", "--a"]
    with pytest.raises(ValueError):
        command(2, "os", [])
