"""pipeline.engine.trainer on a tiny linear model: the poly schedule at hand-computed
iterations, the lr of every group at every step, the NaN guard, the logged curve against
brute-force window means, resume == an uninterrupted run, rank > 0 writing nothing, and the
step running under autocast."""
import math
import statistics

import pytest
import torch

from pipeline.engine.accel import Accel
from pipeline.engine.distributed import Dist
from pipeline.engine.trainer import LossList, PolySchedule, RunningSums, Trainer, mult_at, poly_lr


class Killed(Exception):
    pass


def _toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1,
                          momentum=0.9)
    return model, opt


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g), [f"im{i}"])
            for i in range(n)]


def _mse_step(model, noise=False):
    def step(batch, it):
        x, y, _ = batch
        if noise:       # global-RNG draws: a resumed run must restore the RNG state
            x = x + 0.1 * torch.randn_like(x)
        return ((model(x) - y) ** 2).mean(), {"abs": float((model(x) - y).detach().abs().mean())}
    return step


# ----------------------------------------------------------------------------- schedule
def test_poly_lr_hand_computed_warmup_and_decay():
    s = PolySchedule(0.1, iters=10, power=0.9, warmup=4, warmup_start=0.01)
    assert s.lr(0) == 0.01
    assert s.lr(2) == pytest.approx(0.055, rel=1e-15)           # 0.01 + 0.09 * 2/4
    assert s.lr(3) == pytest.approx(0.0775, rel=1e-15)          # 0.01 + 0.09 * 3/4
    assert s.lr(4) == pytest.approx(0.1 * 0.6 ** 0.9, rel=1e-15)  # first poly iteration
    assert s.lr(9) == pytest.approx(0.1 * 0.1 ** 0.9, rel=1e-15)
    assert s.lr(12) == s.lr(9)                                   # clamped at iters - 1
    assert PolySchedule(0.1, 10).lr(0) == 0.1
    assert PolySchedule(0.1, 10).lr(5) == pytest.approx(0.1 * 0.5 ** 0.9, rel=1e-15)
    assert poly_lr(2.0, 3, 4, power=1.0) == 0.5


def test_group_lr_float_order_of_each_mode():
    """train_cls rounds ``poly(base) * m``, train_seg / train_affinity ``(base * m) * f``;
    each mode must give exactly its own expression (they differ in the last bit)."""
    base, iters, mults = 6e-5, 200, [1.0, 10.0]
    cls_s, seg_s = PolySchedule(base, iters), PolySchedule(base, iters, multiply_first=True)
    differ = 0
    for it in range(iters):
        f = (1.0 - it / iters) ** 0.9
        assert cls_s.group_lrs(it, mults) == [base * f, (base * f) * 10.0]
        assert seg_s.group_lrs(it, mults) == [base * f, (base * 10.0) * f]
        differ += cls_s.group_lrs(it, mults)[1] != seg_s.group_lrs(it, mults)[1]
    assert differ > 0


def test_every_group_gets_its_lr_before_each_step(tmp_path):
    model, opt = _toy()
    sched = PolySchedule(0.2, 6, warmup=2, warmup_start=0.02)
    seen = []

    def step(batch, it):
        seen.append((it, [g["lr"] for g in opt.param_groups]))
        return _mse_step(model)(batch, it)
    Trainer("toy", model, opt, sched, [1.0, 10.0], tmp_path / "m.pt", {},
            log=lambda s: None).run(_batches(6), step)
    assert [it for it, _ in seen] == list(range(6))
    for it, lrs in seen:
        assert lrs == [sched.lr(it), sched.lr(it) * 10.0]
    assert seen[1][1][0] == pytest.approx(0.02 + 0.18 / 2, rel=1e-15)


def test_piecewise_multiplier_switches_at_its_iterations(tmp_path):
    # a staged warm-up: group 0 at 10x for iterations 0..2, then 1x; group 1 off until 3
    assert [mult_at([[0, 10], [3, 1]], it) for it in range(5)] == [10, 10, 10, 1, 1]
    assert mult_at(2.5, 7) == 2.5 and mult_at([[0, 4.0]], 99) == 4.0
    for bad in ([], [[1, 2.0]], [[0, 1.0], [3, 2.0], [3, 1.0]]):
        with pytest.raises(ValueError, match="piecewise"):
            mult_at(bad, 0)
    model, opt = _toy()
    sched = PolySchedule(0.2, 6)
    seen = []

    def step(batch, it):
        seen.append([g["lr"] for g in opt.param_groups])
        return _mse_step(model)(batch, it)
    bias0 = model.bias.detach().clone()
    Trainer("toy", model, opt, sched, [[[0, 10], [3, 1]], [[0, 0], [3, 1]]], tmp_path / "m.pt",
            {}, log=lambda s: None).run(_batches(3), step)
    assert seen == [[sched.lr(it) * 10, 0.0] for it in range(3)]
    assert torch.equal(model.bias, bias0)                   # lr 0: no step for group 1
    with pytest.raises(ValueError, match="piecewise"):     # refused when the trainer is built
        Trainer("toy", model, opt, sched, [[[2, 1]], 1.0], tmp_path / "n.pt", {},
                log=lambda s: None)


