"""The paper's sweeps (Figures 2 and 3, teacher-weight variants) and NIH's three runs (Table III).

Each sweep point is a nested work directory, `WORKDIR/sweeps/<sweep>/<point>/` or
`WORKDIR/folds/seed<s>/`, holding its own config.json, settings and eval results, so a point
is a resumable stage like any other: a finished point is read back, an interrupted one resumes.
The point that equals the main run's configuration is not retrained: its numbers come from the
main run.

  overlap    teachers retrained on subsets with overlap p; RoS-KD and baseline III at each p
  student    each student architecture distilled from the main teachers, RoS-KD vs baseline III
  weights    RoS-KD with normalised or per-example teacher weights (main teachers)
  folds      NIH (Table III): the whole pipeline, student `sweeps.fold_student` (the paper's
             DenseNet-121), on three patient-grouped re-splits (split seeds; not k-fold
             cross-validation: the test splits may share patients); per-class AUROC mean ± std
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rosjax import config as config_lib
from rosjax.config import ExperimentConfig
from rosjax.experiment import data as data_lib
from rosjax.experiment import scoring, training
from rosjax.experiment import settings as settings_lib
from rosjax.experiment.workdir import Workdir, check_config, done, read_json, write_json

log = logging.getLogger(__name__)

PER_EXAMPLE = "per_example_"  # name prefix of the weights sweep's points with per-example draws


def weight_points(sweeps: config_lib.SweepConfig) -> dict[str, tuple[str, bool]]:
    """The points of the teacher-weight sweep, name -> (--distill.normalize, --distill.per_example):
    each of `sweeps.normalizations` with one draw per step (named by the normalisation, e.g. "sumk"),
    then each of `sweeps.per_example_normalizations` with per-example draws ("per_example_sum1")."""
    return {**{n: (n, False) for n in sweeps.normalizations},
            **{PER_EXAMPLE + n: (n, True) for n in sweeps.per_example_normalizations}}


def student_options(d: config_lib.DistillConfig, student: str) -> config_lib.DistillConfig:
    """The distillation options with student `student`; --distill.pretrained holds weights of
    --distill.student only, so a point with another student starts from scratch."""
    if student != d.student and d.pretrained:
        log.info("student %s starts from scratch (--distill.pretrained is a %s file)", student, d.student)
    return dataclasses.replace(d, student=student, pretrained=d.pretrained if student == d.student else "")


def run_point(cfg: ExperimentConfig, wd: Workdir, mesh, *, settings, teachers_wd: Workdir | None) -> dict[str, Any]:
    """Trains and scores one sweep point; `teachers_wd=None` trains the point's own teachers."""
    check_config(wd.root, config_lib.to_dict(cfg))
    data = data_lib.load(cfg)
    if teachers_wd is None:
        for key in [*range(len(cfg.teachers.architectures)), *settings_lib.full_teachers(cfg, settings)]:
            training.train_teacher(cfg, wd, data, key, mesh)
    for setting in settings:
        training.train_setting(cfg, wd, data, setting, mesh, teachers_wd=teachers_wd or wd)
    return scoring.evaluate_all(cfg, wd, data, settings, mesh, analyses=False)["settings"]


def run_sweeps(cfg: ExperimentConfig, wd: Workdir, mesh) -> dict[str, Any]:
    """Runs the three sweeps, writes `eval/sweeps.json` and one plot per sweep; returns the results."""
    compared = settings_lib.COMPARED
    main = {name: read_json(path) for name in scoring.settings_to_evaluate(compared)
            if (path := wd.root / "eval" / f"{name}.json").exists()}
    # validate.check_options made sure the main run's baseline III and RoS-KD are evaluated.
    d = cfg.distill
    weights = weight_points(cfg.sweeps)
    sweeps = {
        "overlap": _sweep(
            cfg, wd, mesh, main, compared, "overlap", "overlap ratio p", "Figure 3: teacher-subset overlap",
            cfg.sweeps.overlaps, lambda p: f"p{p:g}", lambda p: p == cfg.teachers.overlap,
            lambda p: dataclasses.replace(cfg, teachers=dataclasses.replace(cfg.teachers, overlap=p)),
            own_teachers=True),
        "student": _sweep(
            cfg, wd, mesh, main, compared, "student", "student", "Figure 2: student architecture",
            cfg.sweeps.students, str, lambda a: a == d.student,
            lambda a: dataclasses.replace(cfg, distill=student_options(d, a)), own_teachers=False),
        "weights": _sweep(
            cfg, wd, mesh, main, settings_lib.WEIGHT_OPTIONS, "weights", "teacher weights",
            "Teacher-weight normalisation",
            tuple(weights), str, lambda v: weights[v] == (d.normalize, d.per_example),
            lambda v: dataclasses.replace(cfg, distill=dataclasses.replace(
                d, normalize=weights[v][0], per_example=weights[v][1])),
            own_teachers=False),
    }
    write_json(wd.path("eval", "sweeps.json"), sweeps)
    return sweeps


