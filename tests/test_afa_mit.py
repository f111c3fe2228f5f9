"""AFA on MiT as the official code builds it (issue 14): the MiT-B1 network of
``wetr/mix_transformer.py`` (counted and named from the official definitions, independently
of timm), the official key names of SegFormer's ``mit_b1.pth``, the captured unscaled
``q kᵀ``, the (4, 2, 2, 1) strides, the SegFormer head's order, frozen norm layers, and one
training step / the largest-scale affinity on the MiT network."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.io.config import load_params, stage_params
from pipeline.methods.afa import AFA
from pipeline.methods.afa.model import AFAMiTNet, train_time_cams
from pipeline.models.backbones import WeightsError
from pipeline.models.mit import create_mit, mit_blocks

# official mit_b1 (wetr/mix_transformer.py): dims, heads, depths, sr ratios, MLP ratio 4
B1 = dict(dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), depths=(2, 2, 2, 2), sr=(8, 4, 2, 1))
# a smaller net of the same code for the slow parts (mit_b0's dims)
SMALL = {"embed_dims": (8, 16, 40, 64), "depths": (1, 1, 1, 2), "sr_ratios": (2, 2, 2, 1)}


def official_state_shapes(dims, depths, sr, mlp=4, head=1000) -> dict[str, tuple]:
    """Every tensor of the official ``MixVisionTransformer`` state dict (``mit_b*.pth``
    naming), with its shape, written from ``wetr/mix_transformer.py``."""
    out: dict[str, tuple] = {}
    cin = 3
    for i, (d, n, r) in enumerate(zip(dims, depths, sr), start=1):
        k = 7 if i == 1 else 3
        out[f"patch_embed{i}.proj.weight"] = (d, cin, k, k)
        out[f"patch_embed{i}.proj.bias"] = (d,)
        out[f"patch_embed{i}.norm.weight"] = out[f"patch_embed{i}.norm.bias"] = (d,)
        for j in range(n):
            b = f"block{i}.{j}."
            for ln in ("norm1", "norm2"):
                out[b + ln + ".weight"] = out[b + ln + ".bias"] = (d,)
            out[b + "attn.q.weight"], out[b + "attn.q.bias"] = (d, d), (d,)
            out[b + "attn.kv.weight"], out[b + "attn.kv.bias"] = (2 * d, d), (2 * d,)
            out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = (d, d), (d,)
            if r > 1:
                out[b + "attn.sr.weight"], out[b + "attn.sr.bias"] = (d, d, r, r), (d,)
                out[b + "attn.norm.weight"] = out[b + "attn.norm.bias"] = (d,)
            h = mlp * d
            out[b + "mlp.fc1.weight"], out[b + "mlp.fc1.bias"] = (h, d), (h,)
            out[b + "mlp.dwconv.dwconv.weight"], out[b + "mlp.dwconv.dwconv.bias"] = (h, 1, 3, 3), (h,)
            out[b + "mlp.fc2.weight"], out[b + "mlp.fc2.bias"] = (d, h), (d,)
        out[f"norm{i}.weight"] = out[f"norm{i}.bias"] = (d,)
        cin = d
    out["head.weight"], out["head.bias"] = (head, dims[-1]), (head,)
    return out


def timm_name(official: str) -> str:
    """Where an official key lives in :func:`create_mit`'s network (attention wrapped)."""
    parts = official.split(".")
    if parts[0].startswith("patch_embed"):
        i = int(parts[0][len("patch_embed"):])
        return ".".join(["patch_embed" if i == 1 else f"stages.{i - 1}.downsample"] + parts[1:])
    if parts[0].startswith("block"):
        i, j = int(parts[0][len("block"):]), parts[1]
        rest = parts[2:]
        if rest[0] == "attn":
            rest = ["attn", "inner"] + rest[1:]
        if rest[:3] == ["mlp", "dwconv", "dwconv"]:
            rest = ["mlp", "dwconv"] + rest[3:]
        return ".".join([f"stages.{i - 1}", "blocks", j] + rest)
    i = int(parts[0][len("norm"):])
    return ".".join([f"stages.{i - 1}", "norm"] + parts[1:])


