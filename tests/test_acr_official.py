"""ACR defaults = the official code (OpenNLPLab/ACR_WSSS), each piece against an independent
brute-force reference written from the official code's semantics (explicit Python loops over
blocks / heads / patches on a tiny random ViT) or a hand-computed case.

Official files: ``train_acr.py`` (view 2 = ``RandomHorizontalFlip(p=1)`` of the batch; per
block head-mean attention; ``F.l1_loss(.., 'mean')`` on ``A[:, :, 0, 1:]`` and
``A[:, :, 1:, 1:]``; ``loss = cls1 + cls2 + alpha * (act + aff)``, ``--alpha 125``),
``DPT/ACR.py: getam(func='grad')`` (ReLU per head, mean over heads, sum of blocks >=
start_layer, ReLU) and ``infer_cam.py`` (``A @ M*`` with ``A`` = sum over all blocks,
scale 1 + flip, bilinear ``align_corners=True``, min-max eps 1e-6, low/high alpha 1 / 12).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.steps.cls import make_optimizer, train_iterations
from pipeline.io.config import load_params, stage_params
from pipeline.methods.acr import ACR, acr_maps, consistency_losses
from pipeline.methods.base import ViTClassifier
from pipeline.models.vit import attentions
from pipeline.steps.seeds import multiscale_maps
from pipeline.engine.trainer import poly_lr
from vit_reference import fd_grad_per_head, tiny_vit

TINY = {"backbone": tiny_vit(patch=8, dim=24, depth=3)}
H = W = 4          # token grid of a 32 x 32 input
N_PATCH = H * W


def tiny_model(seed=0, classes=5):
    torch.manual_seed(seed)
    return ViTClassifier({**TINY, "head": "cls_token"}, classes).double()


def hflip_token(j, w=W):
    """Index, in the horizontally flipped view, of original patch token j (row-major)."""
    r, c = divmod(j, w)
    return r * w + (w - 1 - c)


# ----------------------------------------------------------------- training loss
def ref_soft_margin(logits, y):
    """multilabel_soft_margin_loss by hand: mean over batch and classes of
    -(y log sigmoid(x) + (1 - y) log sigmoid(-x))."""
    tot, cnt = 0.0, 0
    for b in range(logits.shape[0]):
        for k in range(logits.shape[1]):
            x, t = float(logits[b, k]), float(y[b, k])
            tot += -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 / (1 + math.exp(x))))
            cnt += 1
    return tot / cnt


def ref_alignment(att1, att2):
    """Official L_act / L_aff with explicit loops: per block the head-mean attention, view 2
    re-ordered by the horizontal-flip token map, element mean of |diff| over batch x blocks x
    entries (what F.l1_loss(reduction='mean') of the stacked (B, L, ...) tensors gives)."""
    L, B, heads = len(att1), att1[0].shape[0], att1[0].shape[1]

    def hm(a, b, i, j):
        return sum(float(a[b, h, i, j]) for h in range(heads)) / heads

    act = aff = 0.0
    for l in range(L):
        for b in range(B):
            for j in range(N_PATCH):
                jj = hflip_token(j)
                act += abs(hm(att1[l], b, 0, 1 + j) - hm(att2[l], b, 0, 1 + jj))
                for i in range(N_PATCH):
                    ii = hflip_token(i)
                    aff += abs(hm(att1[l], b, 1 + i, 1 + j) - hm(att2[l], b, 1 + ii, 1 + jj))
    return act / (L * B * N_PATCH), aff / (L * B * N_PATCH * N_PATCH)


def test_training_loss_defaults_match_official_brute_force():
    model = tiny_model(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([[0.0, 1, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    loss, parts = ACR().loss(model, x, y, dict(TINY), torch.Generator().manual_seed(0))
    with torch.no_grad():      # the reference: two independent forwards, x and its flip
        l1 = model(x)
        a1 = [a.clone() for a in attentions(model.vit)]
        l2 = model(x.flip(-1))
        a2 = [a.clone() for a in attentions(model.vit)]
    act, aff = ref_alignment(a1, a2)
    cls = ref_soft_margin(l1, y) + ref_soft_margin(l2, y)
    assert parts["act"] == pytest.approx(act, rel=1e-9)
    assert parts["aff"] == pytest.approx(aff, rel=1e-9)
    assert parts["cls"] == pytest.approx(cls, rel=1e-9)
    assert loss.item() == pytest.approx(cls + 125 * act + 125 * aff, rel=1e-9)


def test_alignment_hand_computed_hflip_1x2():
    """One block, one head, grid 1 x 2 (tokens: cls, p0, p1); view 2 is the flip, so its
    patches are (p1, p0). Official: mean |A - f^{-1}(A')| over the 2 class-row entries and
    the 4 patch-patch entries."""
    A1 = torch.tensor([[[[0.2, 0.5, 0.3],
                         [0.1, 0.6, 0.3],
                         [0.3, 0.3, 0.4]]]])
    A2 = torch.tensor([[[[0.2, 0.1, 0.7],      # f^-1 of the class row: (0.7, 0.1)
                         [0.0, 0.5, 0.5],      # view token p1' = original p1
                         [0.2, 0.2, 0.6]]]])   # view token p0' = original p0
    la, lf = consistency_losses([A1], [A2], "hflip", (1, 2), (1, 2))
    # class row: |0.5-0.7| + |0.3-0.1| = 0.4 over 2 entries
    assert la.item() == pytest.approx(0.2)
    # f^-1(A'[1:,1:]) = [[0.6, 0.2], [0.5, 0.5]] vs [[0.6, 0.3], [0.3, 0.4]]:
    # 0 + 0.1 + 0.2 + 0.1 = 0.4 over 4 entries
    assert lf.item() == pytest.approx(0.1)


def test_loss_options_keep_paper_forms():
    """The old / paper forms stay reachable and differ from the default."""
    model = tiny_model(2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.zeros(2, 5, dtype=torch.float64)
    y[:, 1] = 1
    g = lambda: torch.Generator().manual_seed(0)   # noqa: E731
    _, d = ACR().loss(model, x, y, dict(TINY), g())
    _, m = ACR().loss(model, x, y, {**TINY, "cls_loss": "mean", "reduction": "row"}, g())
    assert m["cls"] == pytest.approx(d["cls"] / 2, rel=1e-9)
    assert m["act"] == pytest.approx(d["act"] * N_PATCH, rel=1e-9)   # row: sum over keys
    with pytest.raises(ValueError):
        ACR().loss(model, x, y, {**TINY, "cls_loss": "avg"}, g())


# ----------------------------------------------------------------- seeds (Eq. 7 / 8)
def ref_official_maps(model, x, fg, seed_blocks=(1, 2)):
    """Official getam(func='grad') + infer_cam's `A @ M*` with loops:
    M*[j] = ReLU( sum_blocks mean_h ReLU(dy/dA[h,0,1+j]) );
    A[i][j] = sum over ALL blocks of mean_h A[h,1+i,1+j];  M[i] = sum_j A[i][j] M*[j]."""
    model.eval()
    with torch.no_grad():
        model(x)
        att = [a.clone() for a in attentions(model.vit)]
    heads = att[0].shape[1]
    stars, accs = [], []
    for c in fg:
        g = {b: fd_grad_per_head(model, x, b, c) for b in seed_blocks}
        star = []
        for j in range(N_PATCH):
            s = 0.0
            for b in seed_blocks:
                s += sum(max(float(g[b][h, j]), 0.0) for h in range(heads)) / heads
            star.append(max(s, 0.0))
        A = [[sum(sum(float(att[l][0, h, 1 + i, 1 + j]) for h in range(heads)) / heads
                  for l in range(len(att))) for j in range(N_PATCH)] for i in range(N_PATCH)]
        acc = [sum(A[i][j] * star[j] for j in range(N_PATCH)) for i in range(N_PATCH)]
        stars.append(star)
        accs.append(acc)
    return (torch.tensor(stars, dtype=torch.float64).reshape(-1, H, W),
            torch.tensor(accs, dtype=torch.float64).reshape(-1, H, W))


def test_eq7_eq8_defaults_match_official_brute_force():
    model = tiny_model(3)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    fg = [0, 2, 4]
    star, acr = ref_official_maps(model, x, fg)
    out = ACR().maps(model, x, torch.tensor(fg), {})          # {} = official defaults
    assert torch.allclose(out["cams_star"], star, atol=1e-7)
    assert torch.allclose(out["cams"], acr, atol=1e-7)
    # the same through the function's defaults (SMAF's acr teacher calls it that way)
    out2 = acr_maps(model, x, torch.tensor(fg))
    assert torch.allclose(out2["cams"], acr, atol=1e-7)
    # per-head ReLU matters: on this model the official and the paper head reduction differ
    paper = acr_maps(model, x, torch.tensor(fg), grad_head_reduce="mean_then_relu")
    assert not torch.allclose(paper["cams_star"], star, atol=1e-4)


def test_eq8_hand_computed_code_vs_paper():
    """2 patches, M* = (1, 0), A = [[0.9, 0.1], [0.4, 0.6]]:
    code A @ M* = (0.9, 0.4) (each patch averages M* over the keys it attends to);
    paper M* A = (0.9, 0.1) (row vector times matrix)."""
    A = torch.tensor([[0.9, 0.1], [0.4, 0.6]], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose((A @ m.t()).t(), torch.tensor([[0.9, 0.4]], dtype=torch.float64))
    assert torch.allclose(m @ A, torch.tensor([[0.9, 0.1]], dtype=torch.float64))
    # the implementation's two forms on a real model follow the same two products
    model = tiny_model(4)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    code = acr_maps(model, x, torch.tensor([1]))
    paper = acr_maps(model, x, torch.tensor([1]), eq8_form="paper")
    star = code["cams_star"].reshape(1, -1)
    with torch.no_grad():
        model(x)
    att = attentions(model.vit)
    a_all = sum(a[0].mean(0)[1:, 1:] for a in att)
    a_last2 = (att[1][0].mean(0)[1:, 1:] + att[2][0].mean(0)[1:, 1:]) / 2
    assert torch.allclose(code["cams"].reshape(1, -1), (a_all @ star.t()).t(), atol=1e-10)
    assert torch.allclose(paper["cams"].reshape(1, -1), star @ a_last2, atol=1e-10)


def test_removed_affinity_transpose_is_named():
    model = tiny_model(5)
    with pytest.raises(ValueError, match="eq8_form"):
        ACR().maps(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), torch.tensor([0]),
                   {"affinity_transpose": True})
    with pytest.raises(ValueError, match="grad_head_reduce"):
        acr_maps(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), torch.tensor([0]),
                 grad_head_reduce="max")


def bilinear_align_corners(m, oh, ow):
    """(k, h, w) -> (k, oh, ow), bilinear with align_corners=True, by explicit loops."""
    k, h, w = m.shape
    out = torch.zeros(k, oh, ow, dtype=torch.float64)
    for y in range(oh):
        sy = y * (h - 1) / (oh - 1)
        y0 = min(int(math.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for xx in range(ow):
            sx = xx * (w - 1) / (ow - 1)
            x0 = min(int(math.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, y, xx] = ((1 - fy) * ((1 - fx) * m[:, y0, x0] + fx * m[:, y0, x1])
                             + fy * ((1 - fx) * m[:, y1, x0] + fx * m[:, y1, x1]))
    return out


def test_seed_export_matches_official_inference():
    """infer_cam.py: the image resized to a square (crop), passes = flipped and plain, each
    map upsampled to the image (bilinear, align_corners=True), the flipped one flipped back,
    summed, per-class min-max with eps 1e-6. The ACR settings come from params.yaml
    (methods.acr.export_seeds + profiles.voc by_method, with the tiny crop 32)."""
    cfg = load_params()
    p = stage_params(cfg, "voc", "acr", "export_seeds")
    assert p["scales"] == [1.0] and p["flip"] is True and p["align_corners"] is True
    assert p["norm"] == "minmax" and p["norm_eps"] == 1e-6 and p["resize_square"] == 384
    p = {**p, "resize_square": 32}
    model = tiny_model(6).float().eval()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)      # non-square on purpose
    fg = torch.tensor([1, 3])
    got = multiscale_maps(ACR(), model, img, fg, p, torch.device("cpu"))
    from pipeline.data.transforms import to_tensor
    x = F.interpolate(to_tensor(img)[None], size=(32, 32), mode="bilinear", align_corners=False)
    acc = {}
    for flip in (True, False):
        out = ACR().maps(model, x.flip(-1) if flip else x, fg, {})
        for key, m in out.items():
            up = bilinear_align_corners(m.double(), 20, 28)
            acc[key] = acc.get(key, 0) + (up.flip(-1) if flip else up)
    for key, s in acc.items():
        mn = s.flatten(1).min(1).values[:, None, None]
        mx = s.flatten(1).max(1).values[:, None, None]
        ref = (s - mn) / (mx - mn + 1e-6)
        # the export sums and min-maxes in float32: allow its rounding, amplified by
        # max / (max - min) (the Eq. 8 maps of a random net are nearly flat)
        tol = 4 * 1.2e-7 * float((mx / (mx - mn)).max()) + 1e-6
        assert torch.allclose(got[key].double(), ref, atol=tol), key


# ----------------------------------------------------------------- schedule and data
class PSAPolyOptimizer(torch.optim.SGD):
    """PSA / ACR ``torchutils.PolyOptimizer`` semantics: the constructor passes
    ``weight_decay`` positionally into SGD's third slot (momentum); before each step the lr
    is ``base * (1 - step / max_step) ** 0.9``."""

    def __init__(self, params, lr, weight_decay, max_step, power=0.9):
        super().__init__(params, lr, weight_decay)
        self.global_step, self.max_step, self.power, self.base = 0, max_step, power, lr

    def step(self, closure=None):
        if self.global_step < self.max_step:
            for g in self.param_groups:
                g["lr"] = self.base * (1 - self.global_step / self.max_step) ** self.power
        super().step(closure)
        self.global_step += 1


def test_voc_train_cls_profile_is_the_official_schedule():
    cfg = load_params()
    p = stage_params(cfg, "voc", "acr", "train_cls")
    assert p["backbone"]["name"] == "vit_base_r50_s16_384"
    assert p["optimizer"] == "sgd" and p["lr"] == 0.05 and p["poly_power"] == 0.9
    assert p["momentum"] == 5e-4 and p["weight_decay"] == 0 and p["warmup_iters"] == 0
    assert p["batch_size"] == 4 and p["crop"] == 384 and p["resize_long"] == [345, 438]
    assert p["transforms"] == ["hflip"] and p["alpha"] == p["beta"] == 125
    assert p["reduction"] == "mean" and p["cls_loss"] == "sum" and p["loss_layers"] == "all"
    assert p["cls_token_norm"] == "before" and p["amp"] in ("off", False)   # official: fp32
    assert stage_params(cfg, "voc", "acr", "export_seeds")["amp"] in ("off", False)
    assert train_iterations(p, 10582, p["batch_size"]) == 26450    # 2,645 x 10 epochs
    coco = stage_params(cfg, "coco", "acr", "train_cls")
    assert coco["epochs"] == 5 and coco["alpha"] == coco["beta"] == 100
    # other methods keep their schedules
    assert stage_params(cfg, "voc", "afa", "train_cls")["lr"] == 6e-5
    assert "resize_long" not in stage_params(cfg, "voc", "cam", "train_cls")
    assert "align_corners" not in stage_params(cfg, "voc", "cam", "export_seeds")
    # our optimiser + poly_lr reproduce the PSA PolyOptimizer step by step
    torch.manual_seed(0)
    ref_model = torch.nn.Linear(4, 3)
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(ref_model.state_dict())
    ref = PSAPolyOptimizer(ref_model.parameters(), lr=0.05, weight_decay=5e-4, max_step=7)
    opt = make_optimizer(model, p)
    for it in range(7):
        xb = torch.randn(5, 4)
        for mdl, o in ((ref_model, ref), (model, opt)):
            if o is opt:
                for g in o.param_groups:
                    g["lr"] = poly_lr(p["lr"], it, 7, p["poly_power"]) * g["lr_mult"]
            o.zero_grad()
            mdl(xb).pow(2).mean().backward()
            o.step()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_class_token_logits_read_the_last_block_before_the_final_norm():
    """Official ``forward_cls``: a forward hook on the last block stores its output, whose
    class token goes into ``cls_head`` (no final LayerNorm). Reference: the same hook on a
    model built with ``cls_token_norm: after`` (timm's head after ``norm``) and the same
    weights."""
    torch.manual_seed(0)
    before = ACR().build_model(dict(TINY), 5).double().eval()
    after = ACR().build_model({**TINY, "cls_token_norm": "after"}, 5).double().eval()
    missing = after.load_state_dict(before.state_dict(), strict=False)
    assert set(missing.missing_keys) == {"vit.norm.weight", "vit.norm.bias"}
    with torch.no_grad():
        after.vit.norm.weight.uniform_(0.5, 1.5)   # a final norm that is not the identity
        after.vit.norm.bias.uniform_(-0.5, 0.5)
    seen = {}
    after.vit.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(out=o))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want_after = after(x)
        tok = seen["out"][:, 0]                                   # (B, D) before the norm
        head = after.vit.head
        assert torch.allclose(want_after, head(after.vit.norm(seen["out"])[:, 0]), atol=1e-12)
        assert torch.allclose(before(x), head(tok), atol=1e-12)   # the official logits
        assert not torch.allclose(before(x), want_after, atol=1e-3)
    with pytest.raises(ValueError, match="cls_token_norm"):
        ACR().build_model({**TINY, "cls_token_norm": "middle"}, 5)


def test_an_acr_checkpoint_from_before_cls_token_norm_loads_with_its_final_norm(tmp_path):
    """Checkpoints written before the option have ``vit.norm.*`` and no ``cls_token_norm``
    key: they load as ``after`` (timm's head after the norm), giving the logits they were
    trained with; new checkpoints load as written."""
    from pipeline.steps.cls import load_classifier
    torch.manual_seed(0)
    old = ACR().build_model({**TINY, "cls_token_norm": "after"}, 5).eval()
    torch.save({"state_dict": old.state_dict(), "params": dict(TINY), "method": "acr",
                "num_classes": 5}, tmp_path / "old.pt")
    _, model, _ = load_classifier(tmp_path / "old.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), old(x))
    new = ACR().build_model(dict(TINY), 5).eval()
    torch.save({"state_dict": new.state_dict(), "params": dict(TINY), "method": "acr",
                "num_classes": 5}, tmp_path / "new.pt")
    _, model2, _ = load_classifier(tmp_path / "new.pt")
    assert isinstance(model2.vit.norm, torch.nn.Identity)


def test_resize_long_draws_the_long_side(monkeypatch):
    """Long side uniform over the inclusive integer range, aspect kept, then crop (pad)."""
    from pipeline.data import datasets as ds_mod
    monkeypatch.setattr(ds_mod, "load_image", lambda root, iid: np.full((30, 60, 3), 255, np.uint8))
    ds = ds_mod.ClassificationDataset("unused", ["a"] * 40, {"a": [1]}, crop=48,
                                      scale_range=None, hflip=False, resize_long=(40, 44))
    longs = set()
    for i in range(len(ds)):
        x, _, _ = ds[i]
        fg = x[0] > 1.0                       # white pixels; padding is ~0 after normalisation
        rows, cols = fg.any(1).sum().item(), fg.any(0).sum().item()
        assert 40 <= cols <= 44 and abs(rows - cols / 2) <= 1
        longs.add(cols)
    assert longs == {40, 41, 42, 43, 44}
    assert train_iterations({"iters": 7, "epochs": 3}, 100, 4) == 7
    with pytest.raises(ValueError):
        train_iterations({"iters": None}, 100, 4)


def test_acr_crf_alphas_follow_the_official_code():
    cfg = load_params()
    for d in ("voc", "demo", "coco"):
        p = stage_params(cfg, d, "acr", "train_affinity")
        assert (p["alpha_low"], p["alpha_high"]) == (1, 12)
    p = stage_params(cfg, "voc", "cam", "train_affinity")
    assert (p["alpha_low"], p["alpha_high"]) == (4, 32)      # PSA's, for the other methods
