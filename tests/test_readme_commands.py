"""The README's smoke commands, run exactly as printed, on a fresh home folder (the lesion one here,
the nih_cxr one in tests/test_readme_nih_command.py, so the two run on separate test workers).

The commands are read from README.md (the Quickstart block and the nih_cxr smoke line under
"Running the experiments"), so the test and the documentation cannot drift apart. Each runs
in a subprocess from an empty folder with an empty HOME (no prepared data, no compiled
programs: what a new user's machine has), every stage included, sweeps and folds too. Slow
(minutes each); deselect with `-m "not slow"`.
"""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The smoke's teachers: the paper's, with densenet21 for DenseNet-121 (experiments/lesion.py smoke_variant).
SMOKE_ARCHITECTURES = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "densenet21"]
SETTINGS = ("baseline_i", "baseline_ii", "baseline_ii_subset", "baseline_iii", "baseline_iv", "baseline_v", "ros_kd")


def readme_command(module: str) -> str:
    """The README's `python -m <module> --smoke ...` command line, verbatim."""
    text = (REPO / "README.md").read_text()
    found = re.findall(rf"(python -m {re.escape(module)} --smoke[^\n`&#]*)", text)
    assert found, f"README.md has no `python -m {module} --smoke` command"
    return found[0].strip()


def run_verbatim(command: str, tmp_path: pathlib.Path) -> tuple[subprocess.CompletedProcess, float]:
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"]
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    for variable in ("XLA_FLAGS", "JAX_PLATFORMS", "ROSJAX_COMPILATION_CACHE"):  # conftest's test settings
        env.pop(variable, None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1800)
    return done, time.perf_counter() - started


def workdir_of(command: str, cwd: pathlib.Path) -> pathlib.Path:
    argv = shlex.split(command)
    return cwd / argv[argv.index("--workdir") + 1]


def check_console(done: subprocess.CompletedProcess) -> None:
    """Quiet, readable output: a few lines per stage, no library INFO records, rounded numbers."""
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) < 250, f"{len(lines)} console lines"
    assert not [line for line in lines if "absl" in line or "orbax" in line.lower()], "library records leak"
    long_numbers = [line for line in lines if re.search(r"\d\.\d{7,}", line)]
    assert not long_numbers, long_numbers[:3]


def check_report(workdir: pathlib.Path) -> dict:
    report = json.loads((workdir / "report.json").read_text())
    assert [t["architecture"] for t in report["teachers"] if t["index"] != "full"] == SMOKE_ARCHITECTURES
    assert [t["architecture"] for t in report["teachers"] if t["index"] == "full"] == ["densenet21"]  # baseline II's
    for name in SETTINGS:
        test = report["settings"][name]["test"]
        assert test["num_examples"] == report["data"]["split_sizes"]["test"], name
        assert 0.0 <= test["f1_macro"] <= 1.0, name
    assert set(report["data"]["group_overlap"].values()) == {0}
    assert set(report["sweeps"]) == {"overlap", "student", "weights"}
    for sweep in report["sweeps"].values():
        for point, scores in sweep["points"].items():
            assert scores["ros_kd"] is not None, (sweep["title"], point)
        assert (workdir / sweep["plot_png"]).stat().st_size > 0
    markdown = (workdir / "report.md").read_text()
    assert "Table I" in markdown and "Figure 3" in markdown and markdown.count("|") > 50
    return report


def run_readme_smoke(module: str, tmp_path: pathlib.Path) -> tuple[dict, str]:
    """Runs the README's smoke command of `module` verbatim; returns (report.json, report.md)."""
    command = readme_command(module)
    done, seconds = run_verbatim(command, tmp_path)
    print(f"{command}: {seconds:.0f} s")
    assert done.returncode == 0, done.stderr[-4000:]
    check_console(done)
    workdir = workdir_of(command, tmp_path / "cwd")
    return check_report(workdir), (workdir / "report.md").read_text()


@pytest.mark.slow
def test_readme_lesion_smoke_command(tmp_path):
    report, _ = run_readme_smoke("experiments.lesion", tmp_path)
    assert not report["data"]["multilabel"]
