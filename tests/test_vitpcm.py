"""ViT-PCM (supplementary Eq. 1-3, 15-16; official code's merge_class_labels / equivariance
loss) against brute-force references."""
import math

import numpy as np
import pytest
import torch

from pipeline.methods.common.tokens import transform_image
from pipeline.methods.vitpcm import ViTPCM
from pipeline.methods.vitpcm.losses import (bpm, equivariance_loss, invert_patch_grid, mce_loss,
                                            merge_class_labels, with_background)
from pipeline.methods.vitpcm.model import pcm_scores
from pipeline.models.vit import patch_tokens
from pipeline.steps.seeds import maps_to_label
from vit_reference import tiny_vit

TINY = {"backbone": tiny_vit(patch=8, dim=24, depth=2)}


def test_softmax_then_gmp_matches_loops():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(2, 3, 4, 5)) * 3
    z, y = pcm_scores(torch.tensor(A))
    for b in range(2):
        for k in range(5):
            best = -1.0
            for r in range(3):
                for c in range(4):
                    e = [math.exp(A[b, r, c, j]) for j in range(5)]
                    zk = e[k] / sum(e)                              # Eq. 3
                    assert z[b, r, c, k].item() == pytest.approx(zk, rel=1e-10)
                    best = max(best, zk)                            # Eq. 2
            assert y[b, k].item() == pytest.approx(best, rel=1e-10)


def test_mce_with_background_by_hand():
    y = torch.tensor([[0.9, 0.2, 0.7], [0.6, 0.05, 0.1]], dtype=torch.float64)
    fg = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    t = with_background(fg)
    assert t.tolist() == [[1, 0, 1], [1, 0, 0]]          # background always present
    expect = 0.0
    for b in range(2):
        for k in range(3):
            tk, yk = t[b, k].item(), y[b, k].item()
            expect -= tk * math.log(yk) + (1 - tk) * math.log(1 - yk)
    expect /= 6                                          # mean over batch and K+1 classes
    assert mce_loss(y, t).item() == pytest.approx(expect, rel=1e-12)


def test_mce_gradient_matches_supplementary_eq16():
    """dL/dW^q = 1/(K+1) [F_{i_q}(y_q - t_q) + sum_{k != q} F_{i_k} Z^q_{i_k} (t_k - y_k)/(1 - y_k)]."""
    torch.manual_seed(0)
    h, w, e, C = 3, 4, 6, 5
    Fm = torch.randn(h * w, e, dtype=torch.float64)
    W = (torch.randn(e, C, dtype=torch.float64) * 0.7).requires_grad_(True)
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    z, y = pcm_scores((Fm @ W).reshape(1, h, w, C))
    mce_loss(y, t, eps=1e-15).backward()
    Z = z.detach().reshape(h * w, C).numpy()
    i = Z.argmax(0)                                     # i_k: patch of the max of Z^k
    yv, tv, Fn = Z[i, range(C)], t[0].numpy(), Fm.numpy()
    expect = np.zeros((e, C))
    for q in range(C):
        g = Fn[i[q]] * (yv[q] - tv[q])
        for k in range(C):
            if k != q:
                g = g + Fn[i[k]] * Z[i[k], q] * (tv[k] - yv[k]) / (1 - yv[k])
        expect[:, q] = g / C
    assert np.allclose(W.grad.numpy(), expect, atol=1e-12)


def test_model_head_is_linear_on_patch_tokens():
    torch.manual_seed(0)
    m = ViTPCM()
    model = m.build_model({**TINY, "hv_bilstm": False}, 4).double().eval()
    x = torch.randn(1, 3, 32, 48, dtype=torch.float64)
    A = model(x)
    assert A.shape == (1, 4, 6, 5)                      # (B, h, w, K+1)
    _, f = patch_tokens(model.vit, x)
    assert torch.allclose(A.reshape(1, 24, 5), f @ model.classifier.weight.T)
    assert model.classifier.bias is None
    lstm = m.build_model(TINY, 4).eval()
    assert lstm(x.float()).shape == (1, 4, 6, 5) and lstm.lstm.out_dim == 24


