"""Training a student: baseline I (no teachers), II/III (fixed weights), RoS-KD (+ M_smooth).

`train_student` is the distillation counterpart of `rosjax.train.classifier.train_classifier`:
the same optimiser, state, loop, checkpoints and resume, with the teachers bound to the step as
a frozen, non-donated argument, and (for RoS-KD) the running mean of the student's weights
carried as a loop `extra`, so it is checkpointed with the student and restored on resume.

At the end it exports, under `<workdir>/final/`:
  student/   the raw student after the last epoch (baseline V when the run is RoS-KD's)
  smooth/    M_smooth: averaged weights, BatchNorm statistics recomputed on training batches
             (or averaged, `bn_mode="average"`), when smoothing is on.
Students are taken after the last epoch, never picked on validation: M_smooth is defined by
the trajectory, and the baselines are treated the same way so the comparison is fair.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax

from rosjax import checkpoint
from rosjax.config import DistillConfig, OptimConfig
from rosjax.data import device_augment
from rosjax.distill import replay, smoothing
from rosjax.distill import weighting as weighting_lib
from rosjax.distill.steps import DistillInputs, make_distill_step
from rosjax.train import loop, parallel, steps
from rosjax.train.start import FINAL_DIR, start_run

SMOOTH_KEY = "smooth"


@dataclasses.dataclass(frozen=True)
class StudentResult:
    variables: dict[str, Any]              # the raw student after the last epoch
    smooth_variables: dict[str, Any] | None  # M_smooth, when smoothing was on
    fit: loop.FitResult


def train_student(model: nn.Module, teachers: Sequence[tuple[Callable, Any]],
                  make_train_iter: Callable[[], Iterator], evaluate: Callable[[Any, dict], dict] | None,
                  workdir: str | os.PathLike, *, optim_cfg: OptimConfig, distill: DistillConfig, weighting: str,
                  normalize: str, per_example: bool, smooth: bool, steps_per_epoch: int,
                  image_shape: tuple[int, int, int], multilabel: bool,
                  make_recalibration_batches: Callable[[], Iterator] | None = None,
                  cached_teacher_outputs: bool = False, seed: int = 0,
                  loop_cfg: loop.LoopConfig = loop.LoopConfig(),
                  mesh: jax.sharding.Mesh | None = None, class_weights=None,
                  load_weights: Callable[[dict], dict] | None = None) -> StudentResult:
    """Trains a student and exports it (and M_smooth) to `<workdir>/final`.

    Args:
      model: the student module.
      teachers: (apply_fn, variables) per teacher, frozen; empty for baseline I (CE only).
      make_train_iter: returns a fresh endless iterator of training batches.
      evaluate: validation callback `evaluate(state, extras) -> dict` (logged, not used to select).
      workdir: this setting's folder (ckpt/, metrics.jsonl, final/).
      optim_cfg, steps_per_epoch, image_shape, multilabel, seed, loop_cfg, mesh: as in
        `rosjax.train.classifier.train_classifier`.
      distill: the --distill.* section: temperature, KD weight and M_smooth's options (warm-up,
        BatchNorm mode, recalibration batches); checked at start-up by `rosjax.experiment.validate`.
      weighting, normalize, per_example: how the teachers are combined (the setting's, from the
        registry): "equal" (1/K) or "exponential" (random draws), their rescaling and whether
        each example draws its own (`rosjax.distill.weighting`).
      smooth: also keep and export M_smooth, the running mean of the epoch weights.
      make_recalibration_batches: returns training batches (un-augmented is fine) for the
        BatchNorm recalibration of M_smooth; needed when distill.bn_mode == "recalibrate".
      cached_teacher_outputs: the train batches carry the teachers' stored logits
        (`rosjax.distill.replay.cached_train_iterator`), so the step runs no teacher.
      class_weights: optional host array [C] weighting the CE term (`rosjax.losses.class_weights`);
        None: the paper's unweighted CE.
      load_weights: the student's starting weights (`rosjax.train.start.start_run`), e.g. ImageNet ones.
    """
    run = start_run(model, optim_cfg=optim_cfg, steps_per_epoch=steps_per_epoch, image_shape=image_shape,
                    seed=seed, mesh=mesh, load_weights=load_weights)
    mesh, state, run_key, schedule = run.mesh, run.state, run.run_key, run.schedule

    if teachers:
        apply_fns = tuple(apply for apply, _ in teachers)
        step = make_distill_step(apply_fns, tau=distill.tau, alpha=distill.alpha, multilabel=multilabel,
                                 per_example=per_example, class_weights=class_weights)
        # The weighting is an argument of the compiled step, so that the settings distilling from
        # as many teachers share one program; cached outputs leave the teachers out of it.
        rule = weighting_lib.weight_rule(weighting, len(teachers), normalize=normalize)
        variables = () if cached_teacher_outputs else tuple(v for _, v in teachers)
        frozen = jax.device_put(DistillInputs(teachers=variables, rule=rule), parallel.replicated(mesh))
        if cached_teacher_outputs:  # batches carry teacher_logits [B, K, C]; no teacher runs
            step = replay.cached_distill_step(step)
        step_fn = parallel.jit_train_step(step, mesh, frozen=frozen)
    else:
        step_fn = parallel.jit_train_step(steps.bound_train_step(multilabel=multilabel, class_weights=class_weights),
                                          mesh)

    extras, on_epoch_end = {}, None
    if smooth:
        # Replicated like the state, so a restore targets the same shardings as a fresh run.
        extras = jax.device_put({SMOOTH_KEY: smoothing.SmoothState.create(
            state.params, state.batch_stats, average_batch_stats=distill.bn_mode == "average")},
            parallel.replicated(mesh))

        def on_epoch_end(state, epoch, extras):
            if not smoothing.should_average(epoch, distill.warmup_epochs):
                return extras
            return {SMOOTH_KEY: _average_in(extras[SMOOTH_KEY], state.params, state.batch_stats)}

    result = loop.fit(state, step_fn, make_train_iter(), run_key=run_key, num_epochs=optim_cfg.epochs,
                      steps_per_epoch=steps_per_epoch, workdir=workdir, mesh=mesh,
                      cfg=dataclasses.replace(loop_cfg, best_metric=None), evaluate=evaluate,
                      on_epoch_end=on_epoch_end, extras=extras, schedule=schedule)

    final = pathlib.Path(workdir) / FINAL_DIR
    variables = result.state.variables
    checkpoint.save_variables(final / "student", variables)
    smooth_variables = None
    if smooth:
        smooth_variables = smoothed_variables(model, result.extras[SMOOTH_KEY], variables, distill,
                                              make_recalibration_batches, mesh,
                                              steps_per_epoch=steps_per_epoch)
        checkpoint.save_variables(final / "smooth", smooth_variables)
    return StudentResult(variables=variables, smooth_variables=smooth_variables, fit=result)


@jax.jit
def _average_in(smooth_state: smoothing.SmoothState, params: Any, batch_stats: Any) -> smoothing.SmoothState:
    """One running-mean update, jitted (no donation: `params` still belongs to the live state)."""
    return smooth_state.update(params, batch_stats if smooth_state.batch_stats is not None else None)


def smoothed_variables(model: nn.Module, smooth_state: smoothing.SmoothState, student_variables: dict,
                       distill: DistillConfig, make_batches: Callable[[], Iterator] | None,
                       mesh: jax.sharding.Mesh, *, steps_per_epoch: int) -> dict[str, Any]:
    """M_smooth's variables: the averaged params with recalibrated (or averaged) BatchNorm statistics.

    Recalibration reads the first `--distill.recalibration_batches` batches of `make_batches()`, or
    with 0 the first `steps_per_epoch` (one epoch of the training iterator: every training example
    once, up to the incomplete last batch an epoch drops), like torch's `update_bn` over the train loader.
    """
    if int(smooth_state.count) == 0:
        raise ValueError(f"M_smooth averaged no snapshot: the run has no epoch after the warm-up of "
                         f"{distill.warmup_epochs} epochs (--distill.warmup_epochs must be < --optim.epochs)")
    if distill.bn_mode == "average":
        return {"params": smooth_state.params, "batch_stats": smooth_state.batch_stats}
    if make_batches is None:
        raise ValueError("bn_mode='recalibrate' needs make_recalibration_batches")
    pixels = ("image", device_augment.VIEW_KEY)  # the images, or the shipped pixels and views
    batches = (parallel.shard_batch({k: v for k, v in b.items() if k in pixels}, mesh)
               for b in itertools.islice(make_batches(), distill.recalibration_batches or steps_per_epoch))
    stats = smoothing.recalibrate_batch_stats(model, smooth_state.params, student_variables["batch_stats"], batches)
    return {"params": smooth_state.params, "batch_stats": stats}
