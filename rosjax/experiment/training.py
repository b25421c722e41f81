"""The training stages: one teacher per subset, then each student setting.

Each stage trains in its own folder of the work directory (checkpoints, metrics.jsonl, final/)
and ends by writing `DONE.json`; a folder with `DONE.json` is skipped, a folder without one
resumes from its last checkpoint.
"""
from __future__ import annotations

import functools
import json
import logging
import pathlib
import threading
from collections.abc import Callable
from typing import Any

import jax

from rosjax import losses
from rosjax.config import ExperimentConfig
from rosjax.distill import cache as cache_lib
from rosjax.distill import replay, rl_trainer, trainer
from rosjax.errors import UserError
from rosjax.eval import collapse
from rosjax.experiment import artifacts
from rosjax.experiment import data as data_lib
from rosjax.experiment import settings as settings_lib
from rosjax.experiment.workdir import Workdir, claim_unless_done, done, mark_done
from rosjax.models import pretrained
from rosjax.train import classifier, loop, parallel, validation
from rosjax.train.state import ModelState

log = logging.getLogger(__name__)


class MissingStageError(UserError):
    """A stage needs the output of one that has not run (e.g. a student before its teachers)."""


def loop_config(cfg: ExperimentConfig) -> loop.LoopConfig:
    """Every stage exports its model and writes DONE.json as soon as it has trained, and a done
    stage never trains on: no resume checkpoint after the last epoch."""
    return loop.LoopConfig(log_every_steps=cfg.log_every_steps, checkpoint_every_steps=cfg.checkpoint_every_steps,
                           wandb_project=cfg.logging.wandb, final_checkpoint=False)


def class_weights(cfg: ExperimentConfig, data: data_lib.ExperimentData, rows):
    """--optim.class_weighting's weights [C] from the training labels of `rows` (None: 'none')."""
    return losses.class_weights(data.train_labels[rows], data.num_classes, multilabel=data.multilabel,
                                kind=cfg.optim.class_weighting)


def image_shape(cfg: ExperimentConfig, data: data_lib.ExperimentData) -> tuple[int, int, int]:
    return (cfg.data.image_size, cfg.data.image_size, data.dataset.num_channels)


def spec_for(cfg: ExperimentConfig, data: data_lib.ExperimentData, architecture: str) -> dict[str, Any]:
    return artifacts.model_spec(cfg, architecture, class_names=data.dataset.class_names,
                                num_channels=data.dataset.num_channels)


def validation_evaluator(cfg, data, mesh):
    return validation.make_evaluator(lambda: data_lib.eval_batches(data, cfg, data.splits["validation"]), mesh=mesh,
                                   multilabel=data.multilabel, class_names=data.dataset.class_names)


def wall_clock(folder: pathlib.Path) -> float:
    """Training seconds summed over the epochs in metrics.jsonl (resumed runs included)."""
    path = folder / loop.METRICS_FILE
    if not path.exists():
        return 0.0
    return sum(json.loads(line)["epoch_seconds"] for line in path.read_text().splitlines() if line.strip())


def test_metrics(cfg, data, model, variables, mesh) -> dict[str, Any]:
    """Test-split metrics of a finished model (`classification_metrics` plus mean loss)."""
    evaluator = validation.make_evaluator(lambda: data_lib.eval_batches(data, cfg, data.splits["test"]), mesh=mesh,
                                        multilabel=data.multilabel, class_names=data.dataset.class_names)
    return evaluator(ModelState.of(model, variables), {})