def _keras_lstm_loop(x, lstm):
    """Keras LSTM cell by hand (gates i, f, c, o; sigmoid / tanh), zero initial state."""
    wi, wh = lstm.weight_ih_l0.detach().double(), lstm.weight_hh_l0.detach().double()
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().double()
    u = wh.shape[1]
    out = torch.zeros(x.shape[0], x.shape[1], u, dtype=torch.float64)
    for n in range(x.shape[0]):
        h = torch.zeros(u, dtype=torch.float64)
        c = torch.zeros(u, dtype=torch.float64)
        for t in range(x.shape[1]):
            z = wi @ x[n, t] + wh @ h + b
            i, f, g, o = z[:u].sigmoid(), z[u:2 * u].sigmoid(), z[2 * u:3 * u].tanh(), z[3 * u:].sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
            out[n, t] = h
    return out


def test_keras_hv_bilstm_matches_a_hand_loop_in_rows_then_columns_order():
    """Official HVBiLSTM: TimeDistributed(Bidirectional(LSTM)) over rows, then over columns
    (iT), concatenated; Bidirectional = [forward, backward re-reversed]."""
    from pipeline.methods.vitpcm.model import HVBiLSTM
    torch.manual_seed(0)
    net = HVBiLSTM(5, 3, dropout=0.5, form="keras").double().eval()   # eval: no dropout
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    got = net(f)
    assert got.shape == (2, 3, 4, 12)
    L = net.lstms
    for b in range(2):
        for r in range(3):
            row = f[b, r][None]
            fw = _keras_lstm_loop(row, L["rows_fw"])[0]
            bw = _keras_lstm_loop(row.flip(1), L["rows_bw"])[0].flip(0)
            torch.testing.assert_close(got[b, r, :, :6], torch.cat([fw, bw], -1))
        for c in range(4):
            col = f[b, :, c][None]
            fw = _keras_lstm_loop(col, L["cols_fw"])[0]
            bw = _keras_lstm_loop(col.flip(1), L["cols_bw"])[0].flip(0)
            torch.testing.assert_close(got[b, :, c, 6:], torch.cat([fw, bw], -1))
    with pytest.raises(ValueError, match="lstm_form"):
        HVBiLSTM(5, 3, form="tf")
    old = HVBiLSTM(5, 3, form="torch")                   # the previous layout, kept as option
    assert {n.split(".")[0] for n, _ in old.named_parameters()} == {"rows", "cols"}