def _sweep(cfg, wd, mesh, main, settings, name, parameter, title, values, point_name: Callable, is_main: Callable,
           point_cfg: Callable, *, own_teachers: bool) -> dict[str, Any]:
    """One sweep: `settings` trained at every point but the main run's; test macro-F1 per point and setting."""
    scored = scoring.settings_to_evaluate(settings)
    points = {}
    for value in values:
        if is_main(value):
            scores = main
        else:
            log.info("sweep %s: point %s", name, value)
            pcfg = dataclasses.replace(point_cfg(value), settings=tuple(settings))
            scores = run_point(pcfg, Workdir(wd.folder("sweeps", name, point_name(value))), mesh,
                               settings=settings, teachers_wd=None if own_teachers else wd)
        points[str(value)] = {s: scores[s]["test"]["f1_macro"] if s in scores else None for s in scored}
    titles = {s: settings_lib.get(s).title for s in scored}
    plot = f"plots/sweep_{name}.png"
    _plot_sweep(points, [s for s in scored if s in settings], titles, parameter, title, wd.path(*plot.split("/")))
    return {"parameter": parameter, "title": title, "settings": scored, "titles": titles, "points": points,
            "plot_png": plot}


def _plot_sweep(points: dict[str, dict], shown: list[str], titles: dict[str, str], parameter: str, title: str,
                path) -> None:
    """Grouped bars: test macro-F1 of each `shown` setting at each point."""
    labels = list(points)
    x = np.arange(len(labels))
    width = 0.8 / max(len(shown), 1)
    fig = Figure(figsize=(max(5, 1.1 * len(labels)), 3.6))
    ax = fig.add_subplot()
    for i, setting in enumerate(shown):
        values = [points[p][setting] for p in labels]
        if any(v is not None for v in values):
            ax.bar(x + (i - (len(shown) - 1) / 2) * width, [np.nan if v is None else v for v in values],
                   width=width, label=titles[setting])
    ax.set(xticks=x, xticklabels=labels, xlabel=parameter, ylabel="test macro F1", title=title)
    # Below the axes, so no bar is hidden behind it (savefig's tight box takes it in).
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(len(shown), 2), frameon=False)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def run_folds(cfg: ExperimentConfig, wd: Workdir, mesh) -> dict[str, Any]:
    """Table III: RoS-KD with student `sweeps.fold_student` on each patient-grouped re-split (one per
    split seed); per-class test AUROC mean ± std (sample std, ddof=1).

    The main run stands in for the re-split of its own split seed when its student is the folds' one;
    with another student that re-split still distils the main run's teachers (same split) when trained.
    """
    (setting,) = settings_lib.FOLDS
    student = cfg.sweeps.fold_student
    per_run = []
    for seed in cfg.sweeps.fold_seeds:
        own_split = seed == cfg.data.split_seed
        if own_split and student == cfg.distill.student and (wd.root / "eval" / f"{setting}.json").exists():
            scores = {setting: read_json(wd.root / "eval" / f"{setting}.json")}
        else:
            log.info("re-split with split seed %d, student %s", seed, student)
            fcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_seed=seed), settings=(setting,),
                                       distill=student_options(cfg.distill, student))
            main_teachers = own_split and all(done(wd.root / "teachers" / f"{i}-{arch}") is not None
                                              for i, arch in enumerate(cfg.teachers.architectures))
            scores = run_point(fcfg, Workdir(wd.folder("folds", f"seed{seed}")), mesh, settings=(setting,),
                               teachers_wd=wd if main_teachers else None)
        per_run.append(scores[setting]["test"])
    names = list(per_run[0]["per_class"])
    table = np.array([[run["per_class"][c]["auroc"] if run["per_class"][c]["auroc"] is not None else np.nan
                       for c in names] for run in per_run], np.float64)  # [runs, C]
    means = np.nanmean(table, axis=1)  # [runs] mean AUROC of each run
    ddof = 1 if len(per_run) > 1 else 0
    folds = {"setting": settings_lib.get(setting).title, "student": student, "runs": len(per_run),
             "split_seeds": list(cfg.sweeps.fold_seeds), "class_names": names, "auroc_per_run": table.tolist(),
             "auroc_mean": np.nanmean(table, axis=0).tolist(),
             "auroc_std": np.nanstd(table, axis=0, ddof=ddof).tolist(),
             "mean_auroc_mean": float(np.mean(means)), "mean_auroc_std": float(np.std(means, ddof=ddof))}
    write_json(wd.path("eval", "folds.json"), folds)
    return folds
