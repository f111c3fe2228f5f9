"""pipeline.engine.runtime.eval_mode: the one save-and-restore of a model's train/eval flag."""
import pytest
import torch
import torch.nn as nn

from pipeline.engine.runtime import eval_mode


class _Pinned(nn.Module):
    """A sub-module that keeps itself in eval mode (as a frozen trunk does)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return self.bn(x)


def _model():
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), _Pinned())


def test_eval_mode_switches_every_module_off_and_restores_training():
    m = _model().train()
    x = torch.randn(8, 4)
    with eval_mode(m) as same:
        assert same is m
        assert not any(k.training for k in m.modules())
        a = m(x)
    assert m.training and m[1].training and m[2].training
    assert not m[3].bn.training                       # the pinned sub-module stays pinned
    m.eval()
    assert torch.equal(a, m(x))                       # dropout off, running statistics


def test_eval_mode_keeps_an_eval_model_in_eval():
    m = _model().eval()
    with eval_mode(m):
        pass
    assert not any(k.training for k in m.modules())


def test_eval_mode_restores_after_an_exception():
    m = _model().train()
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(m):
            raise RuntimeError("inside")
    assert m.training and m[1].training
