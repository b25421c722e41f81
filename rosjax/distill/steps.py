"""The distillation step: frozen teachers, a weighted KD loss, one student update.

`make_distill_step(...)` returns a pure function

    distill_step(state, inputs, batch, run_key) -> (state, metrics)

that `rosjax.train.parallel.jit_train_step(step, mesh, frozen=inputs)` compiles for data
parallelism: the student state is donated; `inputs` (`DistillInputs`: the teachers' variables
and the teacher-weight rule) is a separate, replicated, never-donated argument. A notebook can
`jax.jit` it directly.

Teachers run in eval mode on the *same augmented batch* as the student, inside the same jitted
program (a shipped batch's views are rendered there first, `rosjax.data.device_augment`).
With cached teacher outputs (FKD-style replay, `rosjax.distill.cache`), the batch carries
`teacher_logits` [K, B, C] instead and no teacher runs.

The settings of the paper are all this step with another weight rule
(`rosjax.distill.weighting.weight_rule`), an argument rather than a constant of the program, so
they share one compiled program per student and number of teachers:
  RoS-KD / baseline V   weight_rule("exponential", K)  (w_m ~ Exp(1), redrawn every step)
  baseline III          weight_rule("equal", K)        (w_m = 1/K: the mean of the teachers' KL)
  baseline II           weight_rule("equal", 1)        (one teacher, w = 1)
Baseline I (no teachers) is `rosjax.train.steps.train_step`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rosjax import losses
from rosjax.data import device_augment
from rosjax.distill import weighting
from rosjax.train import steps as train_steps
from rosjax.train.state import TrainState


class DistillInputs(NamedTuple):
    """The distillation step's frozen argument: replicated, never donated, never written back."""
    teachers: tuple          # each teacher's variables; () with cached teacher outputs
    rule: weighting.WeightRule  # how the step weighs the teachers


def teacher_logits(apply_fns: Sequence[Callable], teachers: Sequence[Any], images: jax.Array) -> jax.Array:
    """Logits [K, B, C] of every frozen teacher (eval mode) on `images` [B, H, W, C]."""
    outputs = [apply(variables, images, train=False) for apply, variables in zip(apply_fns, teachers)]
    return jax.lax.stop_gradient(jnp.stack(outputs).astype(jnp.float32))


def make_distill_step(teacher_apply_fns: Sequence[Callable], *, tau: float, alpha: float, multilabel: bool,
                      per_example: bool = False, class_weights=None) -> Callable:
    """Builds `distill_step(state, inputs, batch, run_key) -> (state, metrics)`, one object per
    distinct arguments in a process.

    `parallel.jit_train_step` shares one jitted program among the runs passing the same step
    object: the settings distilling one student from as many teachers (their weighting is an
    argument, `inputs.rule`), and the sweep points, compile and trace it once.

    Args:
      teacher_apply_fns: each teacher's `module.apply` (static; the variables come at call time
        in `inputs.teachers`); K = their number, also with cached outputs (then unused).
      tau, alpha: temperature and KD weight of the paper's eq. (4).
      multilabel: softmax KD (False) or per-label sigmoid KD (True).
      per_example: one weight draw per example ([K, B]) instead of one per step ([K]).
      class_weights: optional host array [C] weighting the CE term (`losses.class_weights`);
        None, the default, is the paper's unweighted CE.
    The step's key is `fold_in(run_key, state.step)`, split into a dropout key and a
    teacher-weight key, so a resumed run draws the same weights at the same step; the weights
    follow `inputs.rule` (`rosjax.distill.weighting.rule_weights`).
    """
    options = dict(tau=float(tau), alpha=float(alpha), multilabel=multilabel, per_example=per_example,
                   weights=train_steps.class_weights_key(class_weights))
    try:
        return _distill_step(tuple(teacher_apply_fns), **options)
    except TypeError:  # a teacher module with an unhashable field (e.g. a list): built for this run alone
        return _distill_step.__wrapped__(tuple(teacher_apply_fns), **options)


@functools.lru_cache(maxsize=16)
def _distill_step(teacher_apply_fns: tuple[Callable, ...], *, tau: float, alpha: float, multilabel: bool,
                  per_example: bool, weights: tuple[float, ...] | None) -> Callable:
    """`make_distill_step`'s builder, on hashable arguments (`weights`: the class weights)."""
    class_weights = train_steps.class_weights_from_key(weights)
    num_teachers = len(teacher_apply_fns)
    if num_teachers < 1:
        raise ValueError("make_distill_step needs at least one teacher")

    def distill_step(state: TrainState, inputs: DistillInputs, batch: dict[str, jax.Array],
                     run_key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        dropout_key, weight_key = jax.random.split(train_steps.step_rng(run_key, state.step))
        batch = device_augment.render(batch)  # a shipped batch's views, rendered in the step
        if "teacher_logits" in batch:
            t_logits = jax.lax.stop_gradient(batch["teacher_logits"].astype(jnp.float32))  # [K, B, C]
        else:
            t_logits = teacher_logits(teacher_apply_fns, inputs.teachers, batch["image"])  # [K, B, C]
        batch_size = batch["image"].shape[0]
        w = weighting.rule_weights(inputs.rule, weight_key, num_teachers, per_example=per_example,
                                   batch_size=batch_size)  # [K] or [K, B]

        def loss_fn(params):
            logits, batch_stats = train_steps.forward_train(state, params, batch["image"], dropout_key)
            loss, aux = losses.kd_loss(logits, t_logits, batch["label"], w, tau=tau, alpha=alpha,
                                       multilabel=multilabel, class_weights=class_weights)
            return loss, (logits, batch_stats, aux)

        (loss, (logits, batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics = {"loss": loss, "kd": aux["kd"], "ce": aux["ce"],
                   "accuracy": train_steps.accuracy(logits, batch["label"], multilabel=multilabel),
                   "weight_sum": jnp.sum(w) / (1 if w.ndim == 1 else batch_size),
                   "grad_norm": optax.tree.norm(grads)}
        mean_w = w if w.ndim == 1 else jnp.mean(w, axis=1)  # [K]: each teacher's mean weight
        for k in range(num_teachers):
            metrics[f"weight_mean/t{k}"] = mean_w[k]
        return train_steps.apply_gradients(state, grads, batch_stats), metrics

    return distill_step