# ----------------------------------------------------------------------------- guard
def test_optimizer_reset_equals_a_fresh_optimizer_from_that_iteration(tmp_path):
    """``reset_optimizer_at=(3,)``: iterations 3.. run as if a new Adam of the same groups had
    been built there (reference: two runs, the second with a brand-new AdamW)."""
    batches = _batches(6)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    ref = torch.nn.Linear(3, 1)
    ref.load_state_dict(model.state_dict())

    def adam(m):
        return torch.optim.AdamW([{"params": [m.weight]}, {"params": [m.bias]}], lr=0.1,
                                 weight_decay=0.0)
    const = PolySchedule(0.1, 6, power=0.0)
    Trainer("toy", model, adam(model), const, [1.0, 1.0], tmp_path / "a.pt", {},
            log=lambda s: None, reset_optimizer_at=(3,)).run(batches, _mse_step(model))
    Trainer("toy", ref, adam(ref), PolySchedule(0.1, 3, power=0.0), [1.0, 1.0],
            tmp_path / "b.pt", {}, log=lambda s: None).run(batches[:3], _mse_step(ref))
    Trainer("toy", ref, adam(ref), PolySchedule(0.1, 3, power=0.0), [1.0, 1.0],
            tmp_path / "c.pt", {}, log=lambda s: None).run(batches[3:], _mse_step(ref))
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)
    torch.manual_seed(0)                        # without the reset the result differs
    kept = torch.nn.Linear(3, 1)
    Trainer("toy", kept, adam(kept), const, [1.0, 1.0], tmp_path / "d.pt", {},
            log=lambda s: None).run(batches, _mse_step(kept))
    assert not torch.equal(kept.weight, model.weight)


def test_nan_loss_names_stage_iteration_ids_and_fix_and_takes_no_step(tmp_path):
    model, opt = _toy()
    after = {}

    def step(batch, it):
        loss, parts = _mse_step(model)(batch, it)
        return (loss * float("nan") if it == 2 else loss), parts

    tr = Trainer("train_toy", model, opt, PolySchedule(0.1, 5), [1.0, 1.0], tmp_path / "m.pt",
                 {}, log=lambda s: None)
    with pytest.raises(FloatingPointError,
                       match=r"train_toy: loss is nan at iteration 3 of 5; batch ids \['im2'\]\. "
                             r"Lower `lr` in the train_toy params"):
        tr.run(_batches(5), step, batch_ids=lambda b: b[2],
               after_step=lambda it: after.update({it: model.weight.detach().clone()}))
    assert sorted(after) == [0, 1] and tr.it == 2
    assert torch.equal(model.weight, after[1])      # the NaN iteration changed nothing
    assert not (tmp_path / "m.pt").exists()


# ----------------------------------------------------------------------------- curve
VALUES = [0.5, 1.25, 2.0, 0.125, 3.0, 1.5, 0.75, 2.5]   # exact in float32 and float64


def _known_losses(model):
    def step(batch, it):
        loss = (model.weight * 0.0).sum() + VALUES[it]
        return loss, {"twice": 2 * VALUES[it]}
    return step


