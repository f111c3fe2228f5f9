"""SMAF's offline teacher targets (``teacher_targets: image``, official bupt-ai-cz/SMAF
``gen_fused_cam.py`` + ``data/VOC_dataset.py: transform_with_mask`` + ``models/
adaptation_modelv2.py: step``) against loop references: the crop geometry of the dataset,
the cropped / flipped / downsampled target, the student's upsampling before the softmax, and the
maps stored per image."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datasets import ClassificationDataset
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from pipeline.data.voc import load_image
from pipeline.methods import get_method
from pipeline.methods.smaf import SMAF, crop_like_image, teacher_input
from pipeline.models.vit import patch_tokens
from pipeline.steps.cls import load_classifier
from test_smaf import TINY, bilinear, ref_fuse, ref_reactivate

IMAGE = {**TINY, "teacher_targets": "image"}


def resize_corners(img, oh, ow):
    """Reference bilinear resize with ``align_corners=True`` (corner pixels aligned)."""
    return bilinear(img, oh, ow, align_corners=True)


def ref_crop(m, geo, crop):
    """transform_with_mask on one stored map: resize to the rescaled image, flip, read the
    crop's pixels, 0 outside the image."""
    _, nh, nw, flip, dy, dx = geo
    up = bilinear(m, nh, nw)
    if flip:
        up = up[:, ::-1]
    out = np.zeros((crop, crop))
    for r in range(crop):
        for c in range(crop):
            if 0 <= r + dy < nh and 0 <= c + dx < nw:
                out[r, c] = up[r + dy, c + dx]
    return out


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = get_method("cam").build_model(TINY, 5)
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    torch.save({"state_dict": model.state_dict(), "params": TINY, "method": "cam",
                "num_classes": 5}, path)
    return path


def _images(root, sizes):
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = []
    for k, (h, w) in enumerate(sizes):
        ids.append(f"im{k}")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"im{k}.png")
        Image.open(root / "JPEGImages" / f"im{k}.png").convert("RGB").save(
            root / "JPEGImages" / f"im{k}.jpg", quality=95)
    return ids


@pytest.mark.parametrize("crop", [24, 48])
def test_dataset_geometry_locates_every_crop_pixel(tmp_path, crop):
    ids = _images(tmp_path, [(30, 40)])
    ds = ClassificationDataset(tmp_path, ids, {"im0": [1]}, crop=crop, scale_range=(1.0, 1.0),
                               extra_views="geometry")
    image = load_image(tmp_path, "im0").astype(np.float64)
    flips = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        x, _, i, extra = ds[0]
        geo = extra["geometry"]
        assert geo.dtype == torch.int64 and geo.shape == (6,) and int(geo[0]) == i == 0
        assert tuple(geo[1:3].tolist()) == (30, 40)
        flips.add(int(geo[3]))
        rgb = (x.numpy() * np.array(IMAGENET_STD)[:, None, None]
               + np.array(IMAGENET_MEAN)[:, None, None]) * 255
        for ch in range(3):
            want = ref_crop(image[..., ch], geo.tolist(), crop)
            inside = ref_crop(np.ones((30, 40)), geo.tolist(), crop) > 0
            assert inside.any()
            np.testing.assert_allclose(rgb[ch][inside], want[inside], atol=1e-3)
        got = crop_like_image(torch.from_numpy(image.transpose(2, 0, 1)).float(), geo, (crop, crop))
        np.testing.assert_allclose(got.numpy()[:, inside], rgb[:, inside], atol=1e-3)
        assert (got.numpy()[:, ~inside] == 0).all()
    assert flips == {0, 1}
    ds2 = ClassificationDataset(tmp_path, ids, {"im0": [1]}, crop=crop, scale_range=(2.0, 2.0),
                                extra_views="geometry")
    assert tuple(ds2[0][3]["geometry"][1:3].tolist()) == (60, 80)
    with pytest.raises(ValueError, match="vflip"):
        ClassificationDataset(tmp_path, ids, {"im0": [1]}, crop=crop, vflip=True,
                              extra_views="geometry")


def test_offline_targets_match_the_official_transform(teacher_ckpt):
    m = SMAF()
    rng = np.random.default_rng(4)
    stored = rng.random((2, 10, 13)).astype(np.float32)          # classes 0 and 3 of K = 5
    m.offline = {7: (torch.tensor([0, 3]), torch.from_numpy(stored).half())}
    geo = [7, 50, 65, 1, 5, -3]        # rescaled to 50 x 65, flipped, crop starts 3 px left
    y = torch.tensor([[1.0, 0, 0, 1, 0]])
    got = m.offline_targets(torch.tensor([geo]), y, (8, 8), IMAGE, keep_background=True)
    ref = np.zeros((1, 5, 8, 8))
    for k, c in enumerate((0, 3)):
        full = ref_crop(stored[k].astype(np.float16).astype(np.float64), geo, 32)
        ref[0, c] = resize_corners(full, 8, 8)           # scale_factor 0.25, align_corners
    ref = ref_reactivate(ref, 0.2)                       # background first, / max
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)
    assert (got[0, 0, :, 0] == 1).all()                  # the padded column: background
    fg_only = m.offline_targets(torch.tensor([geo]), y, (8, 8), IMAGE)
    torch.testing.assert_close(fg_only, got[:, 1:])
    # a class not in the labels is zeroed (denoise), the stored channel notwithstanding
    y2 = torch.tensor([[1.0, 0, 0, 0, 0]])
    assert (m.offline_targets(torch.tensor([geo]), y2, (8, 8), {**IMAGE, "reactivate": False})[0, 3] == 0).all()
    with pytest.raises(RuntimeError, match="setup_data"):
        SMAF().offline_targets(torch.tensor([geo]), y, (8, 8), IMAGE)


