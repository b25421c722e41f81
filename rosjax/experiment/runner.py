"""Runs an experiment's stages in order: data → teachers → settings → evaluate → sweeps → folds → report.

`run(cfg, workdir, stages=..., settings=..., teacher=...)` is what the CLI calls; every stage
skips what is already complete in `workdir`, so the same command resumes a killed run. With
`--seeds`, the teachers, settings and evaluate stages run once per seed, each other seed in its
own nested work directory (rosjax.experiment.seeds), before the sweeps, folds and report.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import jax

from rosjax import atomic
from rosjax import config as config_lib
from rosjax.config import ExperimentConfig
from rosjax.eval import report as report_lib
from rosjax.experiment import data as data_lib
from rosjax.experiment import scoring, training, validate
from rosjax.experiment import seeds as seeds_lib
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
    for seed in seeds_lib.extra_seeds(cfg):
        check_config(seeds_lib.seed_root(root, cfg, seed), config_lib.to_dict(seeds_lib.seed_config(cfg, seed)),
                     write=False)


def run(cfg: ExperimentConfig, workdir, *, stages: Sequence[str], settings: Sequence[str],
        teacher: int | None = None, analyses: bool = True) -> dict | None:
    """Runs `stages` of the experiment `cfg` in `workdir`; returns the report when it was written.

    `analyses=False` leaves the attacks and loss landscapes out of the evaluate stage (test
    metrics only), for studies that need Table I's numbers alone (experiments.noise_study).

    The configuration is recorded in `config.json` only once the dataset is ready and every
    training set of the requested stages fills a batch, so a run refused at start-up leaves
    the work directory free for the corrected command.
    """
    parallel.maybe_initialize_distributed()
    settings = [settings_lib.canonical(s) for s in settings]
    cfg = dataclasses.replace(cfg, settings=tuple(settings_lib.canonical(s) for s in cfg.settings))
    check(cfg, workdir, stages=stages, settings=settings)
    wd = Workdir(workdir)
    atomic.remove_orphans(wd.root)  # temporary files of a killed earlier run
    mesh = parallel.make_mesh()
    started = time.perf_counter()
    log.info("experiment %s in %s on %d %s device(s); stages: %s", cfg.name, wd.root, jax.device_count(),
             jax.devices()[0].platform, ", ".join(stages))

    data = data_lib.load(cfg)
    validate.check_batches(cfg, lambda **point: data if not point else data_lib.load(cfg, **point), stages=stages)
    _prepare(cfg, wd, data)
    _train_and_score(cfg, wd, data, mesh, stages=stages, settings=settings, teacher=teacher, analyses=analyses)
    for seed in seeds_lib.extra_seeds(cfg):  # the split and subsets are the main run's: batches checked
        scfg = seeds_lib.seed_config(cfg, seed)
        swd = Workdir(seeds_lib.seed_root(wd.root, cfg, seed))
        log.info("seed %d in %s", seed, swd.root)
        sdata = data_lib.load(scfg)
        _prepare(scfg, swd, sdata)
        _train_and_score(scfg, swd, sdata, mesh, stages=stages, settings=settings, teacher=teacher, analyses=False)
        if "report" in stages:
            report_lib.write_report(swd.root, build_report(scfg, swd))
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


def _prepare(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData) -> None:
    """Records the configuration (refusing another's), the data summary and the split of one run."""
    check_config(wd.root, config_lib.to_dict(cfg))
    write_json(wd.path("data", "summary.json"), data_lib.summary(data, cfg))
    data_lib.write_split(data, cfg, wd.path("data", "split.json"))


def _train_and_score(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, mesh, *,
                     stages: Sequence[str], settings: Sequence[str], teacher: int | None, analyses: bool) -> None:
    """The teachers, settings and evaluate stages of one seed's run (`analyses`: attacks, landscapes)."""
    if "teachers" in stages:
        # Subset teachers by index, then the full-split teachers the settings name (by architecture).
        indices = [teacher] if teacher is not None else [*range(len(cfg.teachers.architectures)),
                                                         *settings_lib.full_teachers(cfg, settings)]
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
        scoring.evaluate_all(cfg, wd, data, [s for s in settings if done(wd.setting_dir(s))], mesh,
                                analyses=analyses)


def build_report(cfg: ExperimentConfig, wd: Workdir) -> dict:
    """Collects every finished stage's results from the work directory into one dict.

    With several seeds (rosjax.experiment.seeds) the settings are their mean ± std over the
    seeds' runs, with each seed's numbers; the RoS-KD − baseline bootstrap intervals
    ('comparisons') pool every seed's stored test outputs.
    """
    report = {"experiment": cfg.name, "smoke": cfg.smoke, "config": config_lib.to_dict(cfg),
              "devices": {"count": jax.device_count(), "kind": jax.devices()[0].device_kind}}
    summary_path = wd.root / "data" / "summary.json"
    if summary_path.exists():
        report["data"] = read_json(summary_path)
    report["teachers"] = [r for i, arch in enumerate(cfg.teachers.architectures)
                          if (r := done(wd.root / "teachers" / f"{i}-{arch}")) is not None]
    report["teachers"] += [r for arch in dict.fromkeys(cfg.teachers.architectures)
                           if (r := done(wd.root / "teachers" / f"full_{arch}")) is not None]
    roots = {seed: seeds_lib.seed_root(wd.root, cfg, seed) for seed in seeds_lib.seed_list(cfg)}
    if len(roots) > 1:
        report["seeds"] = list(roots)
        report["main_seed"] = cfg.seed
        report["settings"] = seeds_lib.aggregate({seed: _setting_records(cfg, root) for seed, root in roots.items()})
        report["seed_runs"] = {str(seed): {"workdir": str(root.relative_to(wd.root)) if root != wd.root else ".",
                                           "teachers": [r for i, arch in enumerate(cfg.teachers.architectures)
                                                        if (r := done(root / "teachers" / f"{i}-{arch}")) is not None]}
                               for seed, root in roots.items()}
    else:
        report["settings"] = _setting_records(cfg, wd.root)
    report["table_i_order"] = list(report["settings"])  # JSON sorts keys; re-rendering keeps this order
    report["cost_reference"] = settings_lib.METHOD
    comparisons = seeds_lib.compare(roots, settings_lib.METHOD,
                                    [s.name for s in settings_lib.SETTINGS if s.name != settings_lib.METHOD],
                                    n_resamples=cfg.evaluation.bootstrap_resamples,
                                    seed=cfg.evaluation.bootstrap_seed)
    if comparisons is not None:
        report["comparisons"] = comparisons
    for name in ("robustness", "landscape", "sweeps", "folds"):
        path = wd.root / "eval" / f"{name}.json"
        if path.exists():
            report[name] = read_json(path)
    return report


def _setting_records(cfg: ExperimentConfig, root) -> dict:
    """Each registry setting's entry of one run: its training record and test metrics, or its status."""
    settings = {}
    for entry in settings_lib.SETTINGS:  # Table I's rows, in its order
        record = done(root / "settings" / entry.folder)
        scored = root / "eval" / f"{entry.name}.json"
        about = {"title": entry.title, **({"trained_by": entry.trained_by} if entry.trained_by else {})}
        if record is None:
            same = entry.same_run_as(cfg)
            settings[entry.name] = {**about, "status": f"= {settings_lib.get(same).title}" if same else "not run"}
        elif not scored.exists():
            settings[entry.name] = {**record, **about, "status": "trained, not evaluated"}
        else:
            settings[entry.name] = {**record, **about, **read_json(scored)}
    return settings
