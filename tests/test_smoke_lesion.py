"""The README's main command: the lesion smoke run with the paper's five architectures.

It runs the whole pipeline (five teachers, every baseline, RoS-KD with smoothing, evaluation,
report) on the bundled sample files in a subprocess, exactly as a user types it, and checks the
report. Slow (minutes); deselect with `-m "not slow"`.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_ARCHITECTURES = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "densenet121"]


@pytest.mark.slow
def test_lesion_smoke_run_produces_the_report(tmp_path):
    workdir = tmp_path / "lesion-smoke"
    done = subprocess.run([sys.executable, "-m", "experiments.lesion", "--smoke", "--workdir", str(workdir),
                           "--stage", "data,teachers,settings,evaluate,report",
                           f"--data.data_dir={tmp_path / 'tensorflow_datasets'}"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((workdir / "report.json").read_text())
    assert [t["architecture"] for t in report["teachers"]] == PAPER_ARCHITECTURES
    for name in ("baseline_i", "baseline_ii", "baseline_iii", "baseline_iv", "baseline_v", "rosjax"):
        test = report["settings"][name]["test"]
        assert test["num_examples"] == report["data"]["split_sizes"]["test"], name
        assert 0.0 <= test["f1_macro"] <= 1.0, name
    assert set(report["data"]["group_overlap"].values()) == {0}
    assert {"baseline_iii", "rosjax"} <= set(report["landscape"])
    assert (workdir / "report.md").read_text().count("|") > 50