class CompileAhead:
    """Compiles the programs of stages still to run on a second thread, while the main thread
    runs them in order.

    XLA compiles one program on one core, and on a CPU the first steps of a training run are
    mostly compiling (DenseNet-121's train step about two minutes, baseline IV's step with five
    teachers inside more): the second thread works from the last job (the paper's teacher list
    ends with the slow DenseNet-121), the main thread from the first, and `wait(key)` before
    running a job makes sure no program is compiled twice. Each job is the stage's own code
    with `compile_only=True`, so the programs are the very ones the runs compile; they go to
    JAX's persistent cache (the CLI turns it on; without one nothing is started). A failed
    compile-ahead is ignored: the run then compiles, and reports, by itself.
    """

    def __init__(self, jobs: list[tuple[Any, Callable[[], None]]], name: str):
        self._jobs = dict(jobs)
        self._lock = threading.Lock()
        self._started: dict[Any, threading.Event] = {}
        self._thread = threading.Thread(target=self._from_the_end, args=([k for k, _ in jobs][::-1],),
                                        name=name, daemon=True)
        if jobs and jax.config.jax_compilation_cache_dir:
            self._thread.start()

    def _claim(self, key) -> threading.Event | None:
        """An event to set when done if `key` was not claimed yet, else None."""
        with self._lock:
            if key in self._started:
                return None
            self._started[key] = threading.Event()
            return self._started[key]

    def _from_the_end(self, order: list) -> None:
        for key in order:
            finished = self._claim(key)
            if finished is None:  # the main thread got there first: the rest is its
                return
            try:
                self._jobs[key]()
            except Exception as err:  # noqa: BLE001 (the run compiles and reports by itself)
                log.debug("compiling %s ahead failed: %s", key, err)
            finally:
                finished.set()

    def wait(self, key) -> None:
        """Before running `key`: waits for its compile-ahead, or claims it for the caller."""
        if self._claim(key) is None:
            self._started[key].wait()
        else:
            self._started[key].set()

    def close(self) -> None:
        if self._thread.is_alive():
            self._thread.join()


def teacher_compiler(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, indices,
                     mesh) -> CompileAhead:
    """Compiles ahead the train steps of the teachers `indices` (as `train_teacher`) still to train."""
    pending = [i for i in indices if done(teacher_folder(cfg, wd, i)) is None]
    return CompileAhead([(i, functools.partial(train_teacher, cfg, wd, data, i, mesh, compile_only=True))
                         for i in pending], "teacher-compiler")


def setting_compiler(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, settings,
                     mesh) -> CompileAhead:
    """Compiles ahead the step of baseline IV (the RL setting), whose five online teachers make it
    the slowest of the settings to compile, while the main thread trains the others."""
    pending = [s for s in settings if done(wd.setting_dir(s)) is None and settings_lib.get(s).trainer == "rl"]
    return CompileAhead([(s, functools.partial(train_setting, cfg, wd, data, s, mesh, compile_only=True))
                         for s in pending], "setting-compiler")


def teacher_folder(cfg: ExperimentConfig, wd: Workdir, key: int | str) -> pathlib.Path:
    """teachers/<i>-<arch>/ of subset teacher `key` (an int), teachers/full_<arch>/ of the
    full-split teacher of architecture `key` (a str)."""
    if isinstance(key, str):
        return wd.folder("teachers", f"full_{key}")
    return wd.teacher_dir(key, cfg.teachers.architectures[key])


def train_teacher(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, index: int | str,
                  mesh: jax.sharding.Mesh, compiler: CompileAhead | None = None, *,
                  compile_only: bool = False) -> dict[str, Any] | None:
    """Trains teacher `index` on its subset, or with an architecture name the full-split teacher of
    that architecture on the whole training split (skipped when done); returns its DONE record.

    `compile_only` compiles its train step and returns None (`CompileAhead`'s job).
    """
    full = isinstance(index, str)
    architecture = index if full else cfg.teachers.architectures[index]
    folder = teacher_folder(cfg, wd, index)
    # A full-split teacher takes the seed (and the weight file) of the first subset teacher of its architecture.
    first = cfg.teachers.architectures.index(architecture) if full else index
    rows = data.splits["train"] if full else data.subsets[index]
    spec, seed = spec_for(cfg, data, architecture), _seed(cfg, "full_teacher" if full else "teacher", first)
    model = artifacts.build_model(spec)
    run = dict(optim_cfg=cfg.optim, steps_per_epoch=data_lib.steps_per_epoch(cfg, rows),
               image_shape=image_shape(cfg, data), multilabel=data.multilabel, seed=seed, mesh=mesh,
               load_weights=weights_loader(architecture, pretrained_path(cfg, first)),
               class_weights=class_weights(cfg, data, rows))
    make_iter = lambda: data_lib.train_iterator(data, cfg, rows, seed=seed)  # noqa: E731
    if compile_only:
        return classifier.train_classifier(model, make_iter, None, folder, **run, compile_only=True)
    with claim_unless_done(folder) as record:
        if record is not None:
            return record
        log.info("teacher %s (%s): %d training examples", "full" if full else index, architecture, len(rows))
        artifacts.write_spec(folder, spec)
        if compiler is not None:
            compiler.wait(index)
        result = classifier.train_classifier(model, make_iter, validation_evaluator(cfg, data, mesh), folder, **run,
                                             loop_cfg=loop_config(cfg))
        record = {"index": "full" if full else index, "architecture": architecture, "train_examples": int(len(rows)),
                  "trained_on": "the full training split" if full else f"subset {index}",
                  "pretrained": pretrained_path(cfg, first),
                  "best_step": result.best_step, "wall_clock_s": wall_clock(folder),
                  "test": test_metrics(cfg, data, model, result.variables, mesh)}
        mark_done(folder, record)
        return record


