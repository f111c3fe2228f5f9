"""SMAF (Eq. 5-9) against per-pixel loops and an independent bilinear resize."""
import numpy as np
import pytest
import torch

from pipeline.steps.cls import load_classifier, make_optimizer
from pipeline.methods import get_method
from pipeline.methods.smaf import (SMAF, denoise, fuse_maps, fused_teacher_targets, mac_loss,
                                   reactivate, student_maps)
from vit_reference import tiny_vit

# the crop form (targets fused on the batch itself) unless a test says otherwise
TINY = {"backbone": tiny_vit(patch=8, dim=24, depth=2), "teacher_targets": "crop"}


def bilinear(img, oh, ow, align_corners=False):
    """Reference bilinear resize of a 2-D numpy array: half-pixel centres with edge clamp, or
    (``align_corners``) the corner pixels aligned."""
    ih, iw = img.shape
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            if align_corners:
                y = i * (ih - 1) / (oh - 1) if oh > 1 else 0.0
                x = j * (iw - 1) / (ow - 1) if ow > 1 else 0.0
            else:
                y = max((i + 0.5) * ih / oh - 0.5, 0.0)
                x = max((j + 0.5) * iw / ow - 0.5, 0.0)
            y0, x0 = min(int(y), ih - 1), min(int(x), iw - 1)
            y1, x1 = min(y0 + 1, ih - 1), min(x0 + 1, iw - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * (1 - dx) * img[y0, x0] + (1 - dy) * dx * img[y0, x1]
                         + dy * (1 - dx) * img[y1, x0] + dy * dx * img[y1, x1])
    return out


def ref_fuse(maps, size):
    B, K = maps[0].shape[:2]
    out = np.zeros((B, K) + size)
    for b in range(B):
        for k in range(K):
            acc = sum(bilinear(m[b, k].numpy().astype(np.float64), *size) for m in maps)  # Eq. 6
            out[b, k] = acc / (acc.max() + 1e-5)                                      # Eq. 5
    return out


def ref_reactivate(f, thr):
    B, K, h, w = f.shape
    out = np.zeros((B, K + 1, h, w))
    for b in range(B):
        for i in range(h):
            for j in range(w):
                v = [thr] + [f[b, k, i, j] for k in range(K)]
                m = max(v)                                                            # Eq. 8
                out[b, :, i, j] = [vv / m for vv in v]
    return out


def test_fuse_denoise_reactivate_against_loops():
    torch.manual_seed(0)
    maps = [torch.rand(2, 3, 3, 3), torch.rand(2, 3, 6, 6), torch.rand(2, 3, 9, 9),
            torch.rand(2, 3, 12, 12)]
    f = fuse_maps(maps, (6, 6))
    assert np.allclose(f.numpy(), ref_fuse(maps, (6, 6)), atol=1e-5)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    d = denoise(f, y)
    ref_d = ref_fuse(maps, (6, 6)) * np.array([[1, 0, 1], [0, 1, 0]])[:, :, None, None]
    assert np.allclose(d.numpy(), ref_d, atol=1e-5)
    r = reactivate(d, 0.2)
    assert np.allclose(r.numpy(), ref_reactivate(ref_d, 0.2), atol=1e-5)
    assert torch.allclose(r.amax(1), torch.ones(2, 6, 6))
    with pytest.raises(ValueError):
        reactivate(d, 0.0)


def test_mac_loss_by_hand():
    torch.manual_seed(1)
    t, s = torch.rand(2, 4, 3, 5), torch.rand(2, 4, 3, 5)
    ref = 0.0
    for b in range(2):
        per_k = [sum((t[b, k, i, j].item() - s[b, k, i, j].item()) ** 2
                     for i in range(3) for j in range(5)) / 15 for k in range(4)]
        ref += sum(per_k) / 4                                                        # Eq. 9
    assert mac_loss(t, s).item() == pytest.approx(ref / 2, rel=1e-6)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cam = get_method("cam")
    model = cam.build_model(TINY, 5)
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    torch.save({"state_dict": model.state_dict(), "params": TINY, "method": "cam",
                "num_classes": 5}, path)
    return path