@pytest.mark.parametrize("window", ["running", "list"])
def test_curve_rows_are_window_means(tmp_path, window):
    model, opt = _toy()
    sched = PolySchedule(0.1, 8)
    lines = []
    tr = Trainer("toy", model, opt, sched, [1.0, 1.0], tmp_path / "m.pt", {}, log_every=3,
                 log=lines.append, curve_lr=window == "running",
                 window=RunningSums() if window == "running" else LossList(keys=("twice",)),
                 log_line=lambda row: f"row {row['iter']}")
    curve = tr.run(_batches(8), _known_losses(model))
    windows = [(3, VALUES[0:3]), (6, VALUES[3:6]), (8, VALUES[6:8])]
    assert [r["iter"] for r in curve] == [3, 6, 8]
    for row, (end, vals) in zip(curve, windows):
        assert row["loss"] == statistics.fmean(vals)
        assert row["twice"] == statistics.fmean([2 * v for v in vals])
        if window == "running":
            assert list(row) == ["iter", "lr", "loss", "twice"]
            assert row["lr"] == sched.lr(end - 1)      # the lr of the window's last step
        else:
            assert list(row) == ["iter", "loss", "twice"]
    assert lines == ["row 3", "row 6", "row 8"]


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("window", ["running", "list"])
def test_resumed_run_equals_uninterrupted(tmp_path, window):
    def make(path, seed):
        model, opt = _toy(seed)
        tr = Trainer("toy", model, opt, PolySchedule(0.05, 7, warmup=2), [1.0, 10.0], path,
                     {"p": 1}, checkpoint_every=3, log_every=2, log=logs.append,
                     window=RunningSums() if window == "running" else LossList(keys=("abs",)))
        return model, tr

    logs = []
    data = _batches(7)
    torch.manual_seed(123)
    model, tr = make(tmp_path / "full.pt", 0)
    full = tr.run(data[tr.it:], _mse_step(model, noise=True))
    tr.save_checkpoint(lambda: {"w": model.state_dict()})

    torch.manual_seed(123)
    model, tr = make(tmp_path / "res.pt", 0)
    step = _mse_step(model, noise=True)

    def dies(batch, it):
        if it == 4:
            raise Killed
        return step(batch, it)
    with pytest.raises(Killed):
        tr.run(data[tr.it:], dies)
    st = torch.load(tmp_path / "res.pt.resume", weights_only=False)
    assert st["it"] == 3 and ("running" in st) == (window == "running")
    torch.manual_seed(999)                           # the resume file restores the RNG
    model, tr = make(tmp_path / "res.pt", 7)         # other init: the file restores it
    assert tr.it == 3 and tr.resumed is not None
    assert any("resumed" in s and "iteration 3" in s for s in logs)
    res = tr.run(data[tr.it:], _mse_step(model, noise=True))
    tr.save_checkpoint(lambda: {"w": model.state_dict()})
    a = torch.load(tmp_path / "full.pt")["w"]
    b = torch.load(tmp_path / "res.pt")["w"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res == full and [r["iter"] for r in full] == [2, 4, 6, 7]
    assert not (tmp_path / "res.pt.resume").exists()


def test_resume_file_of_other_params_is_ignored(tmp_path):
    model, opt = _toy()
    torch.save({"fingerprint": "other", "stage": "toy", "it": 5}, tmp_path / "m.pt.resume")
    logs = []
    tr = Trainer("toy", model, opt, PolySchedule(0.1, 3), [1.0, 1.0], tmp_path / "m.pt", {},
                 checkpoint_every=1, log=logs.append)
    assert tr.it == 0 and tr.resumed is None and any("ignoring" in s for s in logs)


# ----------------------------------------------------------------------------- ranks, amp
class _Rank1(Dist):
    """Rank 1 of 2 without a process group: records the collectives the trainer asks for."""

    def __init__(self, model):
        super().__init__(world=2, rank=1)
        self.model, self.means, self.synced = model, [], []

    def mean(self, values, device="cpu"):
        self.means.append(list(values))
        return [float(v) for v in values]

    def average_gradients(self, model):
        assert model is self.model and model.weight.grad is not None
        self.synced.append(model.weight.detach().clone())


def test_rank_one_averages_and_writes_nothing(tmp_path):
    model, opt = _toy()
    dd = _Rank1(model)
    before, lines = [], []

    def step(batch, it):
        before.append(model.weight.detach().clone())
        return _mse_step(model)(batch, it)
    tr = Trainer("toy", model, opt, PolySchedule(0.1, 4), [1.0, 1.0], tmp_path / "m.pt", {},
                 checkpoint_every=1, log_every=1, log=lines.append, dd=dd,
                 average_gradients=True, log_line=lambda row: "row")
    curve = tr.run(_batches(4), step)
    tr.save_checkpoint(lambda: {"w": model.state_dict()})
    assert len(dd.means) == 4 and all(len(m) == 2 for m in dd.means)   # loss and "abs"
    assert len(dd.synced) == 4          # before each optimiser step (weights not yet changed)
    assert all(torch.equal(a, b) for a, b in zip(dd.synced, before))
    assert len(curve) == 4 and lines == [] and list(tmp_path.iterdir()) == []


def test_step_runs_under_autocast(tmp_path):
    model, opt = _toy()
    dtypes = []

    def step(batch, it):
        out = model(batch[0])
        dtypes.append(out.dtype)
        return ((out.float() - batch[1]) ** 2).mean(), {}
    Trainer("toy", model, opt, PolySchedule(0.1, 2), [1.0, 1.0], tmp_path / "m.pt", {},
            log=lambda s: None, acc=Accel({"amp": "bf16"}, "cpu")).run(_batches(2), step)
    assert dtypes == [torch.bfloat16] * 2 and model.weight.dtype == torch.float32
    assert all(math.isfinite(float(v)) for v in model.weight.detach().flatten())
