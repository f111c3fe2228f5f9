"""PSA affinity labels and pairs against brute-force references of the official code
(jiwoon-ahn/psa: ``train_aff.py``, ``voc12/data.py: VOC12AffDataset`` /
``ExtractAffinityLabelInRadius``, ``tool/imutils.py: AvgPool2d / RandomCrop /
RandomHorizontalFlip``, ``tool/pyutils.py: get_indices_of_pairs``, ``network/resnet38_aff.py``,
``infer_aff.py``). The references below are written from those semantics with plain loops;
they share no code with the ``pipeline.steps.refine`` PSA modules."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io.config import load_params, stage_params
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.voc import load_image
from pipeline.steps.refine import affinity_train
from pipeline.steps.refine.affinity_labels import (crf_scores, downsample_label, pool_affinity_label,
                                             window_affinity_labels)
from pipeline.steps.refine.affinity_pairs import affinity_loss, pair_indices
from pipeline.steps.refine.crf import PSA_CRF
from pipeline.steps.refine.random_walk import affinity_matrix_dense, random_walk, random_walk_dense
from pipeline.io.settings import RefineSeeds, TrainAffinity


# ------------------------------------------------------------------------ references
def ref_offsets(r):
    offs = [(0, x) for x in range(1, r)]
    offs += [(y, x) for y in range(1, r) for x in range(-r + 1, r) if x * x + y * y < r * r]
    return offs


def ref_official_pairs(h, w, r):
    """get_indices_of_pairs, by loops: for each offset, every start pixel (y, x) with
    y < h - (r-1) and r-1 <= x < w - (r-1), row-major."""
    rf = r - 1
    out = []
    for dy, dx in ref_offsets(r):
        for y in range(0, h - rf):
            for x in range(rf, w - rf):
                out.append((y * w + x, (y + dy) * w + x + dx))
    return out


def ref_cell_label(q_low, q_high, cids, stride=8):
    """AvgPool2d(8) (zero padding to a multiple of 8, zeros in the mean), argmax, high/low
    rule, 255 where no score -- one cell at a time."""
    k1, h, w = q_low.shape
    gh, gw = -(-h // stride), -(-w // stride)
    lut = [0] + list(cids)
    out = np.zeros((gh, gw), np.uint8)
    for i in range(gh):
        for j in range(gw):
            lo = np.zeros(k1)
            hi = np.zeros(k1)
            for y in range(i * stride, (i + 1) * stride):
                for x in range(j * stride, (j + 1) * stride):
                    if y < h and x < w:
                        lo += q_low[:, y, x]
                        hi += q_high[:, y, x]
            lo, hi = lo / stride ** 2, hi / stride ** 2
            a_lo, a_hi = int(np.argmax(lo)), int(np.argmax(hi))
            v = lut[a_lo]
            if a_lo == 0:
                v = 255
            if a_hi == 0:
                v = 0
            if max(lo.max(), hi.max()) < 1e-5:
                v = 255
            out[i, j] = v
    return out


def random_scores(rng, k1, h, w, peaky=3.0):
    z = rng.normal(size=(k1, h, w)) * peaky
    e = np.exp(z - z.max(0))
    return (e / e.sum(0)).astype(np.float32)


def official_crop(arr, crop, img_top, img_left, cont_top, cont_left):
    """imutils.RandomCrop with given draws: (H, W, C) -> zero container (crop, crop, C)."""
    h, w = arr.shape[:2]
    ch, cw = min(crop, h), min(crop, w)
    cont = np.zeros((crop, crop, arr.shape[2]), np.float32)
    cont[cont_top:cont_top + ch, cont_left:cont_left + cw] = \
        arr[img_top:img_top + ch, img_left:img_left + cw]
    return cont


# ------------------------------------------------------------------------------ pairs
def test_official_pairs_hand_computed_3x4_radius2():
    # grid          start pixels (rows < 3-1, 1 <= cols < 4-1): 1, 2, 5, 6
    #  0  1  2  3   offsets (0,1) (1,-1) (1,0) (1,1)
    #  4  5  6  7
    #  8  9 10 11
    fr, to, oid = pair_indices(3, 4, 2)
    assert fr.tolist() == [1, 2, 5, 6] * 4
    assert to.tolist() == [2, 3, 6, 7, 4, 5, 8, 9, 5, 6, 9, 10, 6, 7, 10, 11]
    assert oid.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    # the border bands start nothing: e.g. (0,1), (4,5), (8,9), (10,11), (3,7) are absent
    got = {tuple(sorted(p)) for p in zip(fr.tolist(), to.tolist())}
    assert not got & {(0, 1), (0, 4), (0, 5), (4, 5), (8, 9), (9, 10), (10, 11), (3, 7), (3, 6)}
    allp = pair_indices(3, 4, 2, pairs="all")[0]
    assert len(allp) == 3 * 3 + 2 * 4 + 2 * 3 * 2  # horizontal + vertical + two diagonals


@pytest.mark.parametrize("h,w,r", [(4, 6, 2), (12, 12, 5), (9, 15, 3), (7, 20, 5), (5, 9, 5),
                                   (4, 8, 5), (3, 3, 1)])
def test_official_pairs_match_loops(h, w, r):
    fr, to, oid = pair_indices(h, w, r)
    ref = ref_official_pairs(h, w, r)
    assert list(zip(fr.tolist(), to.tolist())) == ref          # same pairs, same order
    offs = ref_offsets(r)
    for a, b, k in zip(fr.tolist(), to.tolist(), oid.tolist()):
        assert (b // w - a // w, b % w - a % w) == offs[k]
    # a subset of "every pair within the radius", each unordered pair once
    allp = {tuple(sorted(p)) for p in zip(*(t.tolist() for t in pair_indices(h, w, r, pairs="all")[:2]))}
    got = {tuple(sorted(p)) for p in ref}
    assert got <= allp and len(got) == len(ref)


def test_official_pairs_isolate_corners_of_the_demo_grid():
    # 96 px demo crop -> 12 x 12 cells, radius 5: 8 x 4 start pixels
    fr, to, _ = pair_indices(12, 12, 5)
    assert len(fr) == 8 * 4 * 34
    touched = set(fr.tolist()) | set(to.tolist())
    assert 11 * 12 + 0 not in touched and 11 * 12 + 11 not in touched   # bottom corners


def test_dense_affinity_and_random_walk_use_official_edges():
    """infer_aff.py: W = sparse([(from,to),(i,i),(to,from)], [a, 1, a]).to_dense() ** beta,
    T = W / colsum, T^(2^logt), maps @ T."""
    torch.manual_seed(3)
    d, h, w, r, beta, logt = 6, 9, 11, 3, 4.0, 3
    f = torch.randn(d, h, w, dtype=torch.float64) * 0.4
    maps = torch.rand(3, h, w, dtype=torch.float64)
    n = h * w
    fv = f.reshape(d, n).numpy()
    W = np.eye(n)
    for i, j in ref_official_pairs(h, w, r):
        a = np.exp(-np.abs(fv[:, i] - fv[:, j]).mean())
        W[i, j] += a ** beta
        W[j, i] += a ** beta
    np.testing.assert_allclose(affinity_matrix_dense(f, r, beta).numpy(), W, atol=1e-12)
    T = W / W.sum(0, keepdims=True)
    ref = maps.numpy().reshape(3, n) @ np.linalg.matrix_power(T, 2 ** logt)
    np.testing.assert_allclose(random_walk_dense(f, maps, r, beta, logt).numpy().reshape(3, n),
                               ref, atol=1e-10)
    np.testing.assert_allclose(random_walk(f, maps, r, beta, logt).numpy().reshape(3, n),
                               ref, atol=1e-9)


def test_loss_uses_official_pairs():
    """ExtractAffinityLabelInRadius + the train_aff.py loss, by loops over the pairs."""
    rng = np.random.default_rng(0)
    h, w, r = 10, 13, 4
    lab = rng.choice([0, 0, 3, 7, 255], size=(h, w))
    f = torch.tensor(rng.normal(size=(1, 5, h, w)) * 0.5)
    fv = f[0].reshape(5, -1).numpy()
    lv = lab.reshape(-1)
    s = {"bg": [], "fg": [], "neg": []}
    for i, j in ref_official_pairs(h, w, r):
        a = np.exp(-np.abs(fv[:, i] - fv[:, j]).mean())
        li, lj = lv[i], lv[j]
        if li == lj == 0:
            s["bg"].append(-np.log(a + 1e-5))
        elif li == lj and li != 255:
            s["fg"].append(-np.log(a + 1e-5))
        elif li != lj and li != 255 and lj != 255:
            s["neg"].append(-np.log(1 + 1e-5 - a))
    ref = np.mean(s["bg"]) / 4 + np.mean(s["fg"]) / 4 + np.mean(s["neg"]) / 2
    got, parts = affinity_loss(f, torch.tensor(lab)[None], r, return_parts=True)
    assert got.item() == pytest.approx(ref, rel=1e-9)
    assert (parts["n_bg"], parts["n_fg"], parts["n_neg"]) == (len(s["bg"]), len(s["fg"]),
                                                               len(s["neg"]))
    assert affinity_loss(f, torch.tensor(lab)[None], r, pairs="all").item() != pytest.approx(ref)
    with pytest.raises(ValueError, match="pairs"):
        pair_indices(4, 4, 2, pairs="paper")


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize("h,w", [(16, 24), (19, 13), (8, 8), (5, 30)])
def test_pool_affinity_label_matches_cell_loops(h, w):
    rng = np.random.default_rng(h * w)
    cids = [4, 11]
    ql, qh = random_scores(rng, 3, h, w), random_scores(rng, 3, h, w)
    ql[0] *= 1.6   # stronger background in the low-alpha map (more 255 cells)
    ql /= ql.sum(0)
    got = pool_affinity_label(ql, qh, cids)
    assert got.shape == (-(-h // 8), -(-w // 8))
    np.testing.assert_array_equal(got, ref_cell_label(ql, qh, cids))
    assert {0, 4, 11, 255} >= set(np.unique(got).tolist())
    # a RandomCrop container: zero scores left of / below the image -> 255 cells there
    cont_l, cont_h = np.zeros((3, h + 9, w + 17), np.float32), np.zeros((3, h + 9, w + 17), np.float32)
    cont_l[:, :h, 17:], cont_h[:, :h, 17:] = ql, qh
    got = pool_affinity_label(cont_l, cont_h, cids)
    np.testing.assert_array_equal(got, ref_cell_label(cont_l, cont_h, cids))
    assert (got[:, :2] == 255).all() and (got[-1] == 255).all() if h % 8 == 0 else True


def test_pool_affinity_label_equals_skimage_block_reduce():
    skm = pytest.importorskip("skimage.measure")
    rng = np.random.default_rng(5)
    ql, qh = random_scores(rng, 2, 21, 29), random_scores(rng, 2, 21, 29)
    hwc = np.concatenate([ql, qh]).transpose(1, 2, 0)
    pooled = skm.block_reduce(hwc, (8, 8, 1), np.mean)          # imutils.AvgPool2d(8)
    lo, hi = pooled[..., :2].argmax(-1), pooled[..., 2:].argmax(-1)
    ref = np.where(lo == 0, 255, 9).astype(np.uint8)
    ref[hi == 0] = 0
    np.testing.assert_array_equal(pool_affinity_label(ql, qh, [9]), ref)


def test_avgpool_differs_from_centre_pixel():
    # a cell whose centre pixel is background but most of whose score is foreground
    q_fg = np.zeros((2, 8, 8), np.float32)
    q_fg[1] = 1.0
    q_fg[:, 4, 4] = (1.0, 0.0)
    assert pool_affinity_label(q_fg, q_fg, [5])[0, 0] == 5


def test_window_labels_sampled_equal_official_crops():
    """Every crop position (inside the image and padded) and flip: sampling the window-label
    map at the crop's cells == RandomCrop -> RandomHorizontalFlip -> AvgPool2d(8) -> rule."""
    rng = np.random.default_rng(1)
    h, w, crop, cids = 37, 29, 32, [2, 15]
    ql, qh = random_scores(rng, 3, h, w), random_scores(rng, 3, h, w)
    win = window_affinity_labels(ql, qh, cids)
    assert win.shape == (h + 7, w + 7)
    q = np.concatenate([ql, qh]).transpose(1, 2, 0)
    # image larger than the crop vertically (random img_top), smaller horizontally (cont_left)
    for img_top in range(0, h - crop + 1):
        for cont_left in range(0, crop - w + 1):
            for flip in (False, True):
                cont = official_crop(q, crop, img_top, 0, 0, cont_left)
                if flip:
                    cont = np.fliplr(cont).copy()
                c = cont.transpose(2, 0, 1)
                ref = ref_cell_label(c[:3], c[3:], cids)
                ys = affinity_train._cell_label_indices(img_top, crop, h, h, False, "avgpool")
                # the train set flips before cropping: the same crop of the flipped image
                # starts at w - start - crop
                start = w + cont_left - crop if flip else -cont_left
                xs = affinity_train._cell_label_indices(start, crop, w, w, flip, "avgpool")
                got = np.full(ref.shape, 255, np.uint8)
                got[np.ix_(ys >= 0, xs >= 0)] = win[np.ix_(ys[ys >= 0], xs[xs >= 0])]
                np.testing.assert_array_equal(got, ref, err_msg=f"{img_top} {cont_left} {flip}")


