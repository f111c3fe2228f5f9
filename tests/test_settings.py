"""pipeline/io/settings.py: the typed settings of the stages agree with params.yaml, its schema
and pipeline.io.config.validate; their defaults are what the library uses; unknown keys are
named; the records (checkpoints, metrics `params`) keep the params as given."""
import argparse
import copy
import dataclasses
import json
import pickle

import pytest
import torch

from pipeline.io.config import (METHOD_STAGES, STAGES, ConfigError, load_params, method_keys,
                             stage_params, validate)
from pipeline.io.settings import (CONTEXT_KEYS, SETTINGS, EvalSeeds, EvalSeg, ExportSeeds,
                               RefineSeeds, TrainAffinity, TrainCls, TrainSeg, profile_keys)
from tests.conftest import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def _plain(v):
    if isinstance(v, dict) or hasattr(v, "items"):
        return {k: _plain(x) for k, x in v.items()}
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _defaults(cls) -> dict:
    """Every non-context field with a default, in params.yaml (JSON-like) form."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in ("method", *CONTEXT_KEYS):
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _plain(f.default_factory())
    return out


def test_every_field_is_accepted_by_validate_and_the_schema():
    """A non-reference profile may set every field of its stage's settings class (the
    defaults as values; required fields keep demo's), and the JSON Schema accepts it."""
    from snakemake.utils import validate as validate_schema
    cfg = load_params(REPO / "params.yaml")
    for st, cls in SETTINGS.items():
        sec = cfg["profiles"]["demo"][st]
        assert set(profile_keys(st)) == set(cls.field_names()) - set(CONTEXT_KEYS)
        for k, v in _defaults(cls).items():
            sec[k] = v
        assert set(cls.required()) <= set(sec), (st, cls.required())
    validate(cfg)
    validate_schema(cfg, str(SCHEMA))
    # and one misspelt field is still refused, naming the closest field
    cfg["profiles"]["demo"]["train_seg"]["num_thread"] = 1
    with pytest.raises(ConfigError, match=r"`profiles.demo.train_seg.num_thread` \(did you mean "
                                          r"`num_threads`\?\).*pipeline.io.settings.TrainSeg"):
        validate(cfg)


def test_every_reference_profile_key_is_a_field():
    """profiles.voc (the key list validate checks against) holds only settings fields: no
    profile key the library would not read."""
    ref = load_params(REPO / "params.yaml")["profiles"]["voc"]
    for st, cls in SETTINGS.items():
        extra = set(ref[st]) - {"by_method"} - set(cls.field_names())
        assert not extra, (st, extra)
    assert set(SETTINGS) == set(METHOD_STAGES)


@pytest.mark.parametrize("dataset", ["demo", "vocsample", "voc", "coco"])
def test_params_yaml_builds_every_stage_and_keeps_the_params(dataset):
    cfg = load_params(REPO / "params.yaml")
    for m in sorted(cfg["methods"]):
        for st, cls in SETTINGS.items():
            p = stage_params(cfg, dataset, m, st)
            s = cls.from_params(p, method_keys(cfg, dataset, m, st))
            assert s.as_dict() == p                     # what plug-ins get / files record
            assert set(s.method) <= set(method_keys(cfg, dataset, m, st))
            assert not s.method or cls.TAKES_METHOD_KEYS
            assert pickle.loads(pickle.dumps(s)) == s   # DataLoader / spawn workers
    acr = RefineSeeds.from_params(stage_params(cfg, "demo", "acr", "refine_seeds"))
    assert acr.seed_key == "cams_star" and acr.split == "train"   # by_method wins


def _minimal_cfg(sections: dict) -> dict:
    return {"seed": 4, "datasets": {"d": {"root": "r"}},
            "methods": {"m": {st: {} for st in METHOD_STAGES}},
            "profiles": {"d": {st: copy.deepcopy(sections.get(st, {})) for st in STAGES}}}


