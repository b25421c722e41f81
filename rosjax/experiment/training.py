"""The training stages: one teacher per subset, then each student setting.

Each stage trains in its own folder of the work directory (checkpoints, metrics.jsonl, final/)
and ends by writing `DONE.json`; a folder with `DONE.json` is skipped, a folder without one
resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax

from rosjax.config import ExperimentConfig
from rosjax.distill import cache as cache_lib
from rosjax.distill import rl_trainer, trainer
from rosjax.errors import UserError
from rosjax.eval import collapse
from rosjax.experiment import artifacts
from rosjax.experiment import data as data_lib
from rosjax.experiment import settings as settings_lib
from rosjax.experiment.workdir import StageClaim, Workdir, done, mark_done
from rosjax.models import pretrained
from rosjax.train import classifier, evaluate, loop, parallel

log = logging.getLogger(__name__)


class MissingStageError(UserError):
    """A stage needs the output of one that has not run (e.g. a student before its teachers)."""


def loop_config(cfg: ExperimentConfig) -> loop.LoopConfig:
    return loop.LoopConfig(log_every_steps=cfg.log_every_steps, checkpoint_every_steps=cfg.checkpoint_every_steps)


def image_shape(cfg: ExperimentConfig, data: data_lib.ExperimentData) -> tuple[int, int, int]:
    return (cfg.data.image_size, cfg.data.image_size, data.dataset.num_channels)


def spec_for(cfg: ExperimentConfig, data: data_lib.ExperimentData, architecture: str) -> dict[str, Any]:
    return artifacts.model_spec(cfg, architecture, class_names=data.dataset.class_names,
                                num_channels=data.dataset.num_channels)


def validation_evaluator(cfg, data, mesh):
    return evaluate.make_evaluator(lambda: data_lib.eval_batches(data, cfg, data.splits["validation"]), mesh=mesh,
                                   multilabel=data.multilabel, class_names=data.dataset.class_names)


def wall_clock(folder: pathlib.Path) -> float:
    """Training seconds summed over the epochs in metrics.jsonl (resumed runs included)."""
    path = folder / loop.METRICS_FILE
    if not path.exists():
        return 0.0
    return sum(json.loads(line)["epoch_seconds"] for line in path.read_text().splitlines() if line.strip())


def test_metrics(cfg, data, model, variables, mesh) -> dict[str, Any]:
    """Test-split metrics of a finished model (`classification_metrics` plus mean loss)."""
    evaluator = evaluate.make_evaluator(lambda: data_lib.eval_batches(data, cfg, data.splits["test"]), mesh=mesh,
                                        multilabel=data.multilabel, class_names=data.dataset.class_names)
    return evaluator(artifacts.inference_state(model, variables), {})


def train_teacher(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, index: int,
                  mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Trains teacher `index` on its subset (skipped when done); returns its DONE record."""
    architecture = cfg.teachers.architectures[index]
    folder = wd.teacher_dir(index, architecture)
    if (record := done(folder)) is not None:
        return record
    claim = StageClaim(folder)
    if (record := done(folder)) is not None:  # finished by the job that held the claim
        claim.release()
        return record
    log.info("teacher %d (%s): %d training examples", index, architecture, len(data.subsets[index]))
    spec = spec_for(cfg, data, architecture)
    artifacts.write_spec(folder, spec)
    model = artifacts.build_model(spec)
    rows = data.subsets[index]
    result = classifier.train_classifier(
        model, lambda: data_lib.train_iterator(data, cfg, rows, seed=_seed(cfg, "teacher", index)),
        validation_evaluator(cfg, data, mesh), folder, optim_cfg=cfg.optim,
        steps_per_epoch=data_lib.steps_per_epoch(cfg, rows), image_shape=image_shape(cfg, data),
        multilabel=data.multilabel, seed=_seed(cfg, "teacher", index), loop_cfg=loop_config(cfg), mesh=mesh,
        load_weights=pretrained_loader(cfg, index))
    record = {"index": index, "architecture": architecture, "train_examples": int(len(rows)),
              "pretrained": pretrained_path(cfg, index),
              "best_step": result.best_step, "wall_clock_s": wall_clock(folder),
              "test": test_metrics(cfg, data, model, result.variables, mesh)}
    mark_done(folder, record)
    claim.release()
    return record


def pretrained_path(cfg: ExperimentConfig, index: int) -> str | None:
    """The torchvision-layout weight file teacher `index` starts from, or None (from scratch)."""
    files = cfg.teachers.pretrained  # one per teacher, checked by validate.check_options
    path = files[index] if files else ""
    return str(pathlib.Path(path).expanduser()) if path else None


def pretrained_loader(cfg: ExperimentConfig, index: int):
    """`load_weights` for `train_classifier`: ImageNet weights into a fresh teacher, or None."""
    path = pretrained_path(cfg, index)
    if path is None:
        return None
    architecture = cfg.teachers.architectures[index]
    return lambda variables: pretrained.load_torchvision_weights(architecture, variables, path)


