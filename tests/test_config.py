"""params.yaml structure: the keys dvc.yaml declares exist, and stage_params merges in order."""
import copy

import pytest

from pipeline.io.config import (METHOD_STAGES, STAGES, ConfigError, check_complete, load_params,
                             stage_params)
from tests.conftest import REPO, copy_snakefile


def test_repository_params_are_complete():
    check_complete(load_params(REPO / "params.yaml"))


def test_missing_method_stage_is_named():
    cfg = load_params(REPO / "params.yaml")
    bad = copy.deepcopy(cfg)
    del bad["methods"]["cam"]["eval_seg"]
    del bad["profiles"]["demo"]["train_seg"]
    with pytest.raises(ConfigError) as e:
        check_complete(bad)
    assert "methods.cam.eval_seg" in str(e.value) and "profiles.demo.train_seg" in str(e.value)


def test_merge_order_profile_then_method_then_by_method():
    cfg = {
        "seed": 3,
        "datasets": {"d": {"root": "r"}},
        "methods": {"m": {st: {} for st in METHOD_STAGES}, "n": {st: {} for st in METHOD_STAGES}},
        "profiles": {"d": {st: {} for st in STAGES}},
    }
    cfg["profiles"]["d"]["refine_seeds"] = {"a": 1, "b": 1, "c": 1, "by_method": {"m": {"c": 3}}}
    cfg["methods"]["m"]["refine_seeds"] = {"b": 2, "c": 2}
    check_complete(cfg)
    p = stage_params(cfg, "d", "m", "refine_seeds")
    assert p == {"data": {"root": "r"}, "seed": 3, "a": 1, "b": 2, "c": 3}
    # another method sees neither m's section nor m's by_method entry
    assert stage_params(cfg, "d", "n", "refine_seeds") == {"data": {"root": "r"}, "seed": 3,
                                                           "a": 1, "b": 1, "c": 1}
    with pytest.raises(ConfigError, match="unknown method"):
        stage_params(cfg, "d", "zzz", "refine_seeds")


@pytest.mark.parametrize("edit,expected", [
    (lambda c: c["profiles"]["demo"]["train_cls"].update(itres=5),
     "unknown key `profiles.demo.train_cls.itres` (did you mean `iters`?)"),
    (lambda c: c["profiles"]["demo"]["make_pseudo_labels"]["crf"].update(bilateral_rgb=3),
     "`profiles.demo.make_pseudo_labels.crf.bilateral_rgb` (did you mean `bilateral_srgb`?)"),
    (lambda c: c["run"].update(methods=["acr", "camm"]), "run.methods lists `camm`"),
    (lambda c: c.update(sed=1), "unknown top-level key `sed` (did you mean `seed`?)"),
    (lambda c: c["profiles"]["demo"].update(train_seeg={}), "`profiles.demo.train_seeg` (did you mean `train_seg`?)"),
    (lambda c: c["profiles"]["demo"]["refine_seeds"].update(by_method={"acrr": {}}), "by_method.acrr` names no method"),
])
def test_misspelt_keys_are_named(edit, expected):
    from pipeline.io.config import validate
    cfg = load_params(REPO / "params.yaml")
    validate(cfg)
    edit(cfg)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert expected in str(e.value)


def test_misspelt_key_stops_snakemake_with_the_key_named(tmp_path):
    import subprocess
    import sys
    copy_snakefile(tmp_path)
    text = (REPO / "params.yaml").read_text()
    i = text.index("      bg_alpha: 16", text.index("  demo:\n    prepare_dataset"))  # the demo profile's
    (tmp_path / "params.yaml").write_text(text[:i] + "      bg_alfa: 16" + text[i + 18:])
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1",
                        "results/demo/acr/miou.json"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0
    assert "unknown key `profiles.demo.refine_seeds.bg_alfa` (did you mean `bg_alpha`?)" in r.stdout + r.stderr


def test_duplicate_key_is_refused(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: 0\nprofiles:\n  demo:\n    train_cls:\n      by_method: {a: {}}\n"
                 "      iters: 3\n      by_method: {b: {}}\n")
    with pytest.raises(ConfigError, match=r"line 7: key `by_method` is given twice .*first on line 5"):
        load_params(f)


# ------------------------------------------------------------------ workflow/schemas/config.schema.yaml
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def test_schema_keys_are_those_pipeline_config_validates():
    """The JSON Schema and pipeline.io.config.validate agree on the keys they allow."""
    import yaml

    from pipeline.io.config import REPORT_KEYS, RUN_KEYS, TOP_LEVEL
    props = yaml.safe_load(SCHEMA.read_text())["properties"]
    assert set(props) == TOP_LEVEL
    assert set(props["run"]["properties"]) == RUN_KEYS
    assert set(props["report"]["properties"]) == REPORT_KEYS

    def keys(node):
        if isinstance(node, dict):
            yield from node
            for v in node.values():
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)
    assert "default" not in set(keys(yaml.safe_load(SCHEMA.read_text())))  # validate() would write defaults into the params


