"""The README's nih_cxr smoke command, verbatim, from an empty home (see tests/test_readme_commands.py).

A file of its own so that pytest-xdist (`--dist loadfile`) runs it beside the lesion command.
"""
import pytest

from tests.test_readme_commands import run_readme_smoke


@pytest.mark.slow
def test_readme_nih_smoke_command(tmp_path):
    report, markdown = run_readme_smoke("experiments.nih_cxr", tmp_path)
    assert report["data"]["multilabel"] and report["folds"]["runs"] == 2
    assert "Table III" in markdown
