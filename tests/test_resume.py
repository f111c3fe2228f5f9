"""A killed training stage (train_cls, train_affinity, train_seg) resumes from its
``<model>.resume`` checkpoint to the same final weights as an uninterrupted run."""
import pytest
import torch

import pipeline.steps.cls as cls
from pipeline.data.prepare import build_manifest
from tests.test_bad_inputs import make_voc

P = {"backbone": {"name": "vit_tiny_patch16_224", "pretrained": "none",
                  "overrides": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
     "head": "gmp", "crop": 32, "batch_size": 2, "iters": 9, "lr": 1e-3, "device": "cpu",
     "seed": 0, "num_workers": 0, "scale_range": [0.7, 1.3], "checkpoint_every": 3, "log_every": 2}


class Killed(Exception):
    pass


def test_resumed_training_equals_uninterrupted(tmp_path, monkeypatch):
    data, ids = make_voc(tmp_path / "ds", n=5, size=(40, 40))   # 5 images, batch 2: epochs of 2 batches
    labels = build_manifest(data, log=lambda s: None)["labels"]
    root = tmp_path / "ds"
    full = tmp_path / "full.pt"
    m_full = cls.train_classifier("cam", root, ids, labels, P, full, log=lambda s: None)
    assert not (tmp_path / "full.pt.resume").exists()

    real = cls.get_method

    class DiesAt7:
        def __init__(self, m):
            self.m, self.calls = m, 0

        def __getattr__(self, k):
            return getattr(self.m, k)

        def __setattr__(self, k, v):
            if k in ("m", "calls"):
                object.__setattr__(self, k, v)
            else:
                setattr(self.m, k, v)

        def loss(self, *a, **kw):
            self.calls += 1
            if self.calls == 8:          # iteration 7 (0-based): after the checkpoint at 6
                raise Killed
            return self.m.loss(*a, **kw)

    out = tmp_path / "resumed.pt"
    monkeypatch.setattr(cls, "get_method", lambda name: DiesAt7(real(name)))
    with pytest.raises(Killed):
        cls.train_classifier("cam", root, ids, labels, P, out, log=lambda s: None)
    assert not out.exists() and (tmp_path / "resumed.pt.resume").exists()
    assert torch.load(tmp_path / "resumed.pt.resume", weights_only=False)["it"] == 6
    monkeypatch.setattr(cls, "get_method", real)
    logs = []
    m_res = cls.train_classifier("cam", root, ids, labels, P, out, log=logs.append)
    assert any("resumed" in s and "iteration 6" in s for s in logs)
    a = torch.load(full, weights_only=False)["state_dict"]
    b = torch.load(out, weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m_res["curve"] == m_full["curve"]
    assert not (tmp_path / "resumed.pt.resume").exists()


def test_checkpoint_of_other_params_is_ignored(tmp_path):
    data, ids = make_voc(tmp_path / "ds", n=4, size=(40, 40))
    labels = build_manifest(data, log=lambda s: None)["labels"]
    out = tmp_path / "m.pt"
    torch.save({"fingerprint": "other", "method": "cam"}, tmp_path / "m.pt.resume")
    logs = []
    cls.train_classifier("cam", tmp_path / "ds", ids, labels, dict(P, iters=2), out, log=logs.append)
    assert any("ignoring" in s for s in logs) and out.exists()


def _same_weights(a_path, b_path):
    a = torch.load(a_path, weights_only=False)["state_dict"]
    b = torch.load(b_path, weights_only=False)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dies_at(fn, call):
    """``fn`` that raises Killed on its ``call``-th call (1-based)."""
    n = {"calls": 0}

    def wrapped(*a, **kw):
        n["calls"] += 1
        if n["calls"] == call:
            raise Killed
        return fn(*a, **kw)
    return wrapped


def test_train_seg_resumes_to_same_weights(tmp_path, monkeypatch):
    import pipeline.steps.segment as seg
    from tests.test_segment import TINY, _make_dataset
    root = tmp_path / "voc"
    ids = _make_dataset(root, n=5)
    p = dict(TINY, iters=7, batch_size=2, log_every=2, checkpoint_every=3)
    full = tmp_path / "full.pth"
    m_full = seg.train_seg(root, ids, root / "SegmentationClass", full, p, log=lambda s: None)
    assert not (tmp_path / "full.pth.resume").exists()

    out = tmp_path / "res.pth"
    monkeypatch.setattr(seg, "seg_loss", _dies_at(seg.seg_loss, 5))   # iteration 5 of 7
    with pytest.raises(Killed):
        seg.train_seg(root, ids, root / "SegmentationClass", out, p, log=lambda s: None)
    assert not out.exists()
    assert torch.load(tmp_path / "res.pth.resume", weights_only=False)["it"] == 3
    monkeypatch.undo()
    logs = []
    m_res = seg.train_seg(root, ids, root / "SegmentationClass", out, p, log=logs.append)
    assert any("resumed" in s and "iteration 3" in s for s in logs)
    assert _same_weights(full, out)
    assert m_res["loss_curve"] == m_full["loss_curve"]
    assert not (tmp_path / "res.pth.resume").exists()


def test_train_affinity_resumes_to_same_weights(tmp_path, monkeypatch):
    import pipeline.steps.refine.affinity_train as psa
    from tests.test_psa import TINY_NET, _synthetic_dataset
    ids = _synthetic_dataset(tmp_path, n=3)
    p = dict(TINY_NET, crop=40, resize_long=None, scale_range=[0.8, 1.2],
             color_jitter=[0.3, 0.3, 0.3, 0.1], batch_size=2, iters=5, lr=0.01, radius=3,
             crf=dict(iters=2), num_workers=0, log_every=2, seed=0, checkpoint_every=2)
    args = (tmp_path, ids, tmp_path / "seeds.h5", "cams", p)
    full = tmp_path / "full.pth"
    m_full = psa.train_affinity_net(*args, full, log=lambda s: None)
    out = tmp_path / "res.pth"
    monkeypatch.setattr(psa, "affinity_loss", _dies_at(psa.affinity_loss, 4))  # after the save at 2
    with pytest.raises(Killed):
        psa.train_affinity_net(*args, out, log=lambda s: None)
    assert not out.exists()
    assert torch.load(tmp_path / "res.pth.resume", weights_only=False)["it"] == 2
    monkeypatch.undo()
    logs = []
    m_res = psa.train_affinity_net(*args, out, log=logs.append)
    assert any("resumed" in s and "iteration 2" in s for s in logs)
    assert _same_weights(full, out)
    assert m_res["loss_curve"] == m_full["loss_curve"]
    assert not (tmp_path / "res.pth.resume").exists()
    # a resume file of other params is ignored, never mixed in
    logs = []
    psa.train_affinity_net(tmp_path, ids, tmp_path / "seeds.h5", "cams", dict(p, lr=0.02),
                           tmp_path / "other.pth", log=logs.append)
    torch.save({"fingerprint": "x", "stage": "train_affinity", "it": 1}, tmp_path / "other.pth.resume")
    logs = []
    psa.train_affinity_net(tmp_path, ids, tmp_path / "seeds.h5", "cams", dict(p, lr=0.02),
                           tmp_path / "other.pth", log=logs.append)
    assert any("ignoring" in s for s in logs)