def pretrained_path(cfg: ExperimentConfig, index: int) -> str | None:
    """The torchvision-layout weight file teacher `index` starts from, or None (from scratch)."""
    files = cfg.teachers.pretrained  # one per teacher, checked by validate.check_options
    path = files[index] if files else ""
    return str(pathlib.Path(path).expanduser()) if path else None


def student_pretrained_path(cfg: ExperimentConfig) -> str | None:
    """The torchvision-layout weight file the students start from (--distill.pretrained), or None."""
    return str(pathlib.Path(cfg.distill.pretrained).expanduser()) if cfg.distill.pretrained else None


def weights_loader(architecture: str, path: str | None):
    """`load_weights` of the trainers (`rosjax.train.start.start_run`): the file `path` into a
    freshly initialised `architecture`, or None (from scratch)."""
    if path is None:
        return None
    return lambda variables: pretrained.load_torchvision_weights(architecture, variables, path)


def load_teachers(cfg: ExperimentConfig, wd: Workdir, keys, mesh) -> list[tuple[Any, Any]]:
    """(apply_fn, variables) of finished teachers (subset indices or full-split architectures, as
    `Setting.teacher_keys`), replicated on the mesh; a clear error if one is missing."""
    teachers = []
    for key in keys:
        folder = teacher_folder(cfg, wd, key)
        if done(folder) is None:
            which = (f"the full-split teacher {key}" if isinstance(key, str)
                     else f"teacher {key} ({cfg.teachers.architectures[key]})")
            also = "" if isinstance(key, str) else f" (or `--teacher {key}`)"
            raise MissingStageError(f"{which} has not finished in {wd.root}: run `--stage teachers`{also} "
                                    "with this work directory first")
        name = f"teacher:full_{key}" if isinstance(key, str) else f"teacher:{key}"
        finished_ns = (folder / "DONE.json").stat().st_mtime_ns
        teachers.append(_load_finished_teacher(wd.root, name, parallel.replicated(mesh), finished_ns))
    return teachers


@functools.lru_cache(maxsize=16)
def _load_finished_teacher(root: pathlib.Path, name: str, sharding, finished_ns: int) -> tuple[Any, Any]:
    """(apply_fn, variables) of a finished teacher, restored once per process.

    Every student setting (and, with cached outputs, its cache) distils the same teachers: on a
    CPU smoke run, restoring them from Orbax anew for each was a minute. `finished_ns` (the
    mtime of the teacher's DONE.json) is part of the key, so a retrained teacher is read again.
    """
    del finished_ns  # only a cache key
    model, variables, _ = artifacts.load_setting(root, name, sharding)
    return model.apply, variables


def train_setting(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, setting: str,
                  mesh: jax.sharding.Mesh, *, teachers_wd: Workdir | None = None,
                  compiler: CompileAhead | None = None, compile_only: bool = False) -> dict[str, Any] | None:
    """Trains one student setting of the registry on the whole training split (skipped when done).

    The registry entry says which teachers, which step (KD or the RL agent), which teacher
    weights and whether M_smooth is kept. The teachers come from `teachers_wd` (default: `wd`
    itself); sweeps over student options reuse the main run's teachers this way.
    `compile_only` (the RL setting only) compiles its step and returns None (`CompileAhead`'s job).
    """
    folder = wd.setting_dir(setting)
    spec = spec_for(cfg, data, cfg.distill.student)
    teachers_wd = teachers_wd or wd
    if compile_only:
        _fit_student(cfg, teachers_wd, data, setting, spec, folder, mesh, compile_only=True)
        return None
    with claim_unless_done(folder) as record:
        if record is not None:
            return record
        log.info("setting %s: student %s, %d training examples", setting, cfg.distill.student,
                 len(data.splits["train"]))
        artifacts.write_spec(folder, spec)
        if compiler is not None:
            compiler.wait(setting)
        cached = _fit_student(cfg, teachers_wd, data, setting, spec, folder, mesh)
        record = {"setting": setting, "teachers": settings_lib.get(setting).teacher_keys(cfg),
                  "student": cfg.distill.student, "pretrained": student_pretrained_path(cfg),
                  "wall_clock_s": wall_clock(folder),
                  "teacher_outputs": "cached" if cached else "online"}
        if symptoms := collapse.gradient_symptoms(collapse.grad_norms_from_file(folder / loop.METRICS_FILE)):
            log.warning("COLLAPSE: setting %s: %s", setting, collapse.describe(symptoms))
            record["collapsed"] = symptoms
        mark_done(folder, record)
        return record


