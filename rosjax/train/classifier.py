"""Supervised training of one classifier (a teacher, or the no-distillation baseline).

`train_classifier` wires the optimiser, the state, the supervised step and `fit` together and
exports the model selected on validation to `<workdir>/final` (`checkpoint.save_variables`).
The caller supplies the data (a train-iterator factory, an `evaluate` callback such as
`validation.make_evaluator(...)`); a rerun with the same work directory resumes.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax

from rosjax import checkpoint
from rosjax.config import OptimConfig
from rosjax.train import loop, parallel, steps
from rosjax.train.start import FINAL_DIR, start_run


def default_best_metric(multilabel: bool) -> str:
    """Validation metric that selects the model: macro F1 (one-label), mean AUROC (multi-label)."""
    return "auroc_macro" if multilabel else "f1_macro"


@dataclasses.dataclass(frozen=True)
class ClassifierResult:
    variables: dict[str, Any]       # {'params', 'batch_stats'} of the exported (best) model
    best_step: int | None           # step of the best validation checkpoint (None: no evaluation)
    fit: loop.FitResult             # last state and the epoch records of this call


def train_classifier(model: nn.Module, make_train_iter: Callable[[], Iterator],
                     evaluate: Callable[[Any, dict], dict] | None,
                     workdir: str | os.PathLike, *, optim_cfg: OptimConfig, steps_per_epoch: int,
                     image_shape: tuple[int, int, int], multilabel: bool, seed: int = 0,
                     loop_cfg: loop.LoopConfig = loop.LoopConfig(),
                     mesh: jax.sharding.Mesh | None = None,
                     load_weights: Callable[[dict], dict] | None = None,
                     compile_only: bool = False, class_weights=None) -> ClassifierResult | None:
    """Trains `model` with the paper's SGD recipe and exports the best model to workdir/final.

    Args:
      model: linen module (`rosjax.models.create(...)`).
      make_train_iter: returns a fresh endless train iterator of host batches of
        optim_cfg.batch_size rows (divided by the process count with several hosts).
      evaluate: `evaluate(state, extras) -> dict` on the validation split, or None.
      workdir: this classifier's folder (checkpoints, metrics.jsonl, final/).
      optim_cfg: optimiser hyper-parameters (epochs, batch size, learning rate, ...).
      steps_per_epoch: train examples // batch size.
      image_shape: (H, W, C) of the train images.
      multilabel: task flag.
      seed: splits into the init key and the run key (dropout).
      loop_cfg: loop options; `best_metric` None picks `default_best_metric(multilabel)`.
      mesh: the data-parallel mesh (default: all devices).
      load_weights: the starting weights (`rosjax.train.start.start_run`), e.g. ImageNet ones.
      compile_only: only compile the train step (`parallel.compile_step`) and return None.
      class_weights: optional host array [C] weighting the loss (`rosjax.losses.class_weights`,
        --optim.class_weighting=balanced); None: the paper's unweighted loss.
    """
    if evaluate is not None and loop_cfg.best_metric is None:
        loop_cfg = dataclasses.replace(loop_cfg, best_metric=default_best_metric(multilabel))
    run = start_run(model, optim_cfg=optim_cfg, steps_per_epoch=steps_per_epoch, image_shape=image_shape,
                    seed=seed, mesh=mesh, load_weights=load_weights)
    mesh, state, run_key, schedule = run.mesh, run.state, run.run_key, run.schedule
    step_fn = parallel.jit_train_step(steps.bound_train_step(multilabel=multilabel, class_weights=class_weights),
                                      mesh)
    if compile_only:
        parallel.compile_step(step_fn, state, next(make_train_iter()), run_key, mesh)
        return None
    result = loop.fit(state, step_fn, make_train_iter(), run_key=run_key,
                      num_epochs=optim_cfg.epochs, steps_per_epoch=steps_per_epoch,
                      workdir=workdir, mesh=mesh, cfg=loop_cfg, evaluate=evaluate,
                      schedule=schedule)
    best_step, chosen = None, result.state
    if loop_cfg.best_metric is not None:
        ckpts = checkpoint.RunCheckpoints(workdir, best_mode=loop_cfg.best_mode)
        try:
            if ckpts.best_step() is not None:
                best = ckpts.restore_best(abstract_state=checkpoint.abstract_like(result.state.model_state()))
                best_step, chosen = best.step, best.state
        finally:
            ckpts.close()
    variables = chosen.variables
    checkpoint.save_variables(pathlib.Path(workdir) / FINAL_DIR, variables)
    return ClassifierResult(variables=variables, best_step=best_step, fit=result)
