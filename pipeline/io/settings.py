"""Typed settings of the stages: one frozen dataclass per stage, built once from the stage's
merged params (:func:`pipeline.io.config.stage_params`); the ONE place of their defaults.

* Fields: the stage keys the host reads (stage CLI: ``split``, ``device``, ``seed_key``...;
  library: :mod:`pipeline.steps.cls`, :mod:`pipeline.steps.seeds`, :mod:`pipeline.steps.segment`, ...), from
  ``profiles.<d>.<stage>`` or set by ``methods.<m>.<stage>`` / ``by_method.<m>``; a field
  without a default is required; ``data`` / ``seed`` come from ``datasets.<d>`` / ``seed``.
  Conversions are those the library applied where it read a key (numbers it used as given,
  e.g. ``beta``, stay as given: same arithmetic). :func:`pipeline.io.config.validate` accepts
  every field but ``data`` / ``seed`` in a profile's stage section (:func:`profile_keys`).
* ``method``: the method's own keys (read-only; the plug-ins in :mod:`pipeline.methods`
  read them from :meth:`StageSettings.as_dict`, the params exactly as given, which is also
  what checkpoints, resume fingerprints and metrics record). :meth:`StageSettings.record`:
  the resolved params (``RECORD`` keys, defaults filled in) some stages record instead.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

from pipeline.io.config import ConfigError, unknown_key


class FrozenMap(Mapping):
    """Read-only, picklable mapping (the value of a mapping field and of ``method``)."""
    __slots__ = ("_d",)

    def __init__(self, d: Mapping | None = None):
        self._d = dict(d or {})

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"

    def __reduce__(self):
        return (FrozenMap, (self._d,))


def _plain(v: Any) -> Any:
    """JSON-like copy: mappings -> dicts, tuples -> lists (as YAML / JSON give them)."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else copy.deepcopy(v)


# ---- converters: the conversion the library applied where it read the key
def _opt(conv: Callable) -> Callable:
    """``conv`` that keeps None (optional fields; required ones too: presence is checked by
    :meth:`StageSettings.from_params`, a null value fails where it is used, as before)."""
    return lambda v: None if v is None else conv(v)


def _floats(v) -> tuple:
    return tuple(float(x) for x in v)


def _ints(v) -> tuple:
    return tuple(int(x) for x in v)


def _map(v) -> FrozenMap:
    return FrozenMap(copy.deepcopy(dict(v)))


def _one_of(*options: str) -> Callable:
    """A string key with a fixed set of values (ValueError names them)."""
    def conv(v):
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return v
    return conv


def _int_or_0(v) -> int:         # ``checkpoint_every: null`` = 0
    return int(v or 0)


#: PSA's dense-CRF settings (official PSA code): train_affinity's ``crf`` defaults, and
#: :mod:`pipeline.steps.refine.crf`'s for a missing key
PSA_CRF = dict(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13,
               bilateral_compat=10, iters=10)


def _psa_crf_over(v) -> FrozenMap:   # train_affinity: missing CRF keys take PSA's
    return FrozenMap({**PSA_CRF, **copy.deepcopy(dict(v or {}))})


def _f(default: Any = MISSING, conv: Callable | None = None, factory: Callable | None = None):
    md = {"conv": conv} if conv else {}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


