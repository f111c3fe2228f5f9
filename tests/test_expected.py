"""The demo chain's expected values (tests/expected/demo-acr/{cpu signature}.json): the
comparison CI runs after `make demo`, the per-CPU-type choice of record, and the README's demo
rows, which must quote the same numbers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


from pipeline.steps import summary

REPO = Path(__file__).resolve().parents[1]
EXPECTED = REPO / "tests/expected/demo-acr"


def _chain(d: Path, seeds=0.25, segm=0.125) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "seeds_miou.json").write_text(json.dumps(
        {"miou": seeds, "iou": {"background": 0.5, "cat": 0.0}, "other_keys": {"cams_star": 0.375},
         "params": {"seed": 0}, "num_images": 2}))
    (d / "miou.json").write_text(json.dumps(
        {"miou": segm, "iou": {"background": 0.25, "cat": 0.0},
         "stages": {"seeds": seeds, "segmentation": segm}, "timing": {"seconds": 3.5},
         "protocols": {"single_scale": {"miou": segm / 2, "crf_seconds": 0.25}}}))
    return d


def test_write_then_check_round_trips_and_ignores_provenance(tmp_path, capsys):
    chain = _chain(tmp_path / "chain")
    exp = tmp_path / "expected.json"
    assert summary.main(["--write", str(exp), str(chain)]) == 0
    rec = json.loads(exp.read_text())
    assert set(rec) == {"miou.json", "seeds_miou.json"}
    assert "params" not in rec["seeds_miou.json"] and "timing" not in rec["miou.json"]
    assert rec["seeds_miou.json"]["other_keys"] == {"cams_star": 0.375}
    # provenance (params, timing) may change without failing the check
    d = json.loads((chain / "miou.json").read_text())
    d["timing"]["seconds"] = 99.0
    d["protocols"]["single_scale"]["crf_seconds"] = 7.0   # wall clock inside a result section
    (chain / "miou.json").write_text(json.dumps(d))
    assert summary.main(["--check", str(exp), str(chain)]) == 0
    d["protocols"]["single_scale"]["miou"] = 0.5            # ... but its mIoU is compared
    (chain / "miou.json").write_text(json.dumps(d))
    assert summary.main(["--check", str(exp), str(chain)]) == 1


def test_check_names_every_changed_value_exactly(tmp_path, capsys):
    exp = tmp_path / "expected.json"
    summary.main(["--write", str(exp), str(_chain(tmp_path / "a"))])
    # a change in the 17th significant digit is a change: the comparison is exact
    changed = _chain(tmp_path / "b", seeds=0.25 + 2 ** -52)
    assert summary.main(["--check", str(exp), str(changed)]) == 1
    err = capsys.readouterr().err
    assert "seeds_miou.json.miou: expected 0.25, got 0.2500000000000002" in err
    assert "miou.json.stages.seeds" in err and "make expected" in err
    (changed / "seeds_miou.json").unlink()
    assert summary.main(["--check", str(exp), str(changed)]) == 1
    assert "seeds_miou.json.iou.cat: expected 0.0, missing" in capsys.readouterr().err


def test_compare_lists_nothing_for_equal_values():
    v = {"miou.json": {"miou": 0.1, "iou": {"a": 0.2}}}
    assert summary.compare(v, json.loads(json.dumps(v))) == []
    assert summary.compare(v, {"miou.json": {"miou": 0.1, "iou": {"a": 0.2, "b": 0.0}}}) == [
        "miou.json.iou.b: 0.0, not in the expected file"]


def test_folder_record_is_chosen_by_cpu_signature(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "records"
    monkeypatch.setattr(summary, "cpu_signature", lambda: "VendorA-AVX2")
    assert summary.main(["--write", str(folder), str(_chain(tmp_path / "a"))]) == 0
    assert [f.name for f in folder.iterdir()] == ["VendorA-AVX2.json"]
    assert summary.main(["--check", str(folder), str(_chain(tmp_path / "a"))]) == 0
    # the same CPU type with other numbers: exact comparison, so it fails
    assert summary.main(["--check", str(folder), str(_chain(tmp_path / "b", seeds=0.375))]) == 1
    assert "VendorA-AVX2.json" in capsys.readouterr().err
    # another CPU type records its own file next to it, and is checked against that one
    monkeypatch.setattr(summary, "cpu_signature", lambda: "VendorB-AVX512")
    assert summary.main(["--write", str(folder), str(_chain(tmp_path / "b", seeds=0.375))]) == 0
    assert sorted(f.name for f in folder.iterdir()) == ["VendorA-AVX2.json", "VendorB-AVX512.json"]
    assert summary.main(["--check", str(folder), str(_chain(tmp_path / "b", seeds=0.375))]) == 0
    assert summary.main(["--check", str(folder), str(_chain(tmp_path / "a"))]) == 1


def test_cpu_type_without_record_checks_the_structure_only(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "records"
    monkeypatch.setattr(summary, "cpu_signature", lambda: "VendorA-AVX2")
    summary.main(["--write", str(folder), str(_chain(tmp_path / "a"))])
    monkeypatch.setattr(summary, "cpu_signature", lambda: "VendorC-DEFAULT")
    # other values, same structure: not comparable exactly, so it passes and says why
    chain = _chain(tmp_path / "c", seeds=0.375, segm=0.0625)
    assert summary.main(["--check", str(folder), str(chain)]) == 0
    out = capsys.readouterr()
    assert "no record for this CPU type (VendorC-DEFAULT.json)" in out.err
    assert "VendorA-AVX2" in out.err and "make expected" in out.err
    assert not (folder / "VendorC-DEFAULT.json").exists()
    # ... but a missing stage, a value outside [0, 1] or a changed setting fails
    d = json.loads((chain / "miou.json").read_text())
    d["protocols"]["single_scale"]["miou"] = 1.5
    d["stages"]["pseudo"] = 0.5
    (chain / "miou.json").write_text(json.dumps(d))
    (chain / "seeds_miou.json").write_text(json.dumps(
        {"miou": 0.25, "iou": {"background": 0.5, "cat": 0.0}, "other_keys": {"cams_star": "x"}}))
    assert summary.main(["--check", str(folder), str(chain)]) == 1
    err = capsys.readouterr().err
    assert "miou.json.protocols.single_scale.miou: 1.5 is not a value in [0, 1]" in err
    assert "miou.json.stages.pseudo: not in the expected file" in err
    assert "seeds_miou.json.other_keys.cams_star: 'x' is not a value in [0, 1]" in err
    (chain / "seeds_miou.json").unlink()
    assert summary.main(["--check", str(folder), str(chain)]) == 1
    assert "seeds_miou.json.miou: missing" in capsys.readouterr().err


def test_compare_structure_against_brute_force_leaf_rules():
    e = {"f": {"miou": 0.5, "crf": {"sxy": 67, "scales": [0.75, 1.0]}, "note": "txt", "x": None}}
    same = json.loads(json.dumps(e))
    same["f"]["miou"] = 0.0
    assert summary.compare_structure(e, same) == []
    for path, bad in [(("crf", "sxy"), 80), (("crf", "scales"), [1.0]), (("note",), "other"),
                      (("x",), 0)]:
        a = json.loads(json.dumps(e))
        node = a["f"]
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = bad
        assert len(summary.compare_structure(e, a)) == 1, (path, bad)
    a = json.loads(json.dumps(e))
    a["f"]["miou"] = float("nan")
    assert summary.compare_structure(e, a) == ["f.miou: nan is not a value in [0, 1]"]


def test_no_record_at_all_is_an_error_naming_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="make expected"):
        summary.main(["--check", str(tmp_path / "empty"), str(_chain(tmp_path / "a"))])


def test_cpu_signature_is_vendor_and_torch_capability():
    import torch
    sig = summary.cpu_signature()
    vendor, cap = sig.rsplit("-", 1)
    assert cap == torch.backends.cpu.get_cpu_capability() and vendor
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "vendor_id" in cpuinfo.read_text():
        assert vendor in cpuinfo.read_text()


def test_readme_demo_rows_quote_the_expected_values():
    """One README row `| demo / acr (SIGNATURE) |` per record in tests/expected/demo-acr/, each
    quoting its record rounded to 0.1 %: a change that moves the numbers updates both in the
    same commit."""
    records = {f.stem: json.loads(f.read_text()) for f in EXPECTED.glob("*.json")}
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"\| demo / acr \(([\w-]+)\) \|", line)
        if m:
            rows[m.group(1)] = line
    assert records and set(rows) == set(records), (sorted(rows), sorted(records))
    for sig, rec in records.items():
        cells = [c.strip() for c in rows[sig].strip("|").split("|")][1:6]
        quoted = [float(re.match(r"[\d.]+", c).group()) for c in cells]
        want = [rec["seeds_miou.json"]["miou"], rec["seeds_miou.json"]["other_keys"]["cams_star"],
                rec["refined_miou.json"]["miou"], rec["pseudo_miou.json"]["miou"],
                rec["miou.json"]["miou"]]
        assert quoted == [round(100 * v, 1) for v in want], (
            f"README demo/acr ({sig}) row {quoted} != {sig}.json {[round(100 * v, 1) for v in want]}")
