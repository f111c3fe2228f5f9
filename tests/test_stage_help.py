"""Every stage CLI documents itself: `python -m stages.<name> --help` works and every option
has a help text (issue 7: "--help documents every option")."""
import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py") if not p.stem.startswith("_"))


class _Captured(Exception):
    pass


def parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser a stage's main() builds (parse_args is intercepted, nothing runs)."""
    seen = {}

    def grab(self, *a, **k):
        seen["p"] = self
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    mod = importlib.import_module(f"stages.{name}")
    with pytest.raises(_Captured):
        try:
            mod.main()
        except TypeError:          # main(argv=None) style
            mod.main(None)
    return seen["p"]


def test_every_stage_is_listed():
    assert {"train_cls", "export_seeds", "refine_seeds", "make_pseudo_labels", "train_seg",
            "eval_seg", "prepare_dataset", "prepare_coco", "report_figures"} <= set(STAGES)


@pytest.mark.parametrize("name", STAGES)
def test_every_option_has_help(name, monkeypatch):
    ap = parser_of(name, monkeypatch)
    assert ap.description and ap.description.strip(), f"stages.{name} has no description"
    assert ap.prog == f"python -m stages.{name}"
    undocumented = [a.option_strings or a.dest for a in ap._actions
                    if not isinstance(a, argparse._HelpAction)
                    and (not a.help or a.help == argparse.SUPPRESS or not a.help.strip())]
    assert not undocumented, f"stages.{name}: options without help: {undocumented}"


@pytest.mark.parametrize("name", ["train_cls", "prepare_coco", "report_figures"])
def test_help_runs_as_a_command(name):
    r = subprocess.run([sys.executable, "-m", f"stages.{name}", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"python -m stages.{name}" in r.stdout and "--" in r.stdout
    assert "Traceback" not in r.stderr
    assert Path(REPO / "stages" / f"{name}.py").is_file()
