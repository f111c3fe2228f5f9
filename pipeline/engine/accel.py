"""GPU speed options shared by train_cls, export_seeds and train_seg: mixed precision
(``amp``), ``channels_last`` memory format and ``torch.compile``.

params (each stage section of params.yaml; off on the CPU profiles, see the voc profile):

* ``amp``: ``bf16`` | ``fp16`` | ``off`` (YAML also reads ``off`` as ``false``; both mean off).
  Forward passes and losses run under :func:`torch.autocast` with that dtype (matmuls and
  convolutions in 16 bit, reductions / softmax / losses in float32 by PyTorch's autocast
  policy); parameters, gradients and optimiser states stay float32. ``fp16`` also uses a
  :class:`torch.amp.GradScaler` (dynamic loss scaling: fp16 gradients underflow below
  ~6e-8); ``bf16`` has float32's exponent range and needs none. ``off``: the code path of
  a run without these options (no autocast context, no scaler): bit-identical results.
* ``channels_last``: model and 4-D inputs in NHWC memory format, the layout tensor cores'
  convolution kernels want. Meaningful for conv nets (DeepLabV2, the affinity ResNet, the
  ResNet stem of ``vit_base_r50_s16_384``); for a plain ViT only the patch-embedding conv is
  affected, i.e. effectively a no-op. Values are unchanged (same maths, other layout).
* ``compile``: :meth:`torch.nn.Module.compile` in place (state-dict keys and attributes are
  those of the uncompiled module, so checkpoints do not change). For ViT classifiers every
  transformer block is compiled instead of the top module, because method plug-ins call the
  blocks through helpers (``patch_tokens``, captured attention) rather than ``forward``.
  Compilation costs a warm-up on the first iterations (and per new input shape).

Source: PyTorch AMP recipe (https://pytorch.org/docs/stable/amp.html), channels_last
tutorial, ``torch.compile`` documentation.
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import torch
import torch.nn as nn

from pipeline.io.config import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_mode(value, key: str = "amp") -> str:
    """Normalise a params ``amp`` value to ``bf16`` / ``fp16`` / ``off``.

    ``None``, ``False``, ``"off"``, ``"none"``, ``"no"`` -> ``off`` (YAML 1.1 parses a bare
    ``off`` as False).

    Raises:
        ConfigError (a ValueError): any other value (names ``key`` and the accepted ones).
    """
    if value in (None, False) or str(value).lower() in ("off", "none", "no", "false", "fp32"):
        return "off"
    v = str(value).lower()
    if v not in AMP_DTYPES:
        raise ConfigError(f"`{key}` must be bf16, fp16 or off, got {value!r}; fix it in "
                          f"params.yaml")
    return v


class Accel:
    """The ``amp`` / ``channels_last`` / ``compile`` options of one stage.

    Args:
        p: the stage's params (keys ``amp``, ``channels_last``, ``compile``; missing = off).
        device: where the model runs (autocast is per device type: ``cuda`` or ``cpu``).
        stage: stage name used in error messages.
    Raises:
        ConfigError (a ValueError): bad ``amp`` value (message names ``<stage>.amp``).
    """

    def __init__(self, p: Mapping, device: torch.device | str, stage: str = "stage"):
        self.amp = amp_mode(p.get("amp", "off"), f"{stage}.amp")
        self.device = torch.device(device)
        self.channels_last = bool(p.get("channels_last", False))
        self.compile = bool(p.get("compile", False))
        self.dtype = AMP_DTYPES.get(self.amp)
        self.scaler = (torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Apply channels_last and in-place compilation to ``model``; returns the same object
        (so ``model.state_dict()`` keeps its keys)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            blocks = getattr(getattr(model, "vit", None), "blocks", None)
            for m in (list(blocks) if blocks is not None else [model]):
                m.compile()
        return model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D ``(B, C, H, W)`` input in the model's memory format (others unchanged)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self):
        """Context manager: ``torch.autocast(device.type, dtype)`` or a no-op when off."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer,
                      before_step=None) -> None:
        """``loss.backward()``, ``before_step()`` (e.g. gradient all-reduce), ``opt.step()``;
        with fp16 through the GradScaler (a step with inf/NaN gradients is skipped and the
        scale lowered)."""
        if self.scaler is None:
            loss.backward()
            if before_step is not None:
                before_step()
            opt.step()
            return
        self.scaler.scale(loss).backward()
        if before_step is not None:
            before_step()
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        """GradScaler state for resume files (empty without fp16)."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, st: dict | None) -> None:
        """Restore :meth:`state_dict` (ignored without fp16 or when ``st`` is empty)."""
        if self.scaler is not None and st:
            self.scaler.load_state_dict(st)
