"""Own segmentation head evaluation (pipeline/steps/own_seg.py, stage eval_own_seg): test-time
augmentation against a hand construction, null result for methods without a head, and the
gathering into miou.json's stages."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.steps.own_seg import evaluate_own_seg, predict_own


class _Vit(nn.Module):
    class _PE(nn.Module):
        def feat_ratio(self):
            return 4
    patch_embed = _PE()


class _Model(nn.Module):
    vit = _Vit()


class _Method:
    """segment(): a fixed linear function of the input, so flips and scales are visible."""
    def segment(self, model, x, p):
        t = F.avg_pool2d(x, 4)                               # (1, 3, h, w)
        return torch.cat([t, -t[:, :1] + torch.arange(t.shape[-1]).float()], 1)   # 4 "classes"


def test_predict_own_flip_mean_and_scale_max():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
    meth, model = _Method(), _Model()
    from pipeline.data.transforms import to_tensor
    x = to_tensor(img)[None]

    def one(s):
        h, w = int(round(16 * s / 4)) * 4, int(round(24 * s / 4)) * 4
        xs = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        a = F.interpolate(meth.segment(None, xs, {}), size=(16, 24), mode="bilinear", align_corners=False)[0]
        b = F.interpolate(meth.segment(None, xs.flip(-1), {}), size=(16, 24), mode="bilinear",
                          align_corners=False)[0].flip(-1)
        return (a + b) / 2
    got = predict_own(meth, model, img, {"scales": [1.0, 0.5], "flip": True, "merge": "max"}, "cpu")
    torch.testing.assert_close(got, torch.maximum(one(1.0), one(0.5)))
    got = predict_own(meth, model, img, {"scales": [1.0, 0.5], "flip": True, "merge": "mean"}, "cpu")
    torch.testing.assert_close(got, (one(1.0) + one(0.5)) / 2)
    with pytest.raises(ValueError):
        predict_own(meth, model, img, {"scales": [1.0], "merge": "median"}, "cpu")


def test_no_head_gives_null(tmp_path):
    ck = tmp_path / "model.pt"
    torch.save({"method": "cam", "state_dict": {}, "params": {}, "num_classes": 20}, ck)
    out = evaluate_own_seg(ck, tmp_path, ["a"], "SegmentationClass", {}, "cpu")
    assert out == {"miou": None, "note": "method cam has no segmentation head"}


def test_eval_seg_gathers_own_segmentation(tmp_path):
    """stages.eval_seg's gathering: non-null own_seg mIoU -> stages.own_segmentation."""
    from stages.eval_seg import gather_stages
    (tmp_path / "seeds_miou.json").write_text(json.dumps({"miou": 0.4}))
    (tmp_path / "own_seg_miou.json").write_text(json.dumps({"miou": 0.3}))
    files = [str(tmp_path / n) for n in ("seeds_miou.json", "pseudo_miou.json", "own_seg_miou.json")]
    assert gather_stages(files) == {"seeds": 0.4, "own_segmentation": 0.3}
    (tmp_path / "own_seg_miou.json").write_text(json.dumps({"miou": None, "note": "x"}))
    assert gather_stages(files) == {"seeds": 0.4}
