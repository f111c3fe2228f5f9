"""The demo chain's expected values (tests/expected/demo-acr.json): the comparison CI runs
after `make demo`, and the README's demo row, which must quote the same numbers."""
from __future__ import annotations

import json
import re
from pathlib import Path


from pipeline.steps import summary

REPO = Path(__file__).resolve().parents[1]
EXPECTED = REPO / "tests/expected/demo-acr.json"


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


def test_readme_demo_row_quotes_the_expected_values():
    """README's `| demo / acr |` row = the expected file, rounded to 0.1 %: a change that moves
    the numbers updates both in the same commit."""
    rec = json.loads(EXPECTED.read_text())
    row = next(l for l in (REPO / "README.md").read_text().splitlines()
               if l.startswith("| demo / acr |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:6]
    quoted = [float(re.match(r"[\d.]+", c).group()) for c in cells]
    want = [rec["seeds_miou.json"]["miou"], rec["seeds_miou.json"]["other_keys"]["cams_star"],
            rec["refined_miou.json"]["miou"], rec["pseudo_miou.json"]["miou"],
            rec["miou.json"]["miou"]]
    assert quoted == [round(100 * v, 1) for v in want], (
        f"README demo/acr row {quoted} != {EXPECTED.name} {[round(100 * v, 1) for v in want]}")