def test_fused_targets_match_per_image_teacher_maps(teacher_ckpt):
    """Batched teacher path vs CAM.maps image by image, scale by scale, flips undone by hand."""
    cam, teacher, _ = load_classifier(teacher_ckpt)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    scales, thr = [0.5, 1.0, 1.5], 0.2
    got = fused_teacher_targets(cam, teacher, x, y, (4, 4), scales=scales, flip=True,
                                reactivate_thr=thr)
    per_pass = []
    for s in scales:
        side = int(round(32 * s / 8)) * 8
        xs = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear",
                                             align_corners=False)
        for fl in (False, True):
            m = torch.stack([cam.maps(teacher, (xs[b:b + 1].flip(-1) if fl else xs[b:b + 1]),
                                      torch.arange(5), {})["cams"] for b in range(2)])
            per_pass.append(m.flip(-1) if fl else m)
    ref = ref_fuse(per_pass, (4, 4)) * y.numpy()[:, :, None, None]
    ref = ref_reactivate(ref, thr)[:, 1:]
    assert np.allclose(got.numpy(), ref, atol=1e-5)
    # ablations: single scale without flip, no reactivation = denoised max-normalised CAM
    single = fused_teacher_targets(cam, teacher, x, y, (4, 4), scales=[1.0], flip=False,
                                   reactivate_thr=None)
    m1 = torch.stack([cam.maps(teacher, x[b:b + 1], torch.arange(5), {})["cams"] for b in range(2)])
    ref1 = (m1 / (m1.flatten(2).amax(-1)[..., None, None] + 1e-5)) * y[:, :, None, None]
    assert torch.allclose(single, ref1, atol=1e-5)


def test_student_starts_from_teacher_and_loss_trains_student_only(teacher_ckpt):
    _, teacher, _ = load_classifier(teacher_ckpt)
    m = SMAF()
    p = {**TINY, "teacher": "cam", "teacher_scales": [0.5, 1.0], "alpha": 100.0}
    student = m.build_model(p, 5)
    m.setup(student, p, {"teacher": load_classifier(teacher_ckpt)})
    x = torch.randn(2, 3, 32, 32)
    fg = torch.tensor([0, 3])
    assert torch.allclose(m.maps(student.eval(), x[:1], fg, {})["cams"],
                          get_method("cam").maps(teacher, x[:1], fg, {})["cams"], atol=1e-5)
    student.train()
    y = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    # the paper's Eq. 1 (cls_weight 1) adds L_cls; the official student step (default 0) has
    # loss_cls commented out and trains on 100 * loss_cam alone
    loss, parts = m.loss(student, x, y, {**p, "cls_weight": 1.0}, torch.Generator())
    assert loss.item() == pytest.approx(parts["cls"] + 100.0 * parts["mac"], rel=1e-5)
    official, op = m.loss(student, x, y, p, torch.Generator())
    assert op["cls"] > 0 and official.item() == pytest.approx(100.0 * op["mac"], rel=1e-6)
    loss.backward()
    assert student.classifier.weight.grad.abs().sum() > 0
    assert all(q.grad is None for q in m.teacher[1].parameters())
    _, mo = student_maps(student, x)
    assert mo.shape == (2, 5, 4, 4) and mo.amax((-2, -1)).max() <= 1.0
    with pytest.raises(ValueError, match="teacher"):
        SMAF().setup(m.build_model({**p, "teacher": "acr"}, 5), {**p, "teacher": "acr"},
                     {"teacher": load_classifier(teacher_ckpt)})
    with pytest.raises(FileNotFoundError):
        SMAF().setup(student, p, {})


def test_sgd_option():
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model, {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                                 "weight_decay": 5e-4})
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert isinstance(make_optimizer(model, {"lr": 1e-3}), torch.optim.AdamW)
    with pytest.raises(ValueError):
        make_optimizer(model, {"optimizer": "lbfgs", "lr": 1})


def test_acr_teacher_per_image_path(tmp_path):
    """A non-CAM teacher (acr, gradient maps) goes through its own maps() per image; the
    student copies its trunk and class-token head."""
    from pipeline.methods.acr import acr_maps
    torch.manual_seed(4)
    acr = get_method("acr")
    path = tmp_path / "acr.pt"
    torch.save({"state_dict": acr.build_model(TINY, 5).state_dict(), "params": TINY,
                "method": "acr", "num_classes": 5}, path)
    _, teacher, _ = load_classifier(path)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[0.0, 1, 0, 0, 1], [0, 0, 0, 1, 0]])
    got = fused_teacher_targets(acr, teacher, x, y, (4, 4), scales=[1.0], flip=False,
                                reactivate_thr=None, key="cams_star")
    for b in range(2):
        fg = y[b].nonzero().flatten()
        m = acr_maps(teacher, x[b:b + 1], fg)["cams_star"]
        ref = m / (m.flatten(1).amax(-1)[:, None, None] + 1e-5)
        assert torch.allclose(got[b, fg], ref, atol=1e-5)
        absent = (y[b] == 0).nonzero().flatten()
        assert got[b, absent].abs().max() == 0
    m = SMAF()
    p = {**TINY, "teacher": "acr", "teacher_key": "cams_star", "teacher_scales": [1.0]}
    student = m.build_model(p, 5)
    m.setup(student, p, {"teacher": load_classifier(path)})
    assert torch.equal(student.classifier.weight, teacher.vit.head.weight)
    loss, parts = m.loss(student, x, y, p, torch.Generator())
    assert torch.isfinite(loss) and parts["mac"] > 0