def test_loss_upsamples_the_student_before_the_softmax(teacher_ckpt):
    m = SMAF()
    torch.manual_seed(3)
    student = m.build_model(IMAGE, 5)
    m.setup(student, IMAGE, {"teacher": load_classifier(teacher_ckpt)})
    with torch.no_grad():
        student.bg_classifier.weight.normal_()
    m.offline = {0: (torch.tensor([1]), torch.rand(1, 8, 8).half())}
    geo = torch.tensor([[0, 32, 32, 0, 0, 0]])
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([[0, 1.0, 0, 0, 0]])
    loss, parts = m.loss(student, x, y, IMAGE, torch.Generator(), geometry=geo)
    with torch.no_grad():
        _, f = patch_tokens(student.vit, x)                        # (1, 16, D): 4 x 4 tokens
        w = torch.cat([student.bg_classifier.weight, student.classifier.weight]).double()
        z = (f[0].double() @ w.T).T.reshape(6, 4, 4).numpy()
    up = np.stack([resize_corners(z[c], 8, 8) for c in range(6)])   # before the softmax
    p = np.exp(up) / np.exp(up).sum(0, keepdims=True)
    tgt = m.offline_targets(geo, y, (8, 8), IMAGE, keep_background=True)[0].numpy()
    assert parts["mac"] == pytest.approx(float(((p - tgt) ** 2).mean()), rel=1e-4)
    assert loss.item() == pytest.approx(100.0 * parts["mac"], rel=1e-5)
    with pytest.raises(ValueError, match="geometry"):
        m.loss(student, x, y, IMAGE, torch.Generator())
    with pytest.raises(ValueError, match="teacher_targets"):
        m.loss(student, x, y, {**IMAGE, "teacher_targets": "batch"}, torch.Generator())
    assert m.extra_views(IMAGE) == "geometry" and m.extra_views(TINY) is None


def test_setup_data_fuses_each_whole_image_in_the_teachers_statistics(tmp_path, teacher_ckpt):
    ids = _images(tmp_path, [(40, 56), (24, 36)])
    labels = {"im0": [1, 4], "im1": [3]}
    ds = ClassificationDataset(tmp_path, ids, labels, crop=32, num_classes=6,
                               extra_views="geometry")
    p = {**IMAGE, "teacher_scales": [0.5, 1.0], "teacher_flip": True}
    m = SMAF()
    m.setup(m.build_model(p, 5), p, {"teacher": load_classifier(teacher_ckpt)})
    cam, teacher = m.teacher
    teacher.input_norm = ((0.5,) * 3, (0.5,) * 3)      # the teacher's own statistics
    m.setup_data(p, ds, "cpu")
    assert sorted(m.offline) == [0, 1]
    for i, iid in enumerate(ids):
        img = load_image(tmp_path, iid)
        x = to_tensor(img, (0.5,) * 3, (0.5,) * 3)[None]
        H, W = img.shape[:2]
        per_pass = []
        for s in (0.5, 1.0):
            size = (max(8, int(round(H * s / 8)) * 8), max(8, int(round(W * s / 8)) * 8))
            xs = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for fl in (False, True):
                mm = cam.maps(teacher, xs.flip(-1) if fl else xs, torch.arange(5), {})["cams"][None]
                per_pass.append(mm.flip(-1) if fl else mm)
        ref = ref_fuse(per_pass, (math.ceil(H / 4), math.ceil(W / 4)))[0]
        fg, maps = m.offline[i]
        assert fg.tolist() == [c - 1 for c in labels[iid]] and maps.dtype == torch.float16
        np.testing.assert_allclose(maps.float().numpy(), ref[fg.numpy()], atol=2e-3)
    m.setup_data({**p, "teacher_targets": "crop"}, ds, "cpu")
    assert m.offline is None


def test_teacher_input_converts_the_statistics():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    s, t = torch.nn.Module(), torch.nn.Module()
    s.input_norm = (IMAGENET_MEAN, IMAGENET_STD)
    t.input_norm = ((0.5,) * 3, (0.5,) * 3)
    x = to_tensor(img)[None]
    torch.testing.assert_close(teacher_input(x, s, t), to_tensor(img, (0.5,) * 3, (0.5,) * 3)[None],
                               atol=1e-5, rtol=0)
    assert teacher_input(x, s, s) is x


def test_crop_form_feeds_the_teacher_its_own_statistics(teacher_ckpt):
    """teacher_targets: crop fuses on the batch itself, converted to the teacher's statistics."""
    m = SMAF()
    torch.manual_seed(5)
    p = {**TINY, "student_target": "foreground", "teacher_scales": [1.0], "teacher_flip": False}
    student = m.build_model(p, 5)
    m.setup(student, p, {"teacher": load_classifier(teacher_ckpt)})
    m.teacher[1].input_norm = ((0.5,) * 3, (0.5,) * 3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    _, parts = m.loss(student, x, y, p, torch.Generator())
    from pipeline.methods.smaf import mac_loss, student_maps
    _, mo = student_maps(student, x)
    want = mac_loss(m.targets(teacher_input(x, student, m.teacher[1]), y, (4, 4), p), mo).item()
    unconverted = mac_loss(m.targets(x, y, (4, 4), p), mo).item()
    assert parts["mac"] == pytest.approx(want, rel=1e-5) and abs(want - unconverted) > 1e-6