#: values the docstrings / module docs state (paper values), for the test below
DOCUMENTED = {
    "train_seg": {"crop": 321, "batch_size": 10, "iters": 20000, "lr": 2.5e-4, "momentum": 0.9,
                  "weight_decay": 5e-4, "poly_power": 0.9, "scale_range": (0.5, 1.5),
                  "rates": (6, 12, 18, 24), "output_stride": 8, "backbone": "resnet101",
                  "num_classes": 21, "freeze_bn": None, "amp": "off"},
    "eval_seg": {"scales": (0.5, 0.75, 1.0), "flip": True, "crf": None, "protocols": (),
                 "split": "val"},
    "train_affinity": {"backbone": "resnet50", "feature_dim": 448, "crop": 448, "lr": 0.1,
                       "momentum": 0.0, "weight_decay": 5e-4, "epochs": 8, "iters": None,
                       "radius": 5, "alpha_low": 4, "alpha_high": 32, "pairs": "official",
                       "label_pooling": "avgpool", "head_lr_mult": 10.0},
    "refine_seeds": {"radius": 5, "beta": 8, "logt": 8, "bg_alpha": 16, "pairs": "official",
                     "split": "train", "eval_split": "eval_train", "seed_key": None},
    "export_seeds": {"scales": (1.0,), "flip": True, "norm": "max", "norm_eps": 1e-5,
                     "ms_flip_merge": None, "resize_square": None},
    "eval_seeds": {"curve": (), "split": "eval_train"},
    "make_pseudo_labels": {"crf": None, "key": "probs"},
    "eval_own_seg": {"scales": (1.0,), "flip": True, "merge": "max", "split": "val"},
    "train_cls": {"optimizer": "adamw", "weight_decay": 0.01, "momentum": 0.9, "hflip": True,
                  "scale_range": (1.0, 1.0), "warmup_iters": 0, "poly_power": 0.9,
                  "log_every": 20, "checkpoint_every": 0, "iters": None},
}
REQUIRED = {"train_cls": {"backbone": {"name": "vit_tiny_patch16_224"}, "crop": 32,
                          "batch_size": 2, "lr": 1e-3},
            "eval_seeds": {"bg_threshold": 0.3}}


def test_section_with_only_required_keys_gives_the_documented_defaults():
    from pipeline.steps.refine.crf import PSA_CRF
    assert PSA_CRF == {"gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 80,
                       "bilateral_srgb": 13, "bilateral_compat": 10, "iters": 10}   # PSA's
    cfg = _minimal_cfg(REQUIRED)
    validate(cfg)
    for st, cls in SETTINGS.items():
        s = cls.from_params(stage_params(cfg, "d", "m", st), method_keys(cfg, "d", "m", st))
        assert s.seed == 4 and s.data == {"root": "r"}
        for k, v in _defaults(cls).items():
            assert _plain(getattr(s, k)) == v, (st, k)
        for k, v in DOCUMENTED[st].items():
            assert getattr(s, k) == v, (st, k)
    assert dict(TrainAffinity().crf) == PSA_CRF
    with pytest.raises(ConfigError, match=r"`profiles.d.eval_seeds` lacks `bg_threshold`"):
        EvalSeeds.from_params(stage_params(_minimal_cfg({}), "d", "m", "eval_seeds"),
                              where="profiles.d.eval_seeds")


def test_library_uses_the_dataclass_defaults(tmp_path, monkeypatch):
    """train_seg with a params dict that omits momentum / weight_decay / rates...: the
    optimiser and the model get TrainSeg's defaults, and the checkpoint records them."""
    import pipeline.steps.segment as seg
    from pipeline.steps.cls import make_optimizer, train_iterations
    from tests.test_segment import TINY, _make_dataset
    root = tmp_path / "voc"
    ids = _make_dataset(root, n=2)
    seen = {}
    real_sgd = torch.optim.SGD

    def spy(params, **kw):
        seen.update(kw)
        return real_sgd(params, **kw)
    monkeypatch.setattr(torch.optim, "SGD", spy)
    given = dict(TINY, iters=1, batch_size=2)
    m = seg.train_seg(root, ids, root / "SegmentationClass", tmp_path / "m.pth", given,
                      log=lambda s: None)
    monkeypatch.undo()
    d = TrainSeg()
    assert seen == {"lr": given["lr"], "momentum": d.momentum, "weight_decay": d.weight_decay}
    ck = torch.load(tmp_path / "m.pth", weights_only=True)["params"]
    assert list(ck) == list(TrainSeg.RECORD) and ck == m["params"]
    for k in set(TrainSeg.RECORD) - set(given):
        assert ck[k] == _plain(getattr(d, k)), k
    assert ck["rates"] == [6, 12, 18, 24] and ck["num_threads"] is None
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, {"lr": 1e-3})
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == TrainCls.__dataclass_fields__["weight_decay"].default
    assert train_iterations({"epochs": 2}, 10, 4) == 4


