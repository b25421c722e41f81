"""Evaluation passes over padded, masked batches: predictions and the per-epoch validation metrics.

Evaluation batches are {'image', 'label', 'mask'} with a fixed batch size (the last batch padded,
its padded rows mask 0), so the pass compiles once. Outputs come back replicated, so every
process reads the whole split's predictions and computes the same metrics.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from rosjax import losses
from rosjax.eval import metrics
from rosjax.train import parallel, steps


def _outputs(state, batch, *, multilabel):
    logits = steps.eval_step(state, batch)  # [B, C]
    return {"logits": logits, "label": batch["label"], "mask": batch["mask"],
            "loss": losses.supervised_per_example(logits, batch["label"], multilabel=multilabel)}


@functools.lru_cache(maxsize=2)
def _bound_outputs(multilabel: bool) -> Callable:
    """One `_outputs` per task type, so every run's evaluation shares its jitted program."""
    return functools.partial(_outputs, multilabel=multilabel)


def make_predict(mesh: jax.sharding.Mesh, *, multilabel: bool) -> Callable:
    """Returns `predict(state, batches) -> {'logits' [N,C], 'label', 'loss' [N]}` (numpy,
    padded rows removed), compiled once for the mesh."""
    outputs = parallel.jit_eval_step(_bound_outputs(multilabel), mesh)

    def predict(state, batches: Iterable[dict]) -> dict[str, np.ndarray]:
        parts = [jax.device_get(outputs(state, parallel.shard_batch(b, mesh))) for b in batches]
        if not parts:
            raise ValueError("evaluation: the batch iterable is empty")
        keep = np.concatenate([np.asarray(p["mask"]) > 0 for p in parts])  # [N_padded]
        return {k: np.concatenate([p[k] for p in parts])[keep] for k in ("logits", "label", "loss")}

    return predict


def make_evaluator(make_batches: Callable[[], Iterable[dict]], *, mesh: jax.sharding.Mesh,
                   multilabel: bool, class_names=None,
                   pick: Callable[[Any, dict], Any] | None = None) -> Callable[[Any, dict], dict]:
    """An `evaluate(state, extras) -> dict` callback for `fit`.

    Args:
      make_batches: returns a fresh iterable of evaluation batches (this process's rows).
      mesh: the data-parallel mesh.
      multilabel: task flag.
      class_names: optional names for the per-class entries.
      pick: `pick(state, extras) -> state` chooses what to evaluate (default: the state
        itself; e.g. the state with the running-mean weights from `extras`).
    Returns:
      `rosjax.eval.metrics.classification_metrics` of the split plus 'loss' (mean supervised
      loss over the unpadded rows).
    """
    predict = make_predict(mesh, multilabel=multilabel)

    def evaluate(state, extras):
        target = state if pick is None else pick(state, extras)
        out = predict(target, make_batches())
        result = metrics.classification_metrics(
            out["label"], metrics.scores_from_logits(out["logits"], multilabel=multilabel),
            multilabel=multilabel, class_names=class_names)
        return {**result, "loss": float(np.mean(out["loss"]))}

    return evaluate