@pytest.mark.parametrize("edit, ok", [
    (lambda c: None, True),
    (lambda c: c["run"].update(shards="2", gpus=None), True),   # --config run='{shards: 2}' gives '2'
    (lambda c: c.update(seed="zero"), False),
    (lambda c: c["run"].update(shards="two"), False),
    (lambda c: c["run"].update(datasets="demo"), False),
    (lambda c: c["methods"].update(cam=[]), False),
    (lambda c: c["profiles"]["demo"].update(train_cls=3), False),
    (lambda c: c.update(extra=1), False),
])
def test_schema_checks_structure_and_types(edit, ok):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate as validate_schema
    cfg = load_params(REPO / "params.yaml")
    edit(cfg)
    before = copy.deepcopy(cfg)
    if ok:
        validate_schema(cfg, str(SCHEMA))
        assert cfg == before
    else:
        with pytest.raises(WorkflowError):
            validate_schema(cfg, str(SCHEMA))


# ------------------------------------------------------------------ profiles.<d>.inherit
def _inheriting_cfg(**profiles) -> dict:
    return {"seed": 0, "datasets": {d: {"root": d} for d in profiles},
            "methods": {"m": {st: {} for st in METHOD_STAGES}}, "profiles": profiles}


def test_child_profile_gets_the_parents_keys_and_its_own_win():
    from pipeline.io.config import resolve_profiles
    cfg = _inheriting_cfg(
        base={"train_cls": {"iters": 10, "lr": 0.1, "backbone": {"name": "a", "overrides": {"x": 1}},
                            "by_method": {"m": {"iters": 20, "crop": 8}}},
              "eval_seg": {"flip": True}},
        mid={"inherit": "base", "train_cls": {"lr": 0.2, "backbone": {"overrides": None}}},
        leaf={"inherit": "mid", "train_cls": {"by_method": {"m": {"iters": 30}}}, "eval_seg": {}})
    raw = copy.deepcopy(cfg)
    r = resolve_profiles(cfg)["profiles"]
    assert cfg == raw   # not modified in place
    assert r["mid"] == {"train_cls": {"iters": 10, "lr": 0.2, "backbone": {"name": "a", "overrides": None},
                                      "by_method": {"m": {"iters": 20, "crop": 8}}},
                        "eval_seg": {"flip": True}}
    assert r["leaf"]["train_cls"]["by_method"] == {"m": {"iters": 30, "crop": 8}}   # chain: base -> mid -> leaf
    assert r["leaf"]["train_cls"]["lr"] == 0.2 and r["leaf"]["eval_seg"] == {"flip": True}
    assert stage_params(cfg, "leaf", "m", "train_cls")["iters"] == 30   # stage_params resolves a raw config too
    assert resolve_profiles(resolve_profiles(cfg)) == resolve_profiles(cfg)


@pytest.mark.parametrize("profiles, expected", [
    ({"a": {"inherit": "b"}, "b": {"inherit": "a"}}, "`profiles.b.inherit` makes a cycle (a -> b -> a)"),
    ({"a": {"inherit": "a"}}, "`profiles.a.inherit` makes a cycle (a -> a)"),
    ({"a": {}, "b": {"inherit": "aa"}}, "`profiles.b.inherit: aa` names no profile (did you mean `a`?)"),
])
def test_inheritance_cycle_or_unknown_parent_is_refused(profiles, expected):
    from pipeline.io.config import resolve_profiles, validate
    for check in (resolve_profiles, validate):
        with pytest.raises(ConfigError) as e:
            check(_inheriting_cfg(**profiles))
        assert expected in str(e.value)


def test_misspelt_key_in_an_inheriting_profile_is_named():
    from pipeline.io.config import validate
    raw = load_params(REPO / "params.yaml", resolve=False)
    assert raw["profiles"]["coco"]["inherit"] == "voc"
    validate(raw)
    raw["profiles"]["coco"]["eval_seeds"]["bg_treshold"] = 0.3
    with pytest.raises(ConfigError, match=r"`profiles.coco.eval_seeds.bg_treshold` \(did you mean `bg_threshold`\?\)"):
        validate(raw)


def test_repository_params_as_written_list_every_stage():
    """DVC reads params.yaml unresolved: an inheriting profile still lists every stage."""
    check_complete(load_params(REPO / "params.yaml", resolve=False))


def test_coco_resolves_to_voc_except_its_own_keys():
    """Every coco stage's params equal voc's, except the data and exactly the leaves coco sets."""
    raw = load_params(REPO / "params.yaml", resolve=False)
    cfg = load_params(REPO / "params.yaml")
    own = raw["profiles"]["coco"]

    def leaves(d, pre=()):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, (*pre, k))
            else:
                yield (*pre, k), v

    def drop(d, path):
        for k in path[:-1]:
            d = d.get(k) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(path[-1], None)

    n = 0
    for m in [None, *sorted(cfg["methods"])]:
        for st in STAGES:
            v, c = stage_params(cfg, "voc", m, st), stage_params(cfg, "coco", m, st)
            assert c["data"] == cfg["datasets"]["coco"]
            sec = copy.deepcopy(own.get(st) or {})
            by = sec.pop("by_method", {}) or {}
            keys = [p for p, _ in leaves(sec)] + [p for p, _ in leaves(by.get(m) or {})]
            for p, val in list(leaves(sec)) + list(leaves(by.get(m) or {})):
                node = c
                for k in p:
                    node = node[k]
                assert node == val, (m, st, p)   # the child's value wins
            for p in [("data",), *keys]:
                drop(v, p)
                drop(c, p)
            assert c == v, (m, st)
            n += len(keys)
    assert n > 0
