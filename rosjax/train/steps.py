"""Pure train and eval steps; compile them with `parallel.jit_train_step` or plain `jax.jit`.

`train_step(state, batch, key, *, multilabel)` is the supervised (teacher / baseline I) step.
Its pieces are public so the distillation step can reuse them:

    def distill_step(state, teachers, batch, run_key):
        key = step_rng(run_key, state.step)
        def loss_fn(params):
            logits, batch_stats = forward_train(state, params, batch["image"], key)
            loss = ...  # kd_loss(logits, teacher_logits, ...)
            return loss, (logits, batch_stats)
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        return apply_gradients(state, grads, batch_stats), {"loss": loss, ...}
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rosjax import losses
from rosjax.data import device_augment
from rosjax.train.state import ModelState, TrainState


def step_rng(run_key: jax.Array, step: jax.Array) -> jax.Array:
    """The key of one training step, fold_in(run_key, step): a resumed run draws the same."""
    return jax.random.fold_in(run_key, step)


def forward_train(state: TrainState, params: Any, images: jax.Array,
                  key: jax.Array) -> tuple[jax.Array, Any]:
    """Applies the model in train mode; returns (logits [B, C], updated batch_stats).

    BatchNorm normalises with the statistics of this (global) batch and updates its running
    averages; `key` feeds the 'dropout' stream (used e.g. by MobileNetV2's classifier).
    """
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     images, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": key})
    return logits, updates.get("batch_stats", state.batch_stats)


def apply_gradients(state: TrainState, grads: Any, batch_stats: Any) -> TrainState:
    """One optimiser update of the parameters, the new BatchNorm statistics, step + 1."""
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)


def accuracy(logits: jax.Array, labels: jax.Array, *, multilabel: bool) -> jax.Array:
    """Top-1 accuracy (one-label) or per-label accuracy at logit 0, i.e. probability 0.5
    (multi-label); a cheap training signal, not an evaluation metric."""
    if multilabel:
        return jnp.mean((logits > 0) == (labels > 0.5))
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               multilabel: bool, class_weights=None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One supervised SGD step on a batch {'image': [B,H,W,C], 'label': [B] or [B,C]}.

    A shipped batch (uint8 image + 'view', `rosjax.data.device_augment`) is rendered first,
    inside the step's program.

    `key` is the run key; the step folds in `state.step`. Returns the new state and scalar
    metrics: loss (CE or summed BCE, mean over the batch), accuracy, grad_norm.
    `class_weights`: optional host array [C] (`losses.class_weights`), a constant of the
    program; None (the default) is the unweighted loss.
    """
    rng = step_rng(key, state.step)
    batch = device_augment.render(batch)

    def loss_fn(params):
        logits, batch_stats = forward_train(state, params, batch["image"], rng)
        loss = losses.supervised_loss(logits, batch["label"], multilabel=multilabel,
                                      class_weights=class_weights)
        return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss,
               "accuracy": accuracy(logits, batch["label"], multilabel=multilabel),
               "grad_norm": optax.tree.norm(grads)}
    return apply_gradients(state, grads, batch_stats), metrics


def bound_train_step(*, multilabel: bool, class_weights=None):
    """`train_step` with its options bound: one object per distinct options in a process.

    `parallel.jit_train_step` shares one jitted program among the runs that pass the same step
    object, so every teacher and CE student of a run with these options reuses the programs
    of the architectures an earlier run compiled. `class_weights`: None or a host array [C].
    """
    return _bound_train_step(train_step, multilabel, class_weights_key(class_weights))


def class_weights_key(class_weights) -> tuple[float, ...] | None:
    """Class weights [C] as a hashable tuple, so cached step builders can key on them."""
    return None if class_weights is None else tuple(np.asarray(class_weights, np.float32).tolist())


def class_weights_from_key(key: tuple[float, ...] | None) -> np.ndarray | None:
    """The host array [C] (float32) of a `class_weights_key`, or None."""
    return None if key is None else np.asarray(key, np.float32)


@functools.lru_cache(maxsize=16)
def _bound_train_step(step, multilabel: bool, weights: tuple[float, ...] | None):
    """The step function is part of the key, so a patched `train_step` (a test's) is bound anew."""
    return functools.partial(step, multilabel=multilabel, class_weights=class_weights_from_key(weights))


def eval_step(state: TrainState | ModelState, batch: dict[str, jax.Array]) -> jax.Array:
    """Logits [B, C] of the model in inference mode (BatchNorm running averages); a shipped
    batch is rendered first (`rosjax.data.device_augment.render`)."""
    return state.apply_fn(state.variables, device_augment.render(batch)["image"], train=False)