def test_keras_lstm_initialisation_and_sequence_dropout():
    """Keras LSTM: glorot_uniform kernel, orthogonal recurrent kernel, unit_forget_bias;
    LSTM(dropout=p): one input mask per sequence, reused at every time step."""
    from pipeline.methods.vitpcm.model import HVBiLSTM
    torch.manual_seed(0)
    net = HVBiLSTM(16, 8, dropout=0.25, form="keras")
    for lstm in net.lstms.values():
        wi, wh = lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach()
        assert wi.abs().max() <= (6 / (16 + 32)) ** 0.5 + 1e-7            # Glorot limit
        assert wi.abs().max() > 0.5 * (6 / (16 + 32)) ** 0.5
        torch.testing.assert_close(wh.T @ wh, torch.eye(8), atol=1e-5, rtol=0)   # orthogonal
        want = torch.zeros(32)
        want[8:16] = 1.0                                                  # forget gate
        assert torch.equal(lstm.bias_ih_l0.detach() + lstm.bias_hh_l0.detach(), want)
    ones = torch.ones(400, 7, 16)
    net.train()
    d = net.sequence_dropout(ones)
    assert set(d.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.equal(d, d[:, :1].expand_as(d))                          # same at every step
    assert abs((d == 0).float().mean().item() - 0.25) < 0.02
    assert not torch.equal(d, net.sequence_dropout(ones))                 # a new mask per call
    net.eval()
    assert torch.equal(net.sequence_dropout(ones), ones)


def test_bpm_and_stored_maps_reproduce_the_restricted_argmax():
    torch.manual_seed(1)
    z = torch.randn(5, 6, 8).softmax(-1)
    cids = torch.tensor([2, 5])
    got = bpm(z, cids)
    for r in range(5):
        for c in range(6):
            cand = [0, 2, 5]
            vals = [z[r, c, j].item() for j in cand]
            assert got[r, c].item() == cand[int(np.argmax(vals))]
    # the seeds (cams = Z_k / (Z_k + Z_0)) at threshold 0.5 are exactly the BPM
    m = ViTPCM()
    model = m.build_model(TINY, 7).eval()
    x = torch.randn(1, 3, 32, 40)
    maps = m.finish_maps(m.maps(model, x, cids - 1, {}), {})        # token resolution
    assert torch.allclose(maps["cams"], m.maps(model, x, cids - 1, {"bpm_upsample": "ratio"})["cams"],
                          atol=1e-6)                     # both forms agree at the token grid
    with torch.no_grad():
        zz = model(x)[0].softmax(-1)
    lab = maps_to_label(maps["cams"].numpy(), cids.numpy(), 0.5)
    assert (lab == bpm(zz, cids).numpy()).all()
    assert torch.allclose(maps["probs"], zz[..., cids].permute(2, 0, 1))
    # official variant: each class divided by its spatial max first
    gotn = bpm(z, cids, spatial_norm=True)
    mx = z[..., [0, 2, 5]].amax((0, 1))
    ref = torch.tensor([0, 2, 5])[(z[..., [0, 2, 5]] / mx).argmax(-1)]
    assert torch.equal(gotn, ref)


def test_merge_class_labels_loops():
    torch.manual_seed(2)
    z = torch.rand(2, 3, 3, 4)
    t = torch.tensor([[1.0, 0, 1, 0], [1.0, 1, 0, 1]])
    out = merge_class_labels(z, t)
    for b in range(2):
        mx = [max(z[b, r, c, k].item() for r in range(3) for c in range(3)) for k in range(4)]
        for r in range(3):
            for c in range(3):
                v = [z[b, r, c, k].item() * t[b, k].item() / mx[k] for k in range(4)]
                s = sum(v)
                for k in range(4):
                    assert out[b, r, c, k].item() == pytest.approx(v[k] / s, rel=1e-5)


def view_position(r, c, h, w, t):
    """Where original token (r, c) sits in the view, from the transforms' definitions."""
    return {"hflip": (r, w - 1 - c), "vflip": (h - 1 - r, c),
            "rot90": (w - 1 - c, r),              # torch.rot90 k=1: out[i, j] = in[j, W-1-i]
            "rot270": (c, h - 1 - r)}[t]          # k=3: out[i, j] = in[H-1-j, i]


@pytest.mark.parametrize("t", ["hflip", "vflip", "rot90", "rot270"])
def test_inverse_mapping_of_view_predictions(t):
    h, w, C = 3, 5, 2
    z1 = torch.rand(1, h, w, C)
    view = transform_image(z1.permute(0, 3, 1, 2), t).permute(0, 2, 3, 1)   # exact equivariance
    for r in range(h):
        for c in range(w):
            i, j = view_position(r, c, h, w, t)
            assert torch.equal(view[0, i, j], z1[0, r, c])
    back = invert_patch_grid(view, t, (h, w))
    assert torch.equal(back, z1)
    wrong = {"hflip": "vflip", "vflip": "hflip", "rot90": "rot270", "rot270": "rot90"}[t]
    assert not torch.equal(invert_patch_grid(view, wrong, (h, w)), z1)


def test_equivariance_loss_uses_detached_merged_target():
    torch.manual_seed(3)
    h, w, C = 4, 4, 3
    a1 = torch.randn(2, h, w, C, requires_grad=True)
    z1 = a1.softmax(-1)
    t = torch.tensor([[1.0, 1, 0], [1.0, 0, 1]])
    z2 = transform_image(z1.permute(0, 3, 1, 2), "rot90").permute(0, 2, 3, 1).detach().requires_grad_(True)
    loss = equivariance_loss(z1, z2, t, "rot90")
    q = merge_class_labels(z1.detach(), t)
    ref = -(q * z1.detach().clamp_min(1e-7).log()).sum(-1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert equivariance_loss(z1, z2, t, "rot270").item() > loss.item() + 1e-3
    loss.backward()
    assert a1.grad is None or a1.grad.abs().max() == 0     # target is stop-gradient
    assert z2.grad.abs().sum() > 0


def test_loss_trains_both_terms():
    torch.manual_seed(0)
    m = ViTPCM()
    model = m.build_model(TINY, 5)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 5)
    y[0, 1] = y[1, 3] = 1
    loss, parts = m.loss(model, x, y, {**TINY, "eq_views": "batch", "eq_transforms": ["rot90"]},
                         torch.Generator().manual_seed(0))
    loss.backward()
    assert set(parts) == {"mce", "eq"} and loss.item() == pytest.approx(parts["mce"] + parts["eq"], rel=1e-5)
    assert model.vit.blocks[0].attn.inner.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="eq_transforms"):
        m.loss(model, x, y, {**TINY, "eq_views": "batch", "eq_transforms": ["rescale"]}, torch.Generator())


