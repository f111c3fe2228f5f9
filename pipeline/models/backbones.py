"""Backbone creation through timm with one rule for pretrained weights.

``pretrained`` is one of:
* ``None`` / ``"none"`` / ``""``: random initialisation (CPU profiles);
* a path to a local ``.pth``/``.pt``/``.safetensors`` file: loaded with timm's
  ``load_checkpoint`` (non-strict where heads differ);
* a timm hub name such as ``"vit_base_r50_s16_384.orig_in21k_ft_in1k"`` or ``"hub"``
  (use the model name's default tag): downloaded by timm / huggingface_hub.

Offline hub loading raises :class:`WeightsError` naming the model and the local file to
place instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch


class WeightsError(RuntimeError):
    """Pretrained weights could not be obtained."""


def create_backbone(name: str, pretrained: str | None = None, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)`` with the pretrained rule above.

    Raises:
        WeightsError: a local file is missing, or the hub cannot be reached.
    """
    if pretrained in (None, "", "none", False):
        return timm.create_model(name, pretrained=False, **kwargs)
    p = Path(str(pretrained)).expanduser()
    if p.suffix in (".pth", ".pt", ".bin", ".safetensors") or p.exists():
        if not p.is_file():
            raise WeightsError(f"pretrained weights file {p} does not exist; place the file "
                               f"there or set `pretrained: none` in params.yaml.")
        model = timm.create_model(name, pretrained=False, **kwargs)
        timm.models.load_checkpoint(model, str(p), strict=False)
        return model
    hub_name = name if pretrained in ("hub", True, "true") else str(pretrained)
    try:
        return timm.create_model(hub_name, pretrained=True, **kwargs)
    except Exception as e:  # network errors come in many types (OSError, HF errors, ...)
        raise WeightsError(
            f"could not download pretrained weights {hub_name!r} ({type(e).__name__}: {e}). "
            f"Offline? Download them on a machine with internet (e.g. "
            f"`python -c \"import timm; timm.create_model('{hub_name}', pretrained=True)\"` fills "
            f"the Hugging Face cache ~/.cache/huggingface), or save a checkpoint file and set "
            f"`pretrained: /path/to/weights.pth` in params.yaml.") from e
