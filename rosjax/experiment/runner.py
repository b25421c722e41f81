"""Runs an experiment's stages in order: data → teachers → settings → evaluate → sweeps → folds → report.

`run(cfg, workdir, stages=..., settings=..., teacher=...)` is what the CLI calls; every stage
skips what is already complete in `workdir`, so the same command resumes a killed run.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import jax

from rosjax import config as config_lib
from rosjax.config import ExperimentConfig
from rosjax.eval import report as report_lib
from rosjax.experiment import data as data_lib
from rosjax.experiment import scoring, training, validate
from rosjax.experiment import settings as settings_lib
from rosjax.experiment.workdir import Workdir, check_config, done, read_json, write_json
from rosjax.train import parallel

log = logging.getLogger(__name__)


def check(cfg: ExperimentConfig, workdir, *, stages: Sequence[str], settings: Sequence[str]) -> None:
    """Checks every option against the stages (ConfigError) and the work directory's recorded
    configuration (WorkdirConflictError), before anything is written."""
    root = Workdir.resolve(workdir)
    validate.check_options(cfg, stages=stages, settings=settings,
                           devices=jax.device_count(), workdir=root)
    check_config(root, config_lib.to_dict(cfg), write=False)


def run(cfg: ExperimentConfig, workdir, *, stages: Sequence[str], settings: Sequence[str],
        teacher: int | None = None) -> dict | None:
    """Runs `stages` of the experiment `cfg` in `workdir`; returns the report when it was written.

    The configuration is recorded in `config.json` only once the dataset is ready and every
    training set of the requested stages fills a batch, so a run refused at start-up leaves
    the work directory free for the corrected command.
    """
    parallel.maybe_initialize_distributed()
    settings = [settings_lib.canonical(s) for s in settings]
    cfg = dataclasses.replace(cfg, settings=tuple(settings_lib.canonical(s) for s in cfg.settings))
    check(cfg, workdir, stages=stages, settings=settings)
    wd = Workdir(workdir)
    mesh = parallel.make_mesh()
    started = time.perf_counter()
    log.info("experiment %s in %s on %d %s device(s); stages: %s", cfg.name, wd.root, jax.device_count(),
             jax.devices()[0].platform, ", ".join(stages))

    data = data_lib.load(cfg)
    validate.check_batches(cfg, lambda **point: data if not point else data_lib.load(cfg, **point), stages=stages)
    check_config(wd.root, config_lib.to_dict(cfg))
    write_json(wd.path("data", "summary.json"), data_lib.summary(data, cfg))
    data_lib.write_split(data, cfg, wd.path("data", "split.json"))
    if "teachers" in stages:
        indices = [teacher] if teacher is not None else range(len(cfg.teachers.architectures))
        compiler = training.teacher_compiler(cfg, wd, data, indices, mesh)
        try:
            for i in indices:
                training.train_teacher(cfg, wd, data, i, mesh, compiler)
        finally:
            compiler.close()
    if "settings" in stages:
        compiler = training.setting_compiler(cfg, wd, data, settings, mesh)
        try:
            for setting in settings:
                training.train_setting(cfg, wd, data, setting, mesh, compiler=compiler)
        finally:
            compiler.close()
    if "evaluate" in stages:
        scoring.evaluate_all(cfg, wd, data, [s for s in settings if done(wd.setting_dir(s))], mesh)
    if "sweeps" in stages:
        from rosjax.experiment import sweeps  # noqa: PLC0415
        sweeps.run_sweeps(cfg, wd, mesh)
    if "folds" in stages:
        from rosjax.experiment import sweeps  # noqa: PLC0415
        sweeps.run_folds(cfg, wd, mesh)
    if "report" in stages:
        report = build_report(cfg, wd)
        json_path, md_path = report_lib.write_report(wd.root, report)
        log.info("report: %s and %s (%.0f s)", md_path, json_path, time.perf_counter() - started)
        return report
    return None


def build_report(cfg: ExperimentConfig, wd: Workdir) -> dict:
    """Collects every finished stage's results from the work directory into one dict."""
    report = {"experiment": cfg.name, "smoke": cfg.smoke, "config": config_lib.to_dict(cfg),
              "devices": {"count": jax.device_count(), "kind": jax.devices()[0].device_kind}}
    summary_path = wd.root / "data" / "summary.json"
    if summary_path.exists():
        report["data"] = read_json(summary_path)
    report["teachers"] = [r for i, arch in enumerate(cfg.teachers.architectures)
                          if (r := done(wd.root / "teachers" / f"{i}-{arch}")) is not None]
    settings = {}
    for entry in settings_lib.SETTINGS:  # Table I's rows, in its order
        record = done(wd.root / "settings" / entry.folder)
        scored = wd.root / "eval" / f"{entry.name}.json"
        about = {"title": entry.title, **({"trained_by": entry.trained_by} if entry.trained_by else {})}
        if record is None:
            settings[entry.name] = {**about, "status": "not run"}
        elif not scored.exists():
            settings[entry.name] = {**record, **about, "status": "trained, not evaluated"}
        else:
            settings[entry.name] = {**record, **about, **read_json(scored)}
    report["settings"] = settings
    report["table_i_order"] = list(settings)  # JSON sorts keys; re-rendering keeps this order
    report["cost_reference"] = settings_lib.METHOD
    for name in ("robustness", "landscape", "sweeps", "folds"):
        path = wd.root / "eval" / f"{name}.json"
        if path.exists():
            report[name] = read_json(path)
    return report