def test_mit_b1_is_the_official_network_tensor_by_tensor():
    m = create_mit("mit_b1")
    own = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    ref = official_state_shapes(B1["dims"], B1["depths"], B1["sr"])
    ref.pop("head.weight"), ref.pop("head.bias")
    assert {timm_name(k): s for k, s in ref.items()} == own
    # SegFormer Table 1: MiT-B1 encoder 13.1 M parameters
    assert sum(v.numel() for v in m.parameters()) == sum(torch.Size(s).numel() for s in ref.values())
    assert 13.1e6 <= sum(v.numel() for v in m.parameters()) < 13.2e6
    assert [b.attn.inner.num_heads for b in mit_blocks(m)] == [1, 1, 2, 2, 5, 5, 8, 8]
    assert [b.attn.sr_ratio for b in mit_blocks(m)] == [8, 8, 4, 4, 2, 2, 1, 1]
    # drop path linear over the 8 blocks from 0 to 0.1 (official dpr), block norms eps 1e-6
    dp = [getattr(b.drop_path1, "drop_prob", 0.0) for b in mit_blocks(m)]
    assert dp == pytest.approx(torch.linspace(0, 0.1, 8).tolist())
    assert all(b.norm1.eps == 1e-6 for b in mit_blocks(m))


def test_official_checkpoint_loads_every_tensor_by_name(tmp_path):
    ref = official_state_shapes(B1["dims"], B1["depths"], B1["sr"])
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in ref.items()}
    f = tmp_path / "mit_b1.pth"
    torch.save(sd, f)
    m = create_mit("mit_b1", str(f))
    own = m.state_dict()
    for k, v in sd.items():
        if not k.startswith("head."):
            assert torch.equal(own[timm_name(k)], v), k
    # a file of another variant, or with a tensor missing, is refused naming the file
    torch.save({k: v for k, v in sd.items() if k != "block4.1.attn.kv.weight"}, f)
    with pytest.raises(WeightsError, match="mit_b1.pth.*1 missing"):
        create_mit("mit_b1", str(f))
    with pytest.raises(WeightsError, match="does not exist.*SegFormer"):
        create_mit("mit_b1", str(tmp_path / "none.pth"))


def test_captured_attention_is_the_unscaled_qk_and_the_forward_is_timms():
    torch.manual_seed(0)
    m = create_mit("mit_b1", overrides=SMALL).eval()
    x = torch.randn(1, 3, 64, 48)
    for b in mit_blocks(m):
        b.attn.capture = True
    feats = m.forward_intermediates(x, intermediates_only=True)
    last = mit_blocks(m)[-1].attn
    # recompute q kᵀ of the last block per head from its weights and its input
    inner = last.inner
    tokens_in = {}
    h = mit_blocks(m)[-1].norm1.register_forward_hook(lambda mod, i, o: tokens_in.setdefault("t", o))
    m.forward_intermediates(x, intermediates_only=True)
    h.remove()
    t = tokens_in["t"][0]                                     # (N, C)
    d = inner.head_dim
    q = t @ inner.q.weight.t() + inner.q.bias
    k = (t @ inner.kv.weight.t() + inner.kv.bias)[:, : inner.num_heads * d]
    for hd in range(inner.num_heads):
        ref = q[:, hd * d:(hd + 1) * d] @ k[:, hd * d:(hd + 1) * d].t()
        assert torch.allclose(last.last_logits[0, hd], ref, atol=1e-4)
    assert torch.allclose(last.last_attn, (last.last_logits * inner.scale).softmax(-1))
    # the wrapper gives timm's own output
    plain = create_mit("mit_b1", overrides=SMALL).eval()
    plain.load_state_dict(m.state_dict())
    for b in mit_blocks(plain):
        b.attn = b.attn.inner
    ref = plain.forward_intermediates(x, intermediates_only=True)
    assert all(torch.allclose(a, r, atol=1e-5) for a, r in zip(feats, ref))


