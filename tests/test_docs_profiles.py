"""docs/methods/*.md tables against params.yaml: the documented `voc` (and `coco`) values are
the values a stage really sees.

Table format (every table of a method doc that has a ``key (stage)`` column):

* ``key (stage)``: the params key(s) of the row, backticked, as ``<stage>.<key>[.<sub>...]``,
  several separated by commas; ``<stage>.{a, b}`` is short for ``<stage>.a, <stage>.b``.
  ``—`` (optionally followed by a reason) marks a row without a key (an architecture fact,
  a constant of the code).
* ``\\`voc\\` profile`` / ``\\`coco\\` profile``: the first backticked spans of the cell are the
  literal YAML values of the row's keys, in order (``yaml.safe_load``); text and spans after
  them are commentary.

Each value is compared with ``stage_params(load_params(), <profile>, <method>, <stage>)``
(PSA, not a method, is checked on the profile alone: ``method=None``). A doc's keys that a
COCO table does not list must have the same value in ``coco`` as in ``voc`` (``coco``
inherits ``voc``), so a COCO-specific value cannot hide behind the `voc` column.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.io.config import STAGES, load_params, stage_params

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "methods"
#: doc stem -> the method whose stage_params the doc describes (None: profile only)
DOC_METHOD = {"acr": "acr", "afa": "afa", "mcc": "mcc", "smaf": "smaf", "vitpcm": "vitpcm",
              "psa": None}
#: fewest keyed `voc` rows each doc must keep (an emptied or unparsable table fails); lower
#: it only when a row is removed on purpose
MIN_KEYED_ROWS = {"acr": 24, "afa": 18, "mcc": 21, "smaf": 8, "vitpcm": 19, "psa": 9}
CHECKED_PROFILES = ("voc", "coco")
KEY_HEADER = "key (stage)"
NO_KEY = ("—", "-", "–")

_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_SPAN = re.compile(r"`([^`]+)`")
_PROFILE_HEADER = re.compile(r"^`(\w+)` profile$")
_BRACES = re.compile(r"^([\w.]*)\{([^{}]*)\}([\w.]*)$")
_KEY = re.compile(r"^[a-z_]+(\.\w+)+$")


@dataclass
class Row:
    doc: str          # e.g. "acr.md"
    line: int         # 1-based line in the doc
    setting: str      # first cell
    keys: list[str]   # expanded key paths, "<stage>.<key>..."
    values: dict      # profile -> the profile cell's text (only CHECKED_PROFILES columns)
    columns: dict     # profile -> index of that cell in the row


def split_cells(line: str) -> list[str]:
    """GFM table row -> cell texts (a ``\\|`` is a pipe inside a cell, also in code spans)."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(body)]


def expand_keys(cell: str) -> list[str]:
    """The key paths of a ``key (stage)`` cell ([] for ``—``).

    Raises:
        ValueError: text outside the backticked keys, or a malformed / unknown-stage key.
    """
    if not cell or cell.startswith(NO_KEY):
        return []
    rest = _SPAN.sub("", cell).replace(",", "").strip()
    if rest:
        raise ValueError(f"key cell {cell!r}: only backticked keys (comma separated) or `—` "
                         f"are allowed, found {rest!r} outside the backticks")
    keys = []
    for span in _SPAN.findall(cell):
        m = _BRACES.match(span)
        parts = ([m[1] + k.strip() + m[3] for k in m[2].split(",")] if m else [span])
        for k in parts:
            if not _KEY.match(k) or k.split(".")[0] not in STAGES:
                raise ValueError(f"key `{k}` is not `<stage>.<key>[.<sub>]` with a stage of "
                                 f"{STAGES}")
            keys.append(k)
    return keys


def parse_rows(doc: str, text: str) -> list[Row]:
    """Every row of every table with a ``key (stage)`` column."""
    rows: list[Row] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("|"):
            i += 1
            continue
        header = split_cells(lines[i])
        i += 2                                        # header + |---| separator
        cols = {h: n for n, h in enumerate(header)}
        profiles = {m[1]: n for n, h in enumerate(header)
                    if (m := _PROFILE_HEADER.match(h)) and m[1] in CHECKED_PROFILES}
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            if KEY_HEADER in cols:
                cells = split_cells(lines[i])
                if len(cells) != len(header):
                    raise ValueError(f"{doc}:{i + 1}: {len(cells)} cells, the header has "
                                     f"{len(header)} (an unescaped `|`?)")
                try:
                    keys = expand_keys(cells[cols[KEY_HEADER]])
                except ValueError as e:
                    raise ValueError(f"{doc}:{i + 1}: {e}") from None
                rows.append(Row(doc, i + 1, cells[0], keys,
                                {p: cells[n] for p, n in profiles.items()}, profiles))
            i += 1
    return rows


def lookup(cfg: dict, profile: str, method: str | None, key: str):
    """``stage_params(cfg, profile, method, <stage>)`` at the dotted key path.

    Raises:
        KeyError: naming the first missing part of the path.
    """
    stage, *path = key.split(".")
    node = stage_params(cfg, profile, method, stage)
    for n, part in enumerate(path):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(".".join([stage, *path[: n + 1]]))
        node = node[part]
    return node