def _coord_dataset(tmp_path, n=3, h=37, w=53, k1=3):
    """Images whose R/G channels are the x/y coordinate (lossless PNG under a .jpg name),
    random CRF-like score maps, stored official window labels."""
    (tmp_path / "JPEGImages").mkdir()
    rng = np.random.default_rng(7)
    ids, scores, labels = [], {}, {}
    for i in range(n):
        hh, ww = h + 3 * i, w - 5 * i
        img = np.zeros((hh, ww, 3), np.uint8)
        img[..., 0] = np.arange(ww)[None]
        img[..., 1] = np.arange(hh)[:, None]
        img[..., 2] = 200
        Image.fromarray(img).save(tmp_path / "JPEGImages" / f"c{i}.jpg", format="PNG")
        ql, qh = random_scores(rng, k1, hh, ww), random_scores(rng, k1, hh, ww)
        scores[f"c{i}"] = (ql, qh)
        labels[f"c{i}"] = affinity_train._encode_png(window_affinity_labels(ql, qh, [3, 8]))
        ids.append(f"c{i}")
    return ids, scores, labels


def _decode_coords(x):
    v = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    v = (v * 255).round().long()
    pad = x.abs().sum(0) == 0
    return v[0], v[1], pad


@pytest.mark.parametrize("crop", [32, 64])
def test_train_set_avgpool_labels_equal_official_pipeline(tmp_path, crop):
    ids, scores, labels = _coord_dataset(tmp_path)
    ds = affinity_train._AffinityTrainSet(tmp_path, ids, labels,
                                          TrainAffinity(crop=crop, color_jitter=None))
    torch.manual_seed(0)
    for it in range(12):
        i = it % len(ids)
        x, y = ds[i]
        ql, qh = scores[ids[i]]
        xs, ys, pad = _decode_coords(x)
        # rebuild the official container from the decoded crop: score of image pixel (ys, xs)
        q = np.concatenate([ql, qh])
        cont = np.zeros((q.shape[0], crop, crop), np.float32)
        m = ~pad.numpy()
        cont[:, m] = q[:, ys.numpy()[m], xs.numpy()[m]]
        ref = ref_cell_label(cont[:3], cont[3:], [3, 8])
        np.testing.assert_array_equal(y.numpy(), ref)
        assert y.shape == (crop // 8, crop // 8) and y.dtype == torch.int64


def _old_train_item(p, img, lab):
    """The former _AffinityTrainSet.__getitem__ (centre-pixel labels), same random draws."""
    w, h = img.size
    lab = Image.fromarray(lab, mode="L")
    if p.get("scale_range"):
        lo, hi = p["scale_range"]
        s = lo + (hi - lo) * float(torch.rand(()).item())
    else:
        s = 1.0
    if s != 1.0:
        size = (max(1, round(w * s)), max(1, round(h * s)))
        img = img.resize(size, Image.BILINEAR)
        lab = lab.resize(size, Image.NEAREST)
    from pipeline.data.transforms import to_tensor
    x = to_tensor(np.array(img, dtype=np.uint8))
    y = torch.from_numpy(np.asarray(lab, dtype=np.uint8).astype(np.int64))
    if torch.rand(()) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    crop = int(p["crop"])
    h, w = y.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        top = int(torch.randint(0, ph + 1, ()))
        left = int(torch.randint(0, pw + 1, ()))
        x = torch.nn.functional.pad(x, (left, pw - left, top, ph - top), value=0.0)
        y = torch.nn.functional.pad(y, (left, pw - left, top, ph - top), value=255)
    h, w = y.shape
    top = int(torch.randint(0, h - crop + 1, ()))
    left = int(torch.randint(0, w - crop + 1, ()))
    return x[:, top:top + crop, left:left + crop], downsample_label(y[top:top + crop, left:left + crop])


@pytest.mark.parametrize("scale_range", [None, [0.7, 1.4]])
def test_centre_option_reproduces_the_former_train_set(tmp_path, scale_range):
    ids, _, _ = _coord_dataset(tmp_path)
    rng = np.random.default_rng(2)
    full = {}
    for i in ids:
        h, w = np.asarray(Image.open(tmp_path / "JPEGImages" / f"{i}.jpg")).shape[:2]
        full[i] = rng.choice(np.array([0, 3, 8, 255], np.uint8), size=(h, w))
    labels = {i: affinity_train._encode_png(v) for i, v in full.items()}
    p = {"crop": 48, "color_jitter": None, "label_pooling": "centre", "scale_range": scale_range}
    ds = affinity_train._AffinityTrainSet(tmp_path, ids, labels, TrainAffinity.of(p))
    for it in range(9):
        i = ids[it % 3]
        torch.manual_seed(it)
        x, y = ds[it % 3]
        torch.manual_seed(it)
        xo, yo = _old_train_item(p, Image.open(tmp_path / "JPEGImages" / f"{i}.jpg").convert("RGB"),
                                 full[i])
        assert torch.equal(x, xo)
        assert torch.equal(y, yo), (it, scale_range)


def test_label_set_and_training_defaults(tmp_path):
    from tests.test_psa import _synthetic_dataset
    ids = _synthetic_dataset(tmp_path, n=2)
    p = TrainAffinity(crf=dict(PSA_CRF, iters=2))
    iid, data, counts = affinity_train._LabelSet(tmp_path, ids, tmp_path / "seeds.h5", "cams", p)[0]
    with Image.open(io.BytesIO(data)) as im:
        win = np.asarray(im)
    assert win.shape == (48 + 7, 64 + 7) and counts.sum() == 6 * 8
    image = load_image(tmp_path, iid)
    from pipeline.io.storage import MapReader
    with MapReader(tmp_path / "seeds.h5") as r:
        cams, cids, _ = r.read(iid, "cams")
    ql = crf_scores(image, cams, 4, p.crf)
    qh = crf_scores(image, cams, 32, p.crf)
    np.testing.assert_array_equal(win[7::8, 7::8], ref_cell_label(ql, qh, cids.tolist()))
    d = TrainAffinity()
    assert d.label_pooling == "avgpool" and d.pairs == "official"
    assert d.resize_long is None and d.scale_range is None
    assert RefineSeeds().pairs == "official"
    with pytest.raises(ValueError, match="label_pooling"):
        affinity_train.train_affinity_net(tmp_path, ids, tmp_path / "seeds.h5", "cams",
                               {"label_pooling": "center"}, tmp_path / "m.pt")


def test_profiles_follow_the_official_code():
    cfg = load_params()
    for d in ("voc", "coco", "demo", "vocsample"):
        if d not in cfg["profiles"]:
            continue
        p = stage_params(cfg, d, "cam", "train_affinity")
        assert p.get("label_pooling", "avgpool") == "avgpool", d
        assert p.get("pairs", "official") == "official", d
        r = stage_params(cfg, d, "cam", "refine_seeds")
        assert r.get("pairs", "official") == p.get("pairs", "official"), d
    v = stage_params(cfg, "voc", "cam", "train_affinity")
    assert v["resize_long"] is None and v["scale_range"] is None and v["crop"] == 448
    assert stage_params(cfg, "demo", "cam", "train_affinity")["scale_range"] is None
    assert RefineSeeds.of(stage_params(cfg, "voc", "cam", "refine_seeds")).border == "pad"


def test_voc_affinity_net_trains_only_the_official_groups():
    """train_aff.py's groups 1 / 3 (biases: lr x2 / x20, no decay) are empty for the official
    AffinityNet (bias-free convs, BatchNorm frozen); voc's network trains likewise only
    bias-free conv weights, so one decay and lr x1 / x10 are the code's optimiser."""
    from pipeline.steps.refine.affinity_net import build_affinity_net
    v = stage_params(load_params(), "voc", "cam", "train_affinity")
    net = build_affinity_net(v, pretrained=None).train()
    trained = {n: q for n, q in net.named_parameters() if q.requires_grad}
    assert trained and all(q.dim() == 4 for q in trained.values()), \
        [n for n, q in trained.items() if q.dim() != 4]
    assert not any(isinstance(m, torch.nn.Conv2d) and m.bias is not None for m in net.modules())
    demo = build_affinity_net(stage_params(load_params(), "demo", "cam", "train_affinity"))
    assert any(q.dim() == 1 for q in demo.parameters() if q.requires_grad)   # BN trains there
