"""Tests of pipeline.steps.refine.crf (dense CRF wrapper and PSA CRF labels)."""
import numpy as np
import pytest

from pipeline.steps.refine.crf import (PSA_CRF, background_from_cams, crf_label_from_cams,
                                 dense_crf)


def _two_region_image(h=40, w=60, seed=0):
    """Left half reddish, right half bluish (mild noise); returns image and region mask."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), bool)
    mask[:, w // 2:] = True
    img[~mask] = (200, 40, 40)
    img[mask] = (40, 40, 200)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def test_output_is_distribution():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    probs = rng.random((4, 20, 30)).astype(np.float32)
    q = dense_crf(img, probs)
    assert q.shape == (4, 20, 30) and q.dtype == np.float32
    assert (q >= 0).all() and (q <= 1 + 1e-6).all()
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(gaussian_compat=0, bilateral_compat=0), dict(iters=0)])
def test_no_pairwise_equals_normalised_input(kw):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    probs = rng.random((3, 17, 23)).astype(np.float32)
    probs[0, :3, :3] = 0.0  # exercises the 1e-5 clip
    q = dense_crf(img, probs, **kw)
    ref = np.clip(probs, 1e-5, 1)
    ref = ref / ref.sum(0)
    np.testing.assert_allclose(q, ref, atol=1e-5)


def test_crf_cleans_noisy_labels_along_colour_regions():
    img, mask = _two_region_image()
    rng = np.random.default_rng(3)
    noisy = mask ^ (rng.random(mask.shape) < 0.3)           # 30 % of labels flipped
    p1 = np.where(noisy, 0.65, 0.35).astype(np.float32)
    probs = np.stack([1 - p1, p1])
    acc_in = (probs.argmax(0) == mask).mean()
    q = dense_crf(img, probs, **PSA_CRF)
    acc_out = (q.argmax(0) == mask).mean()
    assert acc_in < 0.75
    assert acc_out > 0.97 and acc_out > acc_in + 0.2


def test_background_from_cams_hand_values():
    cams = np.array([[[0.5, 0.0, 0.2]], [[0.2, 1.0, 0.1]]], np.float32)  # (2, 1, 3)
    out = background_from_cams(cams, alpha=2)
    assert out.shape == (3, 1, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [0.25, 0.0, 0.64], atol=1e-6)
    np.testing.assert_allclose(out[1:], cams)
    np.testing.assert_allclose(background_from_cams(cams, 0)[0], 1.0)
    empty = background_from_cams(np.zeros((0, 2, 2), np.float32), 4)
    assert empty.shape == (1, 2, 2) and (empty == 1).all()


def test_crf_label_maps_channels_to_class_ids():
    img, _ = _two_region_image(h=30, w=60)
    cams = np.zeros((2, 30, 60), np.float32)
    cams[0, :, :20] = 0.9       # channel 0 -> class 15
    cams[1, :, 40:] = 0.8       # channel 1 -> class 3
    lab = crf_label_from_cams(img, cams, [15, 3], alpha=4, crf=dict(iters=0))
    assert lab.dtype == np.uint8 and lab.shape == (30, 60)
    assert (lab[:, :20] == 15).all() and (lab[:, 40:] == 3).all() and (lab[:, 20:40] == 0).all()
    lab_crf = crf_label_from_cams(img, cams, [15, 3], alpha=4)  # default PSA CRF
    assert set(np.unique(lab_crf)) <= {0, 3, 15}
    assert (lab_crf[:, :10] == 15).mean() > 0.9 and (lab_crf[:, 50:] == 3).mean() > 0.9
    assert (crf_label_from_cams(img, cams[:0], [], alpha=4) == 0).all()


def test_validation_errors():
    img = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="probs must have shape"):
        dense_crf(img, np.ones((2, 10, 11), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(img.astype(np.float32), np.ones((2, 10, 12), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        dense_crf(img[..., 0], np.ones((2, 10, 12), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        dense_crf(img, np.full((2, 10, 12), np.nan, np.float32))
    with pytest.raises(ValueError, match="class ids"):
        crf_label_from_cams(img, np.ones((2, 10, 12), np.float32), [1], alpha=4)
    with pytest.raises(ValueError, match="unknown crf keys"):
        crf_label_from_cams(img, np.ones((1, 10, 12), np.float32), [1], alpha=4,
                            crf={"sxy": 3})
    with pytest.raises(ValueError):
        background_from_cams(np.ones((10, 12), np.float32), 4)