def same(a, b) -> bool:
    """YAML-value equality: numbers by value (125 == 125.0), bools only equal bools."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_doc(doc: str, text: str, cfg: dict) -> tuple[list[str], int]:
    """Compare one doc with params.yaml.

    Returns:
        (errors, number of keyed rows with a `voc` value); each error names the doc, line,
        row, key, the doc's value and the value params.yaml gives.
    """
    method = DOC_METHOD[Path(doc).stem]
    errors: list[str] = []
    keyed_voc = 0
    documented: dict[str, set] = {p: set() for p in CHECKED_PROFILES}
    for row in parse_rows(doc, text):
        if not row.keys:
            continue
        for profile, cell in row.values.items():
            if profile == "voc":
                keyed_voc += 1
            spans = _SPAN.findall(cell)
            where = f"{doc}:{row.line}: row {row.setting!r}"
            if len(spans) < len(row.keys):
                errors.append(f"{where}: {len(row.keys)} keys {row.keys} but the `{profile}` "
                              f"cell {cell!r} starts with only {len(spans)} backticked values")
                continue
            for key, span in zip(row.keys, spans):
                documented[profile].add(key)
                try:
                    want = yaml.safe_load(span)
                except yaml.YAMLError as e:
                    errors.append(f"{where}, key `{key}`: `{profile}` value `{span}` is not "
                                  f"YAML ({e})")
                    continue
                try:
                    got = lookup(cfg, profile, method, key)
                except KeyError as e:
                    errors.append(f"{where}: params.yaml has no `{e.args[0]}` in "
                                  f"stage_params(cfg, {profile!r}, {method!r}, ...)")
                    continue
                if not same(want, got):
                    errors.append(f"{where}, key `{key}`: the doc's `{profile}` value is "
                                  f"`{span}` ({want!r}) but params.yaml gives {got!r} "
                                  f"(stage_params(cfg, {profile!r}, {method!r}, "
                                  f"{key.split('.')[0]!r}))")
    for key in sorted(documented["voc"] - documented["coco"]):
        try:
            voc, coco = lookup(cfg, "voc", method, key), lookup(cfg, "coco", method, key)
        except KeyError:
            continue                                  # reported above
        if not same(voc, coco):
            errors.append(f"{doc}: `{key}` is {coco!r} in `coco` but {voc!r} in `voc`; the "
                          f"doc's COCO table must list it (a `coco` profile column)")
    return errors, keyed_voc


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_params(REPO / "params.yaml")


def test_every_method_doc_is_checked():
    assert {p.stem for p in DOCS.glob("*.md")} == set(DOC_METHOD) == set(MIN_KEYED_ROWS)


@pytest.mark.parametrize("stem", sorted(DOC_METHOD))
def test_doc_profile_values_match_params(stem, cfg):
    errors, keyed = check_doc(f"{stem}.md", (DOCS / f"{stem}.md").read_text(), cfg)
    assert not errors, "\n".join(errors)
    assert keyed >= MIN_KEYED_ROWS[stem], (
        f"docs/methods/{stem}.md has {keyed} rows with a `key (stage)` and a `voc` value, "
        f"expected at least {MIN_KEYED_ROWS[stem]} (a table lost its keys or its format)")


def _mutate_first_voc_value(text: str, new: str) -> tuple[str, Row]:
    """Replace the first value of the first keyed `voc` cell; returns (text, original row)."""
    row = next(r for r in parse_rows("acr.md", text) if r.keys and "voc" in r.values)
    lines = text.splitlines()
    cells = split_cells(lines[row.line - 1])
    n = row.columns["voc"]
    cells[n] = _SPAN.sub(f"`{new}`", cells[n], count=1)
    lines[row.line - 1] = "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join(lines), row


def test_a_changed_doc_value_fails_naming_doc_row_and_both_values(cfg):
    text = (DOCS / "acr.md").read_text()
    assert check_doc("acr.md", text, cfg)[0] == []
    mutated, row = _mutate_first_voc_value(text, "12345.5")
    errors, _ = check_doc("acr.md", mutated, cfg)
    truth = lookup(cfg, "voc", "acr", row.keys[0])
    assert len(errors) == 1, errors
    assert f"acr.md:{row.line}" in errors[0] and repr(row.setting) in errors[0]
    assert "`12345.5`" in errors[0] and repr(truth) in errors[0], errors[0]


def test_an_unknown_key_and_an_emptied_table_fail(cfg):
    text = (DOCS / "acr.md").read_text()
    bad = text.replace("`train_cls.cls_loss`", "`train_cls.cls_losss`", 1)
    assert bad != text
    errors, _ = check_doc("acr.md", bad, cfg)
    assert any("no `train_cls.cls_losss`" in e for e in errors), errors
    emptied = "\n".join(ln for ln in text.splitlines() if not ln.startswith("|"))
    assert check_doc("acr.md", emptied, cfg) == ([], 0)   # so MIN_KEYED_ROWS is what fails


def test_a_coco_value_that_differs_from_voc_must_be_listed(cfg):
    text = (DOCS / "acr.md").read_text()
    start = text.index("## COCO")
    end = text.index("\n## ", start + 1)
    errors, _ = check_doc("acr.md", text[:start] + text[end:], cfg)
    assert any("`train_cls.alpha` is 100.0 in `coco` but 125.0 in `voc`" in e
               for e in errors), errors


def test_key_cell_parsing():
    assert expand_keys("`train_cls.{alpha, beta}`, `export_seeds.norm`") == [
        "train_cls.alpha", "train_cls.beta", "export_seeds.norm"]
    assert expand_keys("`train_cls.par.{w1, w2}`") == ["train_cls.par.w1", "train_cls.par.w2"]
    assert expand_keys("— (a constant of the code)") == []
    for bad in ("`alpha`", "`train.alpha`", "`train_cls.alpha` and more"):
        with pytest.raises(ValueError):
            expand_keys(bad)
    assert split_cells(r"| a | `code` \| `paper` | `\|cos\|` |") == ["a", "`code` | `paper`",
                                                                       "`|cos|`"]