def test_a_cnn_teacher_cannot_initialise_the_vit_student(tmp_path):
    """vocsample's cam teacher is a CNN CAM (`arch: cnn`): init_from_teacher names the fix;
    without it the student trains from its own initialisation."""
    import pytest
    from pipeline.models.cnn_cam import CNNCAM
    cam = get_method("cam")
    cnn = {"arch": "cnn", "head": "gap", "freeze": False, "output_stride": None,
           "backbone": {"name": "resnet10t", "pretrained": None, "overrides": None}}
    torch.manual_seed(0)
    model = cam.build_model(cnn, 5)
    assert isinstance(model, CNNCAM)
    torch.save({"state_dict": model.state_dict(), "params": cnn, "method": "cam",
                "num_classes": 5}, tmp_path / "cnn.pt")
    m = SMAF()
    p = {**TINY, "teacher": "cam", "teacher_scales": [1.0]}
    with pytest.raises(ValueError, match="init_from_teacher: false"):
        m.setup(m.build_model(p, 5), p, {"teacher": load_classifier(tmp_path / "cnn.pt")})
    q = {**p, "init_from_teacher": False}
    m.setup(m.build_model(q, 5), q, {"teacher": load_classifier(tmp_path / "cnn.pt")})
    # ... and its targets come from the CNN's maps at the CNN's stride (32 px here): the
    # 64 px crop is one 2 x 2 map cell grid, fused onto the student's 8 x 8 token grid
    cam_t, teacher, _ = load_classifier(tmp_path / "cnn.pt")
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    got = fused_teacher_targets(cam_t, teacher, x, y, (8, 8), scales=[1.0], flip=False,
                                reactivate_thr=None)
    m1 = torch.stack([cam_t.maps(teacher, x[b:b + 1], torch.arange(5), {})["cams"] for b in range(2)])
    assert m1.shape[-2:] == (2, 2)
    ref = torch.nn.functional.interpolate(m1, size=(8, 8), mode="bilinear", align_corners=False)
    ref = ref / (ref.flatten(2).amax(-1)[..., None, None] + 1e-5) * y[:, :, None, None]
    assert got.shape == (2, 5, 8, 8)
    assert torch.allclose(got, ref, atol=1e-5)


# ------------------------- official student loss (issue 14; bupt-ai-cz/SMAF adaptation_modelv2.py)