@dataclass(frozen=True, kw_only=True)
class StageSettings:
    """Base of the stage settings (see the module doc)."""
    #: stage name (params.yaml section, message prefix)
    STAGE: ClassVar[str] = ""
    #: keys of :meth:`record`, in the order the resolved params were always written
    RECORD: ClassVar[tuple[str, ...]] = ()
    #: whether a method plug-in reads this stage's params (else a method key is refused)
    TAKES_METHOD_KEYS: ClassVar[bool] = False

    data: Mapping[str, Any] = _f(conv=_map, factory=FrozenMap)   # datasets.<d>
    seed: int = _f(0, int)                                      # top-level seed
    method: Mapping[str, Any] = field(default_factory=FrozenMap)
    _given: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for k, v in _converted(type(self), {n: getattr(self, n) for n in self.field_names()},
                               self.STAGE).items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "method", FrozenMap(self.method))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The stage keys (every init field but ``method``), in field order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name != "method")

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """Fields without a default (params.yaml must set them)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name != "method"
                     and f.default is MISSING and f.default_factory is MISSING)

    @classmethod
    def from_params(cls, merged: Mapping[str, Any],
                    method_keys: Iterable[str] | Mapping[str, str] = (), where: str | None = None):
        """Settings from a stage's merged params.

        Args:
            merged: :func:`pipeline.io.config.stage_params` output (or any mapping).
            method_keys: keys that come from the method (``methods.<m>.<stage>``,
                ``by_method.<m>``), or ``{key: its section}`` (:func:`pipeline.io.config.method_keys`);
                those that are not fields go to ``method``.
            where: the params.yaml section named in messages (default the stage name).
        Raises:
            ConfigError: a key that is neither a field nor a method key (or a method key of a
                stage no plug-in reads), naming the section and the closest field; a missing
                required key; a value of the wrong type.
        """
        where = where or cls.STAGE
        names = cls.field_names()
        mk = method_keys if isinstance(method_keys, Mapping) else dict.fromkeys(method_keys, where)
        values, method = {}, {}
        for k, v in merged.items():
            if k in names:
                values[k] = v
            elif k in mk and cls.TAKES_METHOD_KEYS:
                method[k] = copy.deepcopy(v)
            else:
                raise unknown_key(mk.get(k, where), k, names,
                                  f"the {cls.STAGE} settings are the fields of pipeline.io.settings."
                                  f"{cls.__name__}" + ("" if cls.TAKES_METHOD_KEYS else
                                                       " (no method plug-in reads them)"))
        missing = [n for n in cls.required() if n not in values]
        if missing:
            raise ConfigError(f"params.yaml: `{where}` lacks {', '.join(f'`{n}`' for n in missing)} "
                              f"(required by pipeline.io.settings.{cls.__name__})")
        s = cls(**_converted(cls, values, where), method=FrozenMap(method))
        object.__setattr__(s, "_given", copy.deepcopy(dict(merged)))
        return s

    @classmethod
    def of(cls, params: "StageSettings | Mapping[str, Any] | None", where: str | None = None,
           partial: bool = False):
        """``params`` itself if it is a ``cls``, else :meth:`from_params` of the mapping (the
        library entry points' conversion of a Python caller's dict). For a stage whose
        plug-ins read its params, every key that is not a field counts as a method key.
        ``partial``: required fields may be missing (None; helpers that read a few fields)."""
        if isinstance(params, cls):
            return params
        params = dict(params or {})
        if partial:
            params = {**{n: None for n in cls.required()}, **params}
        names = cls.field_names()
        return cls.from_params(params, [k for k in params if k not in names]
                               if cls.TAKES_METHOD_KEYS else (), where)

    def as_dict(self, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """The params as given (stage and method keys, in order, values as written; a copy):
        the dict the plug-ins receive and checkpoints / metrics record. Settings built by
        the constructor or ``dataclasses.replace``: every field, then the method keys."""
        src = self._given if self._given is not None else {
            **{n: _plain(getattr(self, n)) for n in self.field_names()}, **dict(self.method)}
        return {k: copy.deepcopy(v) for k, v in src.items() if k not in set(exclude)}

    def record(self) -> dict[str, Any]:
        """``{key: value}`` for :attr:`RECORD`: the given value, else the field's (default)
        value in JSON-like form (lists, dicts)."""
        given = self._given or {}
        return {k: copy.deepcopy(given[k]) if k in given else _plain(getattr(self, k))
                for k in self.RECORD}

    def updated(self, **changes: Any):
        """A copy with ``changes`` applied (converted), also in :meth:`as_dict` / :meth:`record`."""
        s = dataclasses.replace(self, **changes)
        if self._given is not None:
            object.__setattr__(s, "_given", {**self._given, **copy.deepcopy(changes)})
        return s


def _converted(cls, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    out, fields = {}, {f.name: f for f in dataclasses.fields(cls)}
    for k, v in values.items():
        conv = fields[k].metadata.get("conv")
        try:
            out[k] = v if conv is None else conv(v)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"params.yaml: `{where}.{k}` = {v!r} is not valid for "
                              f"pipeline.io.settings.{cls.__name__}.{k} ({e})") from None
    return out


@dataclass(frozen=True, kw_only=True)
class AccelSettings(StageSettings):
    """``amp`` / ``channels_last`` / ``compile`` (:class:`pipeline.engine.accel.Accel`; off by default)."""
    #: bf16 | fp16 | off, as given (YAML reads `off` as false; pipeline.engine.accel.amp_mode
    #: normalises it where Accel is built, as before)
    amp: str | bool | None = "off"
    channels_last: bool = _f(False, bool)
    compile: bool = _f(False, bool)

    def accel(self) -> dict[str, Any]:
        """The params :class:`pipeline.engine.accel.Accel` reads."""
        return {"amp": self.amp, "channels_last": self.channels_last, "compile": self.compile}


@dataclass(frozen=True, kw_only=True)
class TrainCls(AccelSettings):
    """``train_cls`` (:func:`pipeline.steps.cls.train_classifier`); method keys go to the plug-in."""
    STAGE: ClassVar[str] = "train_cls"
    TAKES_METHOD_KEYS: ClassVar[bool] = True
    device: str = "auto"                 # auto | cpu | cuda (pipeline.engine.runtime.get_device)
    split: str = "train"                 # manifest split of the training ids
    backbone: Mapping[str, Any] = _f(conv=_opt(_map))   # required: {name, pretrained, overrides}
    crop: int | None = _f(conv=_opt(int))   # required; null: whole images (batch_size 1)
    scale_range: tuple[float, float] | None = _f((1.0, 1.0), _opt(_floats))
    resize_long: tuple[int, int] | None = _f(None, _opt(_ints))   # long side [lo, hi] px
    hflip: bool = _f(True, bool)
    resize_square: int | None = _f(None, _opt(int))   # ViT-PCM official: S x S first, aspect ignored
    vflip: bool = _f(False, bool)        # ViT-PCM official: p 0.5 (PROB_FLIP_UD)
    transpose: bool = _f(False, bool)    # ViT-PCM official: p 0.5 (PROB_ROT90)
    color_jitter: Mapping[str, Any] | None = _f(None, _opt(_map))   # transforms.color_jitter keywords
    batch_size: int = _f(conv=_opt(int))   # required
    iters: int | None = _f(None, _opt(int))   # null / 0: `epochs` epochs
    epochs: int | None = _f(None, _opt(int))
    optimizer: str = _f("adamw", lambda v: str(v).lower())   # adamw | sgd
    lr: float = _f(conv=_opt(float))     # required
    weight_decay: float = _f(0.01, float)
    momentum: float = _f(0.9, float)     # sgd only
    adam_eps: float = _f(1e-8, float)    # adamw only: torch's default (Keras Adam, ViT-PCM: 1e-7)
    warmup_iters: int = _f(0, int)
    warmup_start_lr: float = _f(0.0, float)
    poly_power: float = _f(0.9, float)
    num_workers: int = _f(0, int)
    log_every: int = _f(20, int)
    checkpoint_every: int = _f(0, _int_or_0)   # N > 0: <model>.resume every N its


@dataclass(frozen=True, kw_only=True)
class ExportSeeds(AccelSettings):
    """``export_seeds`` (:func:`pipeline.steps.seeds.export_seeds`, ``multiscale_maps``)."""
    STAGE: ClassVar[str] = "export_seeds"
    TAKES_METHOD_KEYS: ClassVar[bool] = True
    device: str = "auto"
    split: str = "train"
    scales: tuple[float, ...] = _f((1.0,), _floats)
    flip: bool = _f(True, bool)
    norm: str = "max"                    # max | minmax | mean
    norm_eps: float = _f(1e-5, float)
    resize_square: int | None = _f(None, _opt(int))   # scale 1 = this square (ACR official)
    align_corners: bool = _f(False, bool)
    ms_flip_merge: str | None = None     # sum | max; null: the method's seed_merge, else sum
    ms_relu: str | None = None           # null: the method's seed_merge, else after_upsample


@dataclass(frozen=True, kw_only=True)
class EvalSeeds(StageSettings):
    """``eval_seeds`` (stage :mod:`stages.eval_seeds`, :func:`pipeline.steps.seeds.evaluate_maps`)."""
    STAGE: ClassVar[str] = "eval_seeds"
    split: str = "eval_train"
    bg_threshold: float = _f(conv=_opt(float))   # required: the fixed threshold
    curve: tuple[float, ...] = _f((), _floats)   # thresholds reported for information


@dataclass(frozen=True, kw_only=True)
class TrainAffinity(StageSettings):
    """``train_affinity`` (:func:`pipeline.steps.refine.affinity_train.train_affinity_net`; paper-scale
    PSA with a ResNet-50; the official PolyOptimizer has momentum 5e-4, as the `voc` profile sets it;
    see docs/methods/psa.md)."""
    STAGE: ClassVar[str] = "train_affinity"
    RECORD: ClassVar[tuple[str, ...]] = (
        "backbone", "pretrained", "feature_dim", "freeze_bn", "crop", "resize_long",
        "scale_range", "color_jitter", "batch_size", "iters", "epochs", "lr", "head_lr_mult",
        "weight_decay", "momentum", "poly_power", "radius", "alpha_low", "alpha_high", "crf",
        "label_pooling", "pairs", "seed", "num_workers", "log_every", "checkpoint_every")
    device: str = "auto"
    split: str = "train"
    seed_key: str | None = None          # null: the method's affinity_key
    backbone: str = "resnet50"
    pretrained: str | None = "hub"
    feature_dim: int = _f(448, int)
    freeze_bn: bool = _f(True, bool)
    crop: int = _f(448, int)
    resize_long: tuple[int, int] | None = _f(None, _opt(_ints))
    scale_range: tuple[float, float] | None = _f(None, _opt(_floats))
    color_jitter: tuple[float, ...] | None = _f((0.3, 0.3, 0.3, 0.1), _opt(tuple))
    batch_size: int = _f(8, int)
    iters: int | None = _f(None, _opt(int))   # null: `epochs` epochs
    epochs: int | None = _f(8, _opt(int))
    lr: float = _f(0.1, float)
    head_lr_mult: float = _f(10.0, float)
    weight_decay: float = _f(5e-4, float)
    momentum: float = _f(0.0, lambda v: float(v or 0.0))
    poly_power: float = _f(0.9, float)
    radius: int = _f(5, int)
    alpha_low: float = 4                 # numbers as given (CRF background powers)
    alpha_high: float = 32
    crf: Mapping[str, float] = _f(conv=_psa_crf_over, factory=lambda: FrozenMap(PSA_CRF))
    label_pooling: str = "avgpool"       # avgpool | centre
    pairs: str = "official"              # official | all
    num_workers: int = _f(4, int)
    log_every: int = _f(10, int)
    checkpoint_every: int = _f(0, _int_or_0)


@dataclass(frozen=True, kw_only=True)
class RefineSeeds(StageSettings):
    """``refine_seeds`` (:func:`pipeline.steps.refine.random_walk.refine_seeds`; PSA values)."""
    STAGE: ClassVar[str] = "refine_seeds"
    RECORD: ClassVar[tuple[str, ...]] = ("radius", "beta", "logt", "bg_alpha", "pairs", "border")
    device: str = "auto"
    split: str = "train"
    eval_split: str = "eval_train"
    seed_key: str | None = None          # null: the method's refine_key
    radius: int = _f(5, int)
    beta: float = 8                      # numbers as given (powers)
    logt: int = _f(8, int)
    bg_alpha: float = 16
    pairs: str = "official"              # keep equal to train_affinity.pairs
    #: pad: image and maps zero-padded to a multiple of 8 (official ``infer_aff.py``; partial
    #: border cells divided by 64) | valid: no padding, partial cells averaged over their pixels
    border: str = _f("pad", _one_of("pad", "valid"))


@dataclass(frozen=True, kw_only=True)
class MakePseudoLabels(StageSettings):
    """``make_pseudo_labels`` (:func:`pipeline.steps.pseudo.make_pseudo_labels`)."""
    STAGE: ClassVar[str] = "make_pseudo_labels"
    split: str = "train"
    eval_split: str = "eval_train"
    key: str = "probs"                   # map key of the refined HDF5
    crf: Mapping[str, float] | None = _f(None, _opt(_map))   # dense_crf keywords; null: argmax
    #: refined: the random walk's distribution (``refined.h5``, PSA chain) | seeds: the seeds'
    #: own distribution (``seeds.h5`` keys ``bpm_bg`` + ``bpm_fg``: ViT-PCM's BPM, official
    #: ``main.py test --crf``, no affinity stage) - :func:`pipeline.steps.pseudo.read_distribution`
    source: str = _f("refined", _one_of("refined", "seeds"))


@dataclass(frozen=True, kw_only=True)
class TrainSeg(AccelSettings):
    """``train_seg`` (:func:`pipeline.steps.segment.train_seg`; DeepLab-v2 paper values, VOC)."""
    STAGE: ClassVar[str] = "train_seg"
    RECORD: ClassVar[tuple[str, ...]] = (
        "backbone", "pretrained", "num_classes", "output_stride", "rates", "crop", "batch_size",
        "iters", "lr", "momentum", "weight_decay", "poly_power", "scale_range", "freeze_bn",
        "seed", "num_workers", "log_every", "num_threads", "checkpoint_every", "amp",
        "channels_last", "compile")
    device: str = "auto"
    split: str = "train"
    backbone: str = "resnet101"
    pretrained: str | None = "hub"       # timm's ImageNet weights of `backbone`
    num_classes: int = _f(21, int)       # the stage sets the manifest's class count
    output_stride: int = _f(8, int)
    rates: tuple[int, ...] = _f((6, 12, 18, 24), _ints)
    crop: int = _f(321, int)
    batch_size: int = _f(10, int)
    iters: int = _f(20000, int)
    lr: float = _f(2.5e-4, float)        # backbone; ASPP head 10x
    momentum: float = _f(0.9, float)
    weight_decay: float = _f(5e-4, float)
    poly_power: float = _f(0.9, float)
    scale_range: tuple[float, float] = _f((0.5, 1.5), _floats)
    freeze_bn: bool | None = _f(None, _opt(bool))   # null: frozen iff pretrained weights
    num_workers: int = _f(4, int)
    log_every: int = _f(100, int)
    num_threads: int | None = _f(None, _opt(int))   # torch CPU threads during the call
    checkpoint_every: int = _f(0, _int_or_0)


@dataclass(frozen=True, kw_only=True)
class EvalOwnSeg(StageSettings):
    """``eval_own_seg`` (:func:`pipeline.steps.own_seg.evaluate_own_seg`; AFA test time)."""
    STAGE: ClassVar[str] = "eval_own_seg"
    TAKES_METHOD_KEYS: ClassVar[bool] = True
    #: keys the plug-in's ``segment`` never received
    HOST_KEYS: ClassVar[tuple[str, ...]] = ("data", "device", "split", "seed")
    device: str = "auto"
    split: str = "val"
    scales: tuple[float, ...] = _f((1.0,), _floats)
    flip: bool = _f(True, bool)
    merge: str = "max"                   # max | mean over scales


@dataclass(frozen=True, kw_only=True)
class EvalSeg(StageSettings):
    """``eval_seg`` (:func:`pipeline.steps.segment_eval.evaluate`; DeepLab-v2 multi-scale test)."""
    STAGE: ClassVar[str] = "eval_seg"
    RECORD: ClassVar[tuple[str, ...]] = ("scales", "flip", "crf", "num_threads", "protocols")
    device: str = "auto"
    split: str = "val"
    scales: tuple[float, ...] = _f((0.5, 0.75, 1.0), _floats)
    flip: bool = _f(True, bool)
    crf: Mapping[str, float] | None = _f(None, _opt(_map))   # dense_crf keywords or null
    num_threads: int | None = _f(None, _opt(int))
    protocols: tuple[str, ...] = _f((), _opt(tuple))   # extra numbers (segment_eval.PROTOCOLS)


#: stage name -> settings class
SETTINGS: dict[str, type[StageSettings]] = {c.STAGE: c for c in (
    TrainCls, ExportSeeds, EvalSeeds, TrainAffinity, RefineSeeds, MakePseudoLabels, TrainSeg,
    EvalOwnSeg, EvalSeg)}
#: fields set by :func:`pipeline.io.config.stage_params`, not by a profile's stage section
CONTEXT_KEYS = ("data", "seed")


def profile_keys(stage: str) -> tuple[str, ...]:
    """The keys a ``profiles.<d>.<stage>`` section may set: the fields of the stage's settings
    class but :data:`CONTEXT_KEYS` (empty for a stage without one, e.g. prepare_dataset)."""
    cls = SETTINGS.get(stage)
    return tuple(n for n in cls.field_names() if n not in CONTEXT_KEYS) if cls else ()
