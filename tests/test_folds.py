"""Table III's runs: the folds' student is `sweeps.fold_student` (the paper's DenseNet-121), one run
per patient-grouped re-split, and the main run stands in only when it matches that configuration."""
import dataclasses

import numpy as np
import pytest

from experiments import nih_cxr
from rosjax.eval import report as report_lib
from rosjax.experiment import settings as settings_lib
from rosjax.experiment import sweeps
from rosjax.experiment.workdir import Workdir, mark_done, write_json


def _scores(aurocs):
    return {"test": {"per_class": {name: {"auroc": a} for name, a in zip(("Mass", "Nodule"), aurocs)}}}


@pytest.mark.parametrize("main_student, retrained", [("resnet18", [0, 1, 2]), ("densenet121", [1, 2])])
def test_folds_train_the_fold_student_on_each_re_split(tmp_path, monkeypatch, main_student, retrained):
    cfg = nih_cxr.get_config()
    assert cfg.sweeps.fold_student == "densenet121"  # the paper's Table III student
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, student=main_student))
    (setting,) = settings_lib.FOLDS
    wd = Workdir(tmp_path)
    write_json(wd.path("eval", f"{setting}.json"), _scores([0.9, 0.5]))  # the main run, split seed 0
    for i, arch in enumerate(cfg.teachers.architectures):
        mark_done(wd.teacher_dir(i, arch), {"index": i})
    aurocs = {0: [0.7, 0.6], 1: [0.8, 0.6], 2: [0.9, 0.9]}
    calls = []

    def fake_run_point(pcfg, point_wd, mesh, *, settings, teachers_wd):
        calls.append((pcfg.data.split_seed, pcfg.distill.student, point_wd.root.name,
                      teachers_wd.root if teachers_wd else None))
        return {setting: _scores(aurocs[pcfg.data.split_seed])}

    monkeypatch.setattr(sweeps, "run_point", fake_run_point)
    folds = sweeps.run_folds(cfg, wd, mesh=None)
    # Seed 0 is the main run's split: its trained teachers serve that re-split's student too.
    assert calls == [(s, "densenet121", f"seed{s}", wd.root if s == 0 else None) for s in retrained]
    table = np.array([aurocs[s] if s in retrained else [0.9, 0.5] for s in (0, 1, 2)])
    np.testing.assert_allclose(folds["auroc_mean"], table.mean(axis=0))
    np.testing.assert_allclose(folds["auroc_std"], table.std(axis=0, ddof=1))
    assert folds["student"] == "densenet121"
    heading = next(line for line in report_lib.render_markdown({"folds": folds}).splitlines()
                   if line.startswith("## Table III"))
    assert "student densenet121" in heading and "3 patient-grouped re-splits" in heading