def test_student_softmax_with_background_matches_pixel_loops(teacher_ckpt):
    """Default student_target softmax_bg: student map = per-pixel softmax over K+1 channels
    (background included, official ``F.softmax(cam, dim=1)`` over the EPS net's 21 outputs),
    compared by MSE with the reactivated target INCLUDING its background channel
    (``rectified = cat(fg * label, 0.2) / max``), mean over B x (K+1) x h x w."""
    import math
    from pipeline.methods.smaf import student_maps_bg
    from pipeline.models.vit import patch_tokens
    m = SMAF()
    p = {**TINY, "teacher": "cam", "teacher_scales": [1.0], "teacher_flip": False, "alpha": 100.0}
    torch.manual_seed(2)
    student = m.build_model(p, 5)
    assert student.bg_classifier.weight.shape == (1, 24)
    m.setup(student, p, {"teacher": load_classifier(teacher_ckpt)})
    with torch.no_grad():
        student.bg_classifier.weight.normal_()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    logits, P = student_maps_bg(student, x)
    assert P.shape == (2, 6, 4, 4)
    with torch.no_grad():
        _, f = patch_tokens(student.vit, x)
        W = torch.cat([student.bg_classifier.weight, student.classifier.weight]).double()
        ref = torch.zeros(2, 6, 16, dtype=torch.float64)
        for b in range(2):
            for n in range(16):
                z = [float(W[c] @ f[b, n].double()) for c in range(6)]
                s = sum(math.exp(v) for v in z)
                for c in range(6):
                    ref[b, c, n] = math.exp(z[c]) / s
    torch.testing.assert_close(P.double(), ref.reshape(2, 6, 4, 4), atol=1e-5, rtol=1e-5)
    # the loss: target with the background channel, by loops
    tgt = m.targets(x, y, (4, 4), p, keep_background=True)
    assert tgt.shape == (2, 6, 4, 4)
    torch.testing.assert_close(tgt[:, 1:], m.targets(x, y, (4, 4), p))
    fraw = m.targets(x, y, (4, 4), {**p, "reactivate": False})     # denoised F, no Eq. 8
    for b in range(2):
        for i in range(4):
            for j in range(4):
                v = [0.2] + [float(fraw[b, c, i, j]) for c in range(5)]
                for c in range(6):
                    assert float(tgt[b, c, i, j]) == pytest.approx(v[c] / max(v), rel=1e-5, abs=1e-7)
    loss, parts = m.loss(student, x, y, p, torch.Generator())
    mse = sum((float(P[b, c, i, j]) - float(tgt[b, c, i, j])) ** 2 for b in range(2)
              for c in range(6) for i in range(4) for j in range(4)) / (2 * 6 * 16)
    assert parts["mac"] == pytest.approx(mse, rel=1e-4)
    loss.backward()
    assert student.bg_classifier.weight.grad.abs().sum() > 0
    # the old option: ReLU(WF)/max against the K foreground channels only
    pf = {**p, "student_target": "foreground"}
    st2 = m.build_model(pf, 5)
    assert getattr(st2, "bg_classifier", None) is None
    m.setup(st2, pf, {"teacher": load_classifier(teacher_ckpt)})
    _, parts2 = m.loss(st2, x, y, pf, torch.Generator())
    _, mo = student_maps(st2, x)
    assert parts2["mac"] == pytest.approx(mac_loss(m.targets(x, y, (4, 4), pf), mo).item(), rel=1e-5)
    with pytest.raises(ValueError, match="student_target"):
        m.build_model({**p, "student_target": "softmax"}, 5)
    with pytest.raises(ValueError, match="reactivate"):
        m.loss(student, x, y, {**p, "reactivate": False}, torch.Generator())
    with pytest.raises(ValueError, match="bg_classifier"):
        student_maps_bg(st2, x)


def test_student_head_default_gap_is_official_eps_pooling():
    """Default student_head gap = official smaf/models/EPS.py Net.forward ``pred =
    F.avg_pool2d(cam, kernel_size=(h, w))``: each class logit is the mean over the token grid
    of the CAM ``W F`` (by loops); ``gmp`` (old default) applies W to the per-channel max of
    the tokens instead. params.yaml's voc and demo profiles use gap."""
    from pipeline.io.config import load_params, stage_params
    from pipeline.methods.smaf import student_maps_bg
    from pipeline.models.vit import patch_tokens
    cfg = load_params()
    for prof in ("voc", "demo"):
        assert stage_params(cfg, prof, "smaf", "train_cls")["student_head"] == "gap", prof
    m = SMAF()
    p = {**TINY, "teacher": "cam"}
    assert "student_head" not in p
    torch.manual_seed(3)
    student = m.build_model(p, 5).eval()
    assert student.head_type == "gap"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, f = patch_tokens(student.vit, x)                       # (2, 16, 24)
        W = student.classifier.weight.double()
        cam = [[[float(W[c] @ f[b, n].double()) for n in range(16)] for c in range(5)]
               for b in range(2)]
        mean = torch.tensor([[sum(cam[b][c]) / 16 for c in range(5)] for b in range(2)],
                            dtype=torch.float64)
        fmax = [[max(float(f[b, n, d]) for n in range(16)) for d in range(24)] for b in range(2)]
        mx = torch.tensor([[sum(float(W[c, d]) * fmax[b][d] for d in range(24)) for c in range(5)]
                           for b in range(2)], dtype=torch.float64)
        logits_bg, _ = student_maps_bg(student, x)                # default student_target
        logits_fg, _ = student_maps(student, x)                   # foreground option
        torch.testing.assert_close(logits_bg.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_fg.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(student(x).double(), mean, rtol=1e-5, atol=1e-5)
        gmp = m.build_model({**p, "student_head": "gmp"}, 5).eval()
        gmp.load_state_dict(student.state_dict())
        torch.testing.assert_close(student_maps_bg(gmp, x)[0].double(), mx, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mean, mx)
    with pytest.raises(ValueError, match="student_head"):
        m.build_model({**p, "student_head": "avg"}, 5)
