"""MCC's projection heads (official DINO head of fwu11/MCC ``model/model_seg_neg.py:
Projector``) and their EMA (MoCo) update (paper Sec. III-C), against hand values and the
official construction rebuilt with plain layers."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.methods.mcc.model import MCCNet, Projector, ema_update


# ------------------------------------------------------------------------------- EMA

def test_ema_update_hand_values():
    t, s = Projector(4, 6, 3, 5, layers=2), Projector(4, 6, 3, 5, layers=2)
    with torch.no_grad():
        for a in t.parameters():
            a.fill_(1.0)
        for a in s.parameters():
            a.fill_(0.0)
    ema_update(t, s, 0.9)
    assert all(torch.allclose(a, torch.full_like(a, 0.9)) for a in t.parameters())
    with torch.no_grad():
        for a in s.parameters():
            a.fill_(2.0)
    ema_update(t, s, 0.9)                                          # 0.9*0.9 + 0.1*2 = 1.01
    assert all(torch.allclose(a, torch.full_like(a, 1.01)) for a in t.parameters())
    assert all(torch.allclose(a, torch.full_like(a, 2.0)) for a in s.parameters())  # student untouched


# ------------------------------------------------------- projector (official DINO head)

def _official_projector_by_hand(seed, in_dim, hidden, bottleneck, out):
    """Official model_seg_neg.py Projector, construction order rebuilt with plain layers: the
    3 MLP Linears (default init), `apply(_init_weights)` (trunc-normal 0.02, zero bias), then
    `weight_norm(Linear(bottleneck, out, bias=False))` with its default init and g = 1."""
    torch.manual_seed(seed)
    mlp = [nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, bottleneck)]
    for lin in mlp:
        nn.init.trunc_normal_(lin.weight, std=0.02)
        nn.init.zeros_(lin.bias)
    v = nn.Linear(bottleneck, out, bias=False).weight.detach().clone()
    return mlp, v


def test_projector_weight_norm_is_the_official_head():
    pr = (torch.manual_seed(3), Projector(8, 16, 4, 6, layers=3))[1]
    mlp, v = _official_projector_by_hand(3, 8, 16, 4, 6)
    pw = pr.last.parametrizations.weight
    assert torch.equal(pw.original1, v) and torch.equal(pw.original0, torch.ones(6, 1))
    assert not pw.original0.requires_grad and pw.original1.requires_grad
    for i, lin in enumerate(mlp):
        assert torch.equal(pr.mlp[2 * i].weight, lin.weight)
    x = torch.randn(5, 8)
    h = F.gelu(mlp[1](F.gelu(mlp[0](x))))
    want = F.normalize(mlp[2](h), dim=-1) @ (v / v.norm(dim=1, keepdim=True)).t()
    out = pr(x)
    torch.testing.assert_close(out, want)
    assert out.abs().max() <= 1 + 1e-6                 # unit rows x unit bottleneck: a cosine
    # the direction's scale does not matter, and the gain gets no gradient
    out.sum().backward()
    assert pw.original0.grad is None and pw.original1.grad is not None
    with torch.no_grad():
        pw.original1.mul_(3.0)
    torch.testing.assert_close(pr(x), want)


def test_projector_without_weight_norm_is_the_previous_plain_layer():
    torch.manual_seed(4)
    pr = Projector(8, 16, 4, 6, layers=3, weight_norm=False)
    torch.manual_seed(4)
    lins = [nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4), nn.Linear(4, 6, bias=False)]
    for lin in lins:
        nn.init.trunc_normal_(lin.weight, std=0.02)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    assert not hasattr(pr.last, "parametrizations")
    assert torch.equal(pr.last.weight, lins[3].weight)
    x = torch.randn(3, 8)
    h = F.gelu(lins[1](F.gelu(lins[0](x))))
    torch.testing.assert_close(pr(x), F.normalize(lins[2](h), dim=-1) @ lins[3].weight.t())


def test_ema_teacher_follows_the_weight_norm_direction():
    """Official momentum update runs over proj_head.parameters(): weight_g (both 1) and
    weight_v; the teacher's effective weight is its own v_t / ||v_t||."""
    net = MCCNet({"backbone": {"name": "vit_tiny_patch16_224", "pretrained": "none", "overrides":
                  {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}},
                  "aux_layer": -2, "proj_hidden": 16, "proj_bottleneck": 4, "proj_dim": 6}, 3)
    s, t = net.proj.last.parametrizations.weight, net.proj_ema.last.parametrizations.weight
    assert torch.equal(s.original1, t.original1) and not t.original1.requires_grad
    v0 = t.original1.clone()
    with torch.no_grad():
        s.original1.add_(1.0)
    ema_update(net.proj_ema, net.proj, 0.9)
    torch.testing.assert_close(t.original1, 0.9 * v0 + 0.1 * s.original1)
    assert torch.equal(t.original0, torch.ones_like(t.original0))
    want = t.original1 / t.original1.norm(dim=1, keepdim=True)
    torch.testing.assert_close(net.proj_ema.last.weight, want)