def load_teachers(cfg: ExperimentConfig, wd: Workdir, indices, mesh) -> list[tuple[Any, Any]]:
    """(apply_fn, variables) of finished teachers, replicated on the mesh; a clear error if one is missing."""
    teachers = []
    for i in indices:
        architecture = cfg.teachers.architectures[i]
        folder = wd.teacher_dir(i, architecture)
        if done(folder) is None:
            raise MissingStageError(f"teacher {i} ({architecture}) has not finished in {wd.root}: run "
                               f"`--stage teachers` (or `--teacher {i}`) with this work directory first")
        model, variables, _ = artifacts.load_setting(wd.root, f"teacher:{i}", parallel.replicated(mesh))
        teachers.append((model.apply, variables))
    return teachers


def train_setting(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, setting: str,
                  mesh: jax.sharding.Mesh, *, teachers_wd: Workdir | None = None) -> dict[str, Any]:
    """Trains one student setting of the registry on the whole training split (skipped when done).

    The registry entry says which teachers, which step (KD or the RL agent), which teacher
    weights and whether M_smooth is kept. The teachers come from `teachers_wd` (default: `wd`
    itself); sweeps over student options reuse the main run's teachers this way.
    """
    entry = settings_lib.get(setting)
    folder = wd.setting_dir(setting)
    if (record := done(folder)) is not None:
        return record
    claim = StageClaim(folder)
    if (record := done(folder)) is not None:  # finished by the job that held the claim
        claim.release()
        return record
    log.info("setting %s: student %s, %d training examples", setting, cfg.distill.student, len(data.splits["train"]))
    spec = spec_for(cfg, data, cfg.distill.student)
    artifacts.write_spec(folder, spec)
    model = artifacts.build_model(spec)
    rows = data.splits["train"]
    indices = entry.teacher_indices(cfg)
    teachers = load_teachers(cfg, teachers_wd or wd, indices, mesh)
    make_iter = lambda: data_lib.train_iterator(data, cfg, rows, seed=_seed(cfg, "student", 0))  # noqa: E731
    # Baseline IV's agent needs a teacher's pooled features, which the cache does not store.
    cached = cfg.distill.teacher_outputs == "cached" and bool(indices) and entry.trainer != "rl"
    if cached:
        store = teacher_cache(cfg, teachers_wd or wd, data, mesh)
        make_train_iter = lambda: cache_lib.cached_train_iterator(  # noqa: E731
            data.dataset.source, rows, data.train_labels, store, image_size=cfg.data.image_size,
            batch_size=cfg.optim.batch_size, seed=_seed(cfg, "student", 0), teacher_indices=indices,
            num_workers=cfg.data.num_workers)
    else:
        make_train_iter = make_iter
    common = dict(optim_cfg=cfg.optim, steps_per_epoch=data_lib.steps_per_epoch(cfg, rows),
                  image_shape=image_shape(cfg, data), multilabel=data.multilabel,
                  seed=_seed(cfg, "student", 0), loop_cfg=loop_config(cfg), mesh=mesh)
    d = cfg.distill
    if entry.trainer == "rl":
        rl_trainer.train_rl_student(model, teachers, make_iter, validation_evaluator(cfg, data, mesh), folder,
                                    kd=trainer.KDSpec(tau=d.tau, alpha=d.alpha, weighting="equal"),
                                    rl=rl_trainer.RLSpec(equal_epochs=d.rl_equal_epochs,
                                                         learning_rate=d.rl_learning_rate,
                                                         baseline_decay=d.rl_baseline_decay),
                                    **common)
    else:
        kd = trainer.KDSpec(tau=d.tau, alpha=d.alpha, weighting=entry.weighting,
                            per_example=d.per_example if entry.weight_options else False,
                            normalize=d.normalize if entry.weight_options else "sum1")
        smooth = (trainer.SmoothSpec(warmup_epochs=d.warmup_epochs, bn_mode=d.bn_mode,
                                     recalibration_batches=d.recalibration_batches)
                  if entry.smoothing else None)
        trainer.train_student(model, teachers, make_train_iter, validation_evaluator(cfg, data, mesh), folder,
                              kd=kd, smooth=smooth, make_recalibration_batches=make_iter,
                              cached_teacher_outputs=cached, **common)
    record = {"setting": setting, "teachers": indices, "student": cfg.distill.student,
              "wall_clock_s": wall_clock(folder), "teacher_outputs": "cached" if cached else "online"}
    if symptoms := collapse.gradient_symptoms(collapse.grad_norms_from_file(folder / loop.METRICS_FILE)):
        log.warning("COLLAPSE: setting %s: %s", setting, collapse.describe(symptoms))
        record["collapsed"] = symptoms
    mark_done(folder, record)
    claim.release()
    return record


def teacher_cache(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, mesh) -> cache_lib.TeacherCache:
    """Every teacher's logits on `cache_views` stored views of the training split (built once, resumable)."""
    teachers = load_teachers(cfg, wd, range(len(cfg.teachers.architectures)), mesh)
    return cache_lib.build_teacher_cache(
        teachers, data.dataset.source, data.splits["train"], image_size=cfg.data.image_size,
        augment=data_lib.augment_config(cfg), num_views=cfg.distill.cache_views, seed=_seed(cfg, "student", 0),
        batch_size=cfg.distill.cache_batch_size, directory=wd.folder("teacher_cache"), mesh=mesh)


def _seed(cfg: ExperimentConfig, role: str, index: int) -> int:
    """A distinct, reproducible seed per role and index, derived from the run seed."""
    return cfg.seed * 1000 + {"teacher": 100, "student": 0}[role] + index