def test_equivariance_target_from_a_dropout_free_forward(monkeypatch):
    """Official VITPCM.train_step: outputs_sg = self(images, training=False) outside the
    tape; eq_target: train = the (dropout) L_MCE forward, detached later."""
    import pipeline.methods.vitpcm as vp
    seen, real = [], vp.equivariance_loss

    def spy(z1, *args):
        seen.append(z1)
        return real(z1, *args)
    monkeypatch.setattr(vp, "equivariance_loss", spy)
    torch.manual_seed(0)
    m = ViTPCM()
    p = {**TINY, "dropout": 0.5, "eq_views": "batch", "eq_transforms": ["hflip"]}
    model = m.build_model(p, 5).train()
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 5)
    y[0, 1] = y[1, 3] = 1
    m.loss(model, x, y, p, torch.Generator().manual_seed(0))
    assert model.training                                  # train mode restored
    model.eval()
    with torch.no_grad():
        want = pcm_scores(model(x))[0]                     # independent dropout-free pass
    model.train()
    assert not seen[-1].requires_grad
    torch.testing.assert_close(seen[-1], want)
    m.loss(model, x, y, {**p, "eq_target": "train"}, torch.Generator().manual_seed(0))
    assert seen[-1].requires_grad                          # the L_MCE forward (with dropout)
    assert (seen[-1] - want).abs().max() > 1e-3
    with pytest.raises(ValueError, match="eq_target"):
        m.loss(model, x, y, {**p, "eq_target": "x"}, torch.Generator())


def test_classifier_init_std_draws_w_from_the_normal():
    # official model.py: RandomNormal(0, 0.05); null keeps PyTorch's uniform Kaiming init
    torch.manual_seed(0)
    w = ViTPCM().build_model({**TINY, "hv_bilstm": False, "classifier_init_std": 0.05},
                             20).classifier.weight.detach()
    assert abs(w.mean().item()) < 0.01 and w.std().item() == pytest.approx(0.05, rel=0.1)
    assert w.abs().max().item() > 0.1                     # a normal tail, not the uniform bound
    d = w.shape[1]
    torch.manual_seed(0)
    u = ViTPCM().build_model({**TINY, "hv_bilstm": False}, 20).classifier.weight.detach()
    assert u.abs().max().item() <= 1 / d ** 0.5 + 1e-7     # nn.Linear: U(-1/sqrt(d), 1/sqrt(d))


