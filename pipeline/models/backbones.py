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
    import huggingface_hub.constants as hf
    was_offline = hf.HF_HUB_OFFLINE
    if not was_offline and not _hub_reachable(hf.ENDPOINT):
        # without a route to the hub, huggingface_hub retries for about a minute per file;
        # offline mode still serves a filled local cache and fails at once otherwise
        hf.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(hub_name, pretrained=True, **kwargs)
    except Exception as e:  # network errors come in many types (OSError, HF errors, ...)
        raise WeightsError(offline_message(hub_name, e)) from e
    finally:
        hf.HF_HUB_OFFLINE = was_offline


def _hub_reachable(endpoint: str = "https://huggingface.co", timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub ``endpoint`` (``HF_ENDPOINT``) opens within ``timeout`` s."""
    import socket
    from urllib.parse import urlparse
    u = urlparse(endpoint)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def offline_message(hub_name: str, error: BaseException) -> str:
    """The message for hub weights that cannot be fetched: which file to place where.

    Names the Hugging Face repository and file timm would fetch (from timm's pretrained
    config), a local path under ``data/weights/`` and the params.yaml value that loads it.
    """
    try:
        repo = timm.models.get_pretrained_cfg(hub_name).hf_hub_id
    except Exception:  # unknown name: timm's own error is in `error`
        repo = None
    local = f"data/weights/{hub_name.split('.')[0]}.safetensors"
    where = (f"fetch `model.safetensors` of the Hugging Face repository `{repo}` on a machine with "
             f"internet, place it at {local}" if repo else
             f"save a timm checkpoint of `{hub_name}` at {local}")
    return (f"could not download pretrained weights {hub_name!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Offline? {where} and set "
            f"`pretrained: {local}` in params.yaml (the `backbone.pretrained` key of the stage), "
            f"or copy a filled ~/.cache/huggingface/hub from a machine where "
            f"`python -c \"import timm; timm.create_model('{hub_name}', pretrained=True)\"` ran.")