def _fit_student(cfg: ExperimentConfig, teachers_wd: Workdir, data: data_lib.ExperimentData, setting: str,
                 spec: dict[str, Any], folder: pathlib.Path, mesh: jax.sharding.Mesh, *,
                 compile_only: bool = False) -> bool:
    """Trains (or, RL only, compiles) the student of `setting` in `folder`; returns whether its
    batches carried cached teacher outputs."""
    entry = settings_lib.get(setting)
    model = artifacts.build_model(spec)
    rows = data.splits["train"]
    keys = entry.teacher_keys(cfg)
    teachers = load_teachers(cfg, teachers_wd, keys, mesh)
    make_iter = lambda: data_lib.train_iterator(data, cfg, rows, seed=_seed(cfg, "student", 0))  # noqa: E731
    # Baseline IV's agent needs a teacher's pooled features, which the cache does not store.
    cached = cfg.distill.teacher_outputs == "cached" and bool(keys) and entry.trainer != "rl"
    if cached:
        store, picked = teacher_cache(cfg, teachers_wd, data, mesh, keys)
        make_train_iter = lambda: replay.cached_train_iterator(  # noqa: E731
            data.dataset.source, rows, data.train_labels, store, image_size=cfg.data.image_size,
            batch_size=cfg.optim.batch_size, seed=_seed(cfg, "student", 0), teacher_indices=picked,
            num_workers=cfg.data.num_workers)
    else:
        make_train_iter = make_iter
    common = dict(optim_cfg=cfg.optim, distill=cfg.distill, steps_per_epoch=data_lib.steps_per_epoch(cfg, rows),
                  image_shape=image_shape(cfg, data), multilabel=data.multilabel,
                  seed=_seed(cfg, "student", 0), loop_cfg=loop_config(cfg), mesh=mesh,
                  class_weights=class_weights(cfg, data, rows),
                  load_weights=weights_loader(cfg.distill.student, student_pretrained_path(cfg)))
    if entry.trainer == "rl":
        rl_trainer.train_rl_student(model, teachers, make_iter, validation_evaluator(cfg, data, mesh), folder,
                                    **common, compile_only=compile_only)
    else:
        normalize, per_example = entry.kd_weights(cfg)
        trainer.train_student(model, teachers, make_train_iter, validation_evaluator(cfg, data, mesh), folder,
                              weighting=entry.weighting, normalize=normalize, per_example=per_example,
                              smooth=entry.smoothing, make_recalibration_batches=make_iter,
                              cached_teacher_outputs=cached, **common)
    return cached


def teacher_cache(cfg: ExperimentConfig, wd: Workdir, data: data_lib.ExperimentData, mesh,
                  keys) -> tuple[cache_lib.TeacherCache, list[int]]:
    """Teachers' logits on `cache_views` stored views of the training split (built once, resumable),
    and the positions of the teachers `keys` in it.

    Subset teachers share one cache of all k (teacher_cache/); full-split teachers get one per
    set of architectures (teacher_cache_full-<arch>-.../).
    """
    if all(isinstance(k, int) for k in keys):
        stored, folder = list(range(len(cfg.teachers.architectures))), "teacher_cache"
    else:
        stored, folder = list(keys), "teacher_cache_full-" + "-".join(keys)
    cache = cache_lib.build_teacher_cache(
        load_teachers(cfg, wd, stored, mesh), data.dataset.source, data.splits["train"],
        image_size=cfg.data.image_size, augment=data_lib.augment_config(cfg), num_views=cfg.distill.cache_views,
        seed=_seed(cfg, "student", 0), batch_size=cfg.distill.cache_batch_size, directory=wd.folder(folder),
        mesh=mesh, augment_on=data_lib.augment_on(cfg))
    return cache, [stored.index(k) for k in keys]


def _seed(cfg: ExperimentConfig, role: str, index: int) -> int:
    """A distinct, reproducible seed per role and index, derived from the run seed."""
    return cfg.seed * 1000 + {"teacher": 100, "full_teacher": 200, "student": 0}[role] + index