def test_unknown_keys_are_named_with_the_closest_field():
    with pytest.raises(ConfigError, match=r"unknown key `profiles.demo.train_seg.lr_` "
                                          r"\(did you mean `lr`\?\).*pipeline.io.settings.TrainSeg"):
        TrainSeg.from_params({"lr_": 0.1}, where="profiles.demo.train_seg")
    # a method key of a stage no plug-in reads: named in the method's section
    with pytest.raises(ConfigError, match=r"`methods.acr.refine_seeds.bta` \(did you mean `beta`"):
        RefineSeeds.from_params({"bta": 1}, {"bta": "methods.acr.refine_seeds"},
                                where="profiles.demo.refine_seeds")
    # a plug-in stage keeps the method's keys, read-only, and in the params it records
    s = TrainCls.from_params({**REQUIRED["train_cls"], "head": "gmp", "iters": 3}, ["head"])
    assert dict(s.method) == {"head": "gmp"} and s.iters == 3
    assert s.as_dict() == {**REQUIRED["train_cls"], "head": "gmp", "iters": 3}
    with pytest.raises(TypeError):
        s.method["head"] = "gap"
    with pytest.raises(ConfigError, match="unknown key `train_cls.heda`"):
        TrainCls.from_params({**REQUIRED["train_cls"], "heda": "gmp"}, ["head"])
    with pytest.raises(ConfigError, match=r"`eval_seg.scales` = 'big' is not valid"):
        EvalSeg.of({"scales": "big"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainSeg().lr = 1.0


def test_records_keep_the_values_as_given():
    """Typed values for the library, the params as written for the files (an int stays an
    int in the checkpoint / fingerprint); updated() changes both."""
    s = TrainSeg.from_params({"lr": 1, "rates": [2, 4], "seed": 3})
    assert s.lr == 1.0 and isinstance(s.lr, float) and s.rates == (2, 4)
    r = s.record()
    assert r["lr"] == 1 and isinstance(r["lr"], int) and r["rates"] == [2, 4] and r["seed"] == 3
    assert s.as_dict() == {"lr": 1, "rates": [2, 4], "seed": 3}
    u = s.updated(num_classes=5)
    assert u.num_classes == 5 and u.record()["num_classes"] == 5 and s.num_classes == 21
    assert u.as_dict() == {"lr": 1, "rates": [2, 4], "seed": 3, "num_classes": 5}
    # refine_seeds' HDF5 params: the RECORD keys (defaults filled) then the params as given
    q = RefineSeeds.from_params({"data": {"root": "x"}, "beta": 9})
    assert list({**q.record(), **q.as_dict()}) == ["radius", "beta", "logt", "bg_alpha",
                                                   "pairs", "border", "data"]
    e = ExportSeeds(scales=[1, 0.5])     # direct construction converts too
    assert e.scales == (1.0, 0.5) and e.as_dict()["scales"] == [1.0, 0.5]


def test_stage_settings_from_params_yaml_and_from_json(tmp_path):
    """stages._common.stage_settings: from params.yaml the method's keys are known (an
    unknown method key of a stage without plug-in is refused); --params-json hands every
    non-field key to the method."""
    import yaml
    from stages._common import stage_settings
    cfg = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg["methods"]["acr"]["refine_seeds"]["bogus"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    args = argparse.Namespace(dataset="demo", method="acr", params=str(tmp_path / "params.yaml"),
                              params_json=None)
    with pytest.raises(ConfigError, match=r"unknown key `methods.acr.refine_seeds.bogus`.*no "
                                          r"method plug-in reads"):
        stage_settings(args, "refine_seeds")
    s = stage_settings(args, "export_seeds")
    assert isinstance(s, ExportSeeds) and s.method["seed_layers"] == [-2, -1]
    assert s.norm == "minmax"                   # methods.acr.export_seeds sets a field
    p = stage_params(load_params(REPO / "params.yaml"), "demo", "acr", "train_cls")
    args.params_json = json.dumps(p)
    t = stage_settings(args, "train_cls")
    assert t.as_dict() == p and "alpha" in t.method and t.crop == 96