@pytest.mark.parametrize("size", [(64, 64), (50, 70), (33, 97)])
def test_afa_strides_give_the_official_down_size(size):
    m = create_mit("mit_b1", overrides=SMALL)
    feats = m.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    # official dist_train_voc.py get_down_size: h // 16 + 1 - (h % 16 == 0), i.e. ceil(h / 16)
    down = tuple(s // 16 + 1 - (s % 16 == 0) for s in size)
    assert tuple(feats[-1].shape[-2:]) == down == tuple(feats[-2].shape[-2:])
    assert tuple(feats[0].shape[-2:]) == tuple(-(-s // 4) for s in size)


def _net(**kw) -> AFAMiTNet:
    p = {"backbone": {"name": "mit_b1", "pretrained": None, "overrides": SMALL},
         "decoder_dim": 8, "aff_layers": [-2, -1], "par": {"dilations": [1, 2], "num_iter": 2}, **kw}
    return AFA().build_model(p, 3), p


def test_segformer_head_concatenates_c4_first():
    torch.manual_seed(0)
    net, _ = _net()
    head = net.decoder.eval()
    with torch.no_grad():
        w = head.fuse[0].weight
        w.zero_()
        w[:, :8, 0, 0] = torch.randn(8, 8)                         # only the first 8 fused channels
    feats = [torch.randn(1, c, s, s) for c, s in zip((8, 16, 40, 64), (8, 4, 2, 2))]
    y = head(feats)
    assert y.shape == (1, 4, 8, 8)
    moved_c1 = head([feats[0] + 1.0] + feats[1:])
    moved_c4 = head(feats[:3] + [feats[3] + 1.0])
    assert torch.equal(moved_c1, y) and not torch.allclose(moved_c4, y)


def test_norm_layers_frozen_as_the_official_lr_zero_group():
    net, p = _net(backbone={"name": "mit_b1", "pretrained": None})
    frozen = [n for n, q in net.mit.named_parameters() if not q.requires_grad]
    # official names containing "norm" of mit_b1: 4 patch-embedding norms, norm1 / norm2 of
    # 8 blocks, attn.norm of the 6 blocks with sr > 1, 4 stage norms; weight + bias each
    assert len(frozen) == 2 * (4 + 2 * 8 + 6 + 4) == 60
    assert all("norm" in n for n in frozen)
    assert all(q.requires_grad for q in [*net.decoder.parameters(), *net.classifier.parameters()])
    net2, _ = _net(freeze_norm=False)
    assert all(q.requires_grad for q in net2.parameters())


def test_one_training_step_and_the_largest_scale_affinity():
    torch.manual_seed(0)
    net, p = _net()
    p.update(warmup_cls_iters=0, warmup_aff_iters=0, cam_scales=[1.0, 0.5, 1.5], aff_radius=2)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    afa = AFA()
    cams, aff, grid = train_time_cams(net, x, [1.0, 0.5, 1.5], True, with_affinity=True)
    assert grid == (6, 6) and aff.shape == (2, 36, 36)     # the 1.5 forward: ceil(96 / 16)
    assert torch.allclose(aff, aff.transpose(1, 2))
    frozen = {n: q.detach().clone() for n, q in net.mit.named_parameters() if not q.requires_grad}
    opt = torch.optim.AdamW([q for g in afa.param_groups(net, p) for q in g["params"] if q.requires_grad],
                            lr=1e-3)
    loss, logs = afa.loss(net, x, y, p, torch.Generator(), it=0)
    assert logs["prop"] == 1.0 and torch.isfinite(loss)
    loss.backward()
    assert net.aff_proj.weight.grad.abs().sum() > 0 and net.decoder.cls.weight.grad.abs().sum() > 0
    opt.step()
    assert all(torch.equal(q, frozen[n]) for n, q in net.mit.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="spatial reduction"):
        _net(aff_layers=[0])


def test_voc_and_coco_profiles_train_afa_on_mit_b1():
    P = load_params("params.yaml")
    for d in ("voc", "coco"):
        p = stage_params(P, d, "afa", "train_cls")
        assert p["backbone"]["name"] == "mit_b1" and list(p["backbone"]["stride"]) == [4, 2, 2, 1]
        assert p["freeze_norm"] is True
    for d in ("demo", "vocsample"):
        assert stage_params(P, d, "afa", "train_cls")["freeze_norm"] is False
    p = stage_params(P, "voc", "afa", "train_cls")
    net = AFA().build_model({**p, "backbone": {**p["backbone"], "pretrained": None}}, 20)
    out = net.run(torch.randn(1, 3, 64, 64))
    assert out["aff"].shape == (1, 16, 16) and net.aff_proj.in_features == 16
    assert out["seg"].shape == (1, 21, 16, 16) and net.input_stride == 16
    if not Path(p["backbone"]["pretrained"]).exists():       # users place SegFormer's file there
        with pytest.raises(WeightsError, match="data/weights/mit_b1.pth does not exist"):
            AFA().build_model(p, 20)


def test_affinity_projection_has_the_official_init():
    # WeTr: nn.init.kaiming_normal_(attn_proj.weight, a=np.sqrt(5), mode="fan_out") on a
    # Conv2d(16, 1, 1): fan_out 1, std = sqrt(2 / (1 + 5)) = 0.577 (nn.Linear's default: 0.144)
    torch.manual_seed(0)
    w = torch.cat([_net()[0].aff_proj.weight.flatten() for _ in range(30)])
    assert w.numel() == 30 * 16 and abs(w.std().item() - (1 / 3) ** 0.5) < 0.06


def test_seed_export_and_own_head_paths_take_the_mit_network():
    """The stages' multi-scale + flip paths (seeds: official ``multi_scale_cam`` merge;
    own head: logits at 1/4) run on a MiT AFA and return image-size maps."""
    import numpy as np
    from pipeline.steps.own_seg import predict_own
    from pipeline.steps.seeds import multiscale_maps
    torch.manual_seed(0)
    net, p = _net()
    net.eval()
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    maps = multiscale_maps(AFA(), net, image, torch.tensor([0, 2]),
                           {"scales": [1.0, 1.5], "flip": True, "norm": "minmax",
                            "aff_radius": 2}, torch.device("cpu"))
    assert set(maps) == {"cams", "cams_aff"}
    for m in maps.values():
        assert m.shape == (2, 70, 90) and 0 <= float(m.min()) and float(m.max()) <= 1 + 1e-6
    logits = predict_own(AFA(), net, image, {"scales": [1.0], "flip": True}, torch.device("cpu"))
    assert logits.shape == (4, 70, 90) and torch.isfinite(logits).all()


def test_checkpoint_round_trip_rebuilds_the_mit_network(tmp_path, monkeypatch):
    """``load_classifier`` rebuilds the MiT AFA of a checkpoint whose ``pretrained`` file is
    gone (the weights come from the checkpoint), with the same outputs."""
    from pipeline.steps.cls import load_classifier
    torch.manual_seed(0)
    net, p = _net()
    ck = {"method": "afa", "num_classes": 3, "state_dict": net.state_dict(),
          "params": {**p, "backbone": {**p["backbone"], "pretrained": str(tmp_path / "gone.pth")}}}
    torch.save(ck, tmp_path / "model.pt")
    _, back, _ = load_classifier(tmp_path / "model.pt")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(back.run(x)["aff"], net.eval().run(x)["aff"])