def test_staged_training_warmup_head_only_then_last_blocks():
    """Official main.py: warmup() trains only the HV-BiLSTM + classifier (1 epoch, lr 1e-3),
    unfreeze() adds encoder_norm + the last NUM_BLOCK_UNFREEZE blocks (lr 1e-4); the
    embeddings and the first blocks never train."""
    from pipeline.steps.cls import make_optimizer
    torch.manual_seed(0)
    m = ViTPCM()
    p = {**TINY, "backbone": tiny_vit(patch=8, dim=24, depth=3), "unfreeze_blocks": 1,
         "freeze_warmup_iters": 2, "warmup_lr_mult": 10.0, "equivariance": False}
    model = m.build_model(p, 4)
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert all(n.startswith(("vit.blocks.2.", "vit.norm.", "lstm.", "classifier.")) for n in trainable)
    assert any(n.startswith("vit.blocks.2.") for n in trainable) and "vit.norm.weight" in trainable
    groups = m.param_groups(model, p)
    assert groups[1]["lr_mult"] == [[0, 10.0], [2, 1.0]]
    opt = make_optimizer(model, {"lr": 1e-4, "weight_decay": 0.0}, groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    x, y = torch.randn(2, 3, 32, 32), torch.zeros(2, 4)
    y[0, 1] = y[1, 3] = 1

    def grads(it):
        m.iteration = it
        model.zero_grad(set_to_none=True)
        m.loss(model, x, y, p, torch.Generator())[0].backward()
        return {n for n, q in model.named_parameters() if q.grad is not None}
    head = {n for n in trainable if not n.startswith("vit.")}
    assert grads(1) == head                                # warm-up: no ViT gradient at all
    assert grads(2) == trainable                           # then the last block and the norm too
    assert m.param_groups(model, {**p, "freeze_warmup_iters": 0}) is None
    # official main.py compiles a fresh Adam (Keras eps 1e-7 in voc) for the second phase
    assert m.optimizer_resets(p) == (2,)
    assert m.optimizer_resets({**p, "fresh_optimizer_after_warmup": False}) == ()
    assert m.optimizer_resets({**p, "freeze_warmup_iters": 0}) == ()
    assert opt.defaults["eps"] == 1e-8
    assert make_optimizer(model, {"lr": 1e-4, "adam_eps": 1e-7}, groups).defaults["eps"] == 1e-7
    with pytest.raises(ValueError, match="unfreeze_blocks"):
        m.build_model({**p, "unfreeze_blocks": 4}, 4)


def test_background_label_from_the_mask_enters_l_mce():
    """``bg_label: gt`` (official ``seg2multihot``): the trainer's ``(B, K+1)`` labels carry
    ``t_0 = 0`` for an image without background pixels, and ``L_MCE`` is the Keras BCE mean
    over the K+1 classes of those labels (by hand); ``(B, K)`` labels get ``t_0 = 1``."""
    torch.manual_seed(0)
    m = ViTPCM()
    model = m.build_model({**TINY, "dropout": 0.0}, 5).eval()
    x = torch.randn(2, 3, 32, 32)
    y_fg = torch.zeros(2, 5)
    y_fg[0, 1] = y_fg[1, 3] = 1
    y_gt = torch.cat([torch.tensor([[1.0], [0.0]]), y_fg], 1)    # image 1 has no background
    p = {**TINY, "dropout": 0.0, "equivariance": False}
    _, parts = m.loss(model, x, y_gt, p, torch.Generator())
    _, parts_fg = m.loss(model, x, y_fg, p, torch.Generator())
    with torch.no_grad():
        pooled = pcm_scores(model(x))[1].double().clamp(1e-7, 1 - 1e-7).numpy()
    for t, got in ((y_gt, parts["mce"]), (with_background(y_fg), parts_fg["mce"])):
        t = t.double().numpy()
        ref = -(t * np.log(pooled) + (1 - t) * np.log(1 - pooled)).mean()
        assert got == pytest.approx(ref, rel=1e-5)
    assert parts["mce"] != pytest.approx(parts_fg["mce"], rel=1e-4)
    assert m.wants_background_label({}) and not m.wants_background_label({"bg_label": "always"})
    with pytest.raises(ValueError, match="bg_label"):
        m.wants_background_label({"bg_label": "sometimes"})


def test_manifest_lists_images_without_background_and_the_dataset_labels_them(tmp_path):
    """``no_background`` in the manifest, ``y[0]`` of ClassificationDataset from it, and a
    ViT-PCM training refused (nothing written) without the list."""
    from test_bad_inputs import make_voc
    from pipeline.data.datasets import ClassificationDataset
    from pipeline.data.prepare import build_manifest
    from pipeline.data.voc import save_mask_png
    from pipeline.steps.cls import train_classifier
    data, ids = make_voc(tmp_path / "ds", size=(32, 32))
    full = np.full((32, 32), 2, np.uint8)
    full[0, 0] = 255                                        # void, still no background pixel
    save_mask_png(tmp_path / "ds/SegmentationClass/im1.png", full)
    man = build_manifest(data, log=lambda s: None)
    assert man["no_background"] == ["im1"] and man["labels"]["im1"] == [2]
    ds = ClassificationDataset(tmp_path / "ds", ids, man["labels"], crop=16, num_classes=21,
                               background_absent=man["no_background"])
    ys = [ds[i][1] for i in range(3)]
    assert [float(y[0]) for y in ys] == [1.0, 0.0, 1.0] and ys[1].shape == (21,) and ys[1][2] == 1
    plain = ClassificationDataset(tmp_path / "ds", ids, man["labels"], crop=16, num_classes=21)
    assert plain[1][1].shape == (20,) and torch.equal(plain[1][1], ys[1][1:])
    p = {**TINY, "crop": 32, "batch_size": 2, "iters": 1, "lr": 1e-3, "device": "cpu", "seed": 0,
         "eq_views": "batch"}
    with pytest.raises(ValueError, match="no_background"):
        train_classifier("vitpcm", tmp_path / "ds", ids, man["labels"], p, tmp_path / "m.pt",
                         log=lambda s: None)
    assert not (tmp_path / "m.pt").exists()
    met = train_classifier("vitpcm", tmp_path / "ds", ids, man["labels"], p, tmp_path / "m.pt",
                           log=lambda s: None, no_background=man["no_background"])
    assert met["iters"] == 1 and (tmp_path / "m.pt").is_file()
