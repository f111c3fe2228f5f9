"""Tests of the PSA modules of pipeline.steps.refine (affinity labels, pairs, loss, AffinityNet,
random walk, the train_affinity / refine_seeds entry points)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.steps.refine.affinity_labels import downsample_label, make_affinity_label
from pipeline.steps.refine.affinity_net import AffinityNet
from pipeline.steps.refine.affinity_pairs import affinity_loss, pair_indices, pair_labels, search_offsets
from pipeline.steps.refine.affinity_train import train_affinity_net
from pipeline.steps.refine.random_walk import (affinity_matrix_dense, label_affinity_features,
                                               random_walk, random_walk_dense, refine_maps,
                                               refine_seeds, refine_with_features)
from pipeline.io.storage import MapReader, MapWriter



TINY_NET = dict(backbone="resnet10t", pretrained=None, feature_dim=14, freeze_bn=False)


def test_search_offsets_half_disk():
    offs = search_offsets(5)
    assert len(offs) == 34 and len(set(offs)) == 34
    for dy, dx in offs:
        assert (dy > 0 or (dy == 0 and dx > 0)) and dx * dx + dy * dy < 25
    full = set(offs) | {(-dy, -dx) for dy, dx in offs}
    disk = {(dy, dx) for dy in range(-5, 6) for dx in range(-5, 6)
            if 0 < dx * dx + dy * dy < 25}
    assert full == disk
    with pytest.raises(ValueError):
        search_offsets(0)


@pytest.mark.parametrize("h,w,r", [(7, 9, 3), (5, 4, 5), (1, 6, 2)])
def test_pair_indices_match_naive(h, w, r):
    fr, to, oid = pair_indices(h, w, r, pairs="all")   # the paper's "every pair" option
    got = {(int(a), int(b)) for a, b in zip(fr, to)}
    assert len(got) == len(fr)  # each pair once
    naive = set()
    for i in range(h * w):
        for j in range(i + 1, h * w):
            dy, dx = j // w - i // w, j % w - i % w
            if dy * dy + dx * dx < r * r:
                naive.add((i, j))
    assert {tuple(sorted(p)) for p in got} == naive
    offs = search_offsets(r)
    for a, b, k in zip(fr.tolist(), to.tolist(), oid.tolist()):
        assert (b // w - a // w, b % w - a % w) == offs[k]


def test_downsample_label_centre_pixel():
    lab = np.arange(20 * 13, dtype=np.int64).reshape(20, 13)
    d = downsample_label(lab)
    assert d.shape == (3, 2)
    assert d[0, 0] == lab[4, 4] and d[2, 1] == lab[19, 12] and d[1, 0] == lab[12, 4]
    t = downsample_label(torch.from_numpy(lab)[None])
    assert t.shape == (1, 3, 2) and (t[0].numpy() == d).all()


def test_pair_labels_and_loss_hand_computed():
    # 1 x 3 grid, radius 2 -> pairs (0,1) and (1,2) only
    # (pairs="all": the official set starts no pair on a 1-row grid with radius 2)
    labels = torch.tensor([[[0, 0, 7]]])
    assert not pair_labels(labels, 2)[0].numel()
    bg, fg, neg = pair_labels(labels, 2, pairs="all")
    assert bg.tolist() == [[True, False]] and fg.tolist() == [[False, False]]
    assert neg.tolist() == [[False, True]]
    f = torch.tensor([[[[0.0, 0.5, 2.0]], [[1.0, 1.0, 1.0]]]], requires_grad=True)  # (1,2,1,3)
    a01, a12 = math.exp(-0.25), math.exp(-0.75)
    loss = affinity_loss(f, labels, radius=2, pairs="all")
    ref = -math.log(a01 + 1e-5) / 4 + 0.0 / 4 - math.log(1 + 1e-5 - a12) / 2
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    # ignored pixels: pairs touching 255 vanish; all-ignored -> loss 0, no NaN
    lab2 = torch.tensor([[[255, 3, 3]]])
    bg, fg, neg = pair_labels(lab2, 2, pairs="all")
    assert fg.tolist() == [[False, True]] and not bg.any() and not neg.any()
    assert affinity_loss(f, torch.full((1, 1, 3), 255), pairs="all").item() == 0.0
    with pytest.raises(ValueError):
        affinity_loss(f, torch.zeros(1, 1, 4, dtype=torch.long))


def test_make_affinity_label_combination():
    img = np.full((8, 30, 3), 128, np.uint8)
    cams = np.zeros((1, 8, 30), np.float32)
    cams[0, :, :10] = 0.9     # confident fg under both alphas -> class
    cams[0, :, 10:20] = 0.1   # bg under alpha 4, fg under alpha 32 -> 255
    lab = make_affinity_label(img, cams, [12], 4, 32, crf=dict(iters=0))
    assert (lab[:, :10] == 12).all() and (lab[:, 10:20] == 255).all() and (lab[:, 20:] == 0).all()
    with pytest.raises(ValueError):
        make_affinity_label(img, cams, [12], 32, 4)


def test_affinity_net_shapes():
    torch.manual_seed(0)
    net = AffinityNet("resnet10t", None, feature_dim=14).eval()
    with torch.no_grad():
        f = net(torch.randn(2, 3, 50, 37))
    assert f.shape == (2, 14, 7, 5) and torch.isfinite(f).all() and f.min() >= -1


def _naive_w(f, radius, beta):
    d, h, w = f.shape
    n = h * w
    W = np.zeros((n, n))
    fn = f.numpy().reshape(d, n)
    for i in range(n):
        for j in range(n):
            dy, dx = j // w - i // w, j % w - i % w
            if dy * dy + dx * dx < radius * radius:
                W[i, j] = math.exp(-np.abs(fn[:, i] - fn[:, j]).mean()) ** beta
    return W


def test_dense_random_walk_matches_naive_loop():
    torch.manual_seed(1)
    f = torch.rand(5, 4, 5, dtype=torch.float64)
    maps = torch.rand(3, 4, 5, dtype=torch.float64)
    W = _naive_w(f, 3, 2.0)
    np.testing.assert_allclose(affinity_matrix_dense(f, 3, 2.0, pairs="all").numpy(), W,
                               atol=1e-12)
    T = W / W.sum(0, keepdims=True)
    ref = maps.numpy().reshape(3, -1) @ np.linalg.matrix_power(T, 2 ** 3)
    got = random_walk_dense(f, maps, radius=3, beta=2.0, logt=3, pairs="all")
    np.testing.assert_allclose(got.numpy().reshape(3, -1), ref, atol=1e-10)


@pytest.mark.parametrize("pairs", ["official", "all"])
@pytest.mark.parametrize("radius,beta,logt", [(5, 8, 8), (3, 2, 4), (2, 1, 0), (4, 8, 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_random_walk_equals_dense(radius, beta, logt, dtype, pairs):
    g = torch.Generator().manual_seed(radius * 100 + logt)
    f = (torch.randn(8, 12, 15, generator=g) * 0.3).to(dtype)
    maps = torch.rand(4, 12, 15, generator=g).to(dtype)
    d = random_walk_dense(f, maps, radius, beta, logt, pairs)
    s = random_walk(f, maps, radius, beta, logt, pairs)
    assert s.shape == (4, 12, 15)
    # columns of T sum to 1: constant maps are fixed points
    const = random_walk(f, torch.full_like(maps, 0.3), radius, beta, logt, pairs)
    assert (const - 0.3).abs().max().item() < 1e-5
    dn, sn = d / d.sum(0), s / s.sum(0)
    assert (dn - sn).abs().max().item() < 1e-5
    assert ((d - s).abs() / d.abs().clamp_min(1e-6)).max().item() < 1e-4


def test_random_walk_respects_affinity_boundary():
    f = torch.zeros(4, 10, 10)
    f[:, :, 5:] = 3.0                       # two regions with very different features
    maps = torch.zeros(2, 10, 10)
    maps[0, 4, 1] = 1.0                     # a single seed in the left region
    maps[1] = 0.05                          # weak uniform competitor
    out = random_walk(f, maps, radius=5, beta=8, logt=8, pairs="all")
    left, right = out[0, :, :5], out[0, :, 5:]
    assert left.min() > 10 * right.max()    # mass stays on its side of the boundary
    assert left.std() / left.mean() < 0.05  # and diffuses ~uniformly within it
    with pytest.raises(ValueError):
        random_walk(f, maps[:, :9], radius=5)


def test_refine_maps_is_distribution():
    torch.manual_seed(0)
    net = AffinityNet("resnet10t", None, feature_dim=14).eval()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (45, 62, 3), dtype=np.uint8)
    cams = rng.random((2, 45, 62)).astype(np.float32)
    out = refine_maps(net, img, cams, dict(radius=3, beta=8, logt=4, bg_alpha=16))
    assert out.shape == (3, 45, 62) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    assert (refine_maps(net, img, cams[:0]) == 1).all()


def test_refine_maps_without_classes_skips_the_network():
    """An image with no foreground class is all background without an AffinityNet forward."""
    net = AffinityNet("resnet10t", None, feature_dim=14).eval()
    calls = []
    net.register_forward_pre_hook(lambda *a: calls.append(1))
    img = np.zeros((20, 30, 3), np.uint8)
    out = refine_maps(net, img, np.zeros((0, 20, 30), np.float32))
    assert out.shape == (1, 20, 30) and out.dtype == np.float32 and (out == 1).all()
    assert not calls
    refine_maps(net, img, np.ones((1, 20, 30), np.float32))
    assert calls                                   # the hook sees a real forward


def test_label_affinity_features_distances():
    lab = np.zeros((16, 24), np.uint8)
    lab[:, 8:16] = 7
    lab[:, 16:] = 255                      # the ignore index is a label of its own
    lab[0, 0] = 7                          # one impure cell
    f = label_affinity_features(lab)
    assert f.shape == (3, 2, 3) and f.dtype == torch.float32
    d = lambda a, b: float((f[:, a[0], a[1]] - f[:, b[0], b[1]]).abs().mean())
    assert d((1, 0), (1, 1)) == pytest.approx(2.0) and d((1, 1), (1, 2)) == pytest.approx(2.0)
    assert d((0, 1), (1, 1)) == 0.0        # same label, pure cells
    assert 0 < d((0, 0), (1, 0)) < 2.0     # the impure cell: 63/64 background, 1/64 of label 7
    assert d((0, 0), (1, 0)) == pytest.approx(2 * 3 * (1 / 64) / 3)
    with pytest.raises(ValueError, match="values must lie"):
        label_affinity_features(np.full((8, 8), 300, np.int64))
    with pytest.raises(ValueError, match="must be"):
        label_affinity_features(np.zeros((2, 8, 8), np.uint8))


def test_walk_with_label_affinity_fills_the_object_and_stops_at_its_edge():
    # object (class 3) in columns 0..79 of an 80 x 160 image; its seed covers columns 0..55
    # only. At the seeds' threshold columns 56..79 are background; a walk whose affinity is the
    # object mask averages the seed inside the object (class 0.7 > background 0.3) and never
    # leaks across column 80, so it labels the object exactly. (The grid must be larger than
    # the radius: official pairs start only where a full search window fits.)
    H, W = 80, 160
    obj = np.zeros((H, W), np.uint8)
    obj[:, :80] = 3
    cams = np.zeros((1, H, W), np.float32)
    cams[0, :, :56] = 1.0
    probs = refine_with_features(label_affinity_features(obj), cams, (H, W),
                                 dict(radius=5, beta=8, logt=8, bg_alpha=2))
    assert probs.shape == (2, H, W)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    label = np.array([0, 3])[probs.argmax(0)]
    assert (label[:, :56] == 3).all()      # the seed itself
    # filled to the object's edge, not beyond; the 8 px around the edge lie between two cell
    # centres (75.5 and 83.5), where the bilinear upsampling of the cell grid decides
    assert (label[:, :76] == 3).all() and (label[:, 84:] == 0).all()
    # the same walk with an uninformative affinity (one label everywhere) spreads the seed
    # over the whole image, where the background outweighs it
    flat = refine_with_features(label_affinity_features(np.zeros((H, W), np.uint8)), cams,
                                (H, W), dict(radius=5, beta=8, logt=8, bg_alpha=2))
    assert (flat.argmax(0) == 0).mean() > 0.9


def _synthetic_dataset(root, n=4, h=48, w=64):
    """Images with a bright square object; seeds = blurred square cams, class 5 or 9."""
    (root / "JPEGImages").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(n)]
    with MapWriter(root / "seeds.h5", ["bg"] + [f"c{i}" for i in range(1, 21)]) as wr:
        for i, image_id in enumerate(ids):
            img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            y0, x0 = rng.integers(4, 16), rng.integers(4, 28)
            img[y0:y0 + 24, x0:x0 + 24] = (220, 200, 30)
            Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg")
            cam = np.zeros((1, h, w), np.float32)
            cam[0, y0 + 4:y0 + 20, x0 + 4:x0 + 20] = 0.9
            wr.write(image_id, [5 if i % 2 else 9], (h, w), cams=cam)
    return ids


def test_train_and_refine_end_to_end(tmp_path):
    ids = _synthetic_dataset(tmp_path)
    # radius 3: a 6x6 cell grid has no official (interior-start) pairs at radius 5
    params = dict(TINY_NET, crop=48, resize_long=None, scale_range=[0.9, 1.1],
                  color_jitter=None, batch_size=2, iters=3, lr=0.01, radius=3,
                  crf=dict(iters=3), num_workers=0, log_every=2, seed=0)
    out = tmp_path / "aff.pth"
    logs = []
    m = train_affinity_net(tmp_path, ids, tmp_path / "seeds.h5", "cams", params, out,
                               log=logs.append)
    assert out.is_file() and not (tmp_path / "aff.pth.tmp").exists()
    assert m["iters"] == 3 and [e["iter"] for e in m["loss_curve"]] == [2, 3]
    assert all(np.isfinite(e["loss"]) for e in m["loss_curve"])
    assert m["label_fractions"]["fg"] > 0 and m["label_fractions"]["bg"] > 0
    assert m["loss_curve"][0]["loss"] > 0     # the official pair set is not empty here
    ck = torch.load(out, weights_only=False)
    assert set(ck) == {"state_dict", "params"} and ck["params"]["feature_dim"] == 14
    with pytest.raises(ValueError, match="unknown"):
        train_affinity_net(tmp_path, ids, tmp_path / "seeds.h5", "cams",
                               dict(params, bogus=1), out, log=logs.append)

    refine_seeds(tmp_path, ids, tmp_path / "seeds.h5", "cams", out, tmp_path / "ref.h5",
                     dict(radius=3, beta=8, logt=4, bg_alpha=16), log=logs.append)
    with MapReader(tmp_path / "ref.h5") as r:
        assert sorted(r.ids) == sorted(ids)
        probs, cids, size = r.read("img1", "probs")
        assert cids.tolist() == [0, 5] and size == (48, 64) and probs.shape == (2, 48, 64)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=2e-3)
        assert r.read("img0", "probs")[1].tolist() == [0, 9]


def test_affinity_net_learns_fixed_batch():
    torch.manual_seed(0)
    net = AffinityNet("resnet10t", None, feature_dim=14).train()
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 4, 4, dtype=torch.long)
    y[:, :, 2:] = 3
    x[:, :, :, 16:] += 2.0
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        loss = affinity_loss(net(x), y, radius=3, pairs="all")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
