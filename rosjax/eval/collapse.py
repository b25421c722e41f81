"""Collapse detection: a finished model that predicts a constant, or whose training gradients died.

A run can "finish" and still be useless: RoS-KD with the paper's unnormalised Exp(1) weights
blew up in its first epoch on noisy ISIC (KD term 14.2, gradient norm 21.5) and ended as a
constant predictor (test macro F1 0.028, AUROC 0.50, training CE = ln 8, gradient norm 0.09).
Its numbers look like a bad score, not like a broken run.  These pure numpy checks turn such
a run into a loud flag.

Symptoms (each a key of the dict `symptoms` returns):

* ``constant_class`` (one-label): the argmax takes a single class for >= `max_share` (99 %) of
  the examples.  A healthy model on a split with several classes never does this; a model
  that does has macro F1 <= 1/C whatever the split.
* ``constant_probabilities``: every class's (one-label softmax) or every label's (multi-label
  sigmoid) probability is nearly constant across examples: its standard deviation over the
  examples is below `std_tol` (1e-3) for all C outputs.  The model ignores its input.  For
  multi-label tasks this is the only prediction check: thresholded multi-label predictions
  are legitimately all-negative for most examples when findings are rare.
* ``dead_gradients``: the last epoch's mean gradient norm is below `ratio` (1e-2) times the
  largest epoch mean of the run.  The collapsed run had 0.09 / 21.5 = 4e-3; healthy ResNet-18
  students of the same recipe on generated data ended near 0.1 of their peak (baseline III
  5.19 -> 0.505) and the paper-literal run that blew up and recovered at 0.04 (25.7 -> 1.00),
  so 1e-2 sits between dead and recovered with a margin on both sides.  The peak, not the
  first epoch, is the reference so that a run whose first epoch happens to be quiet is still
  compared with its own active phase.  Runs with fewer than 2 epochs are not judged.

All functions but `grad_norms_from_file` are pure: plain arrays / lists in, JSON-serialisable
dicts out.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_SHARE = 0.99   # one-label: share of examples in the most-predicted class that counts as constant
STD_TOL = 1e-3     # every output's probability std across examples below this: input ignored
GRAD_RATIO = 1e-2  # last-epoch gradient norm below this fraction of the run's peak: dead


def prediction_stats(scores, *, multilabel: bool) -> dict[str, Any]:
    """Statistics of a model's predictions on a split.

    Args:
      scores: [N, C] probabilities (softmax for one-label, per-label sigmoid for multi-label).
      multilabel: task flag.
    Returns:
      {'num_examples', 'max_probability_std' (largest over outputs of the std across examples),
       and for one-label 'majority_class' (index) and 'majority_share' (fraction of examples
       whose argmax is that class)}.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"collapse: scores must be [N, C] probabilities, got shape {scores.shape}")
    n = scores.shape[0]
    stats: dict[str, Any] = {"num_examples": int(n),
                             "max_probability_std": float(np.max(np.std(scores, axis=0))) if n else 0.0}
    if not multilabel and n:
        counts = np.bincount(np.argmax(scores, axis=1), minlength=scores.shape[1])  # [C]
        stats["majority_class"] = int(np.argmax(counts))
        stats["majority_share"] = float(counts.max() / n)
    return stats


def prediction_symptoms(scores, *, multilabel: bool, max_share: float = MAX_SHARE,
                        std_tol: float = STD_TOL) -> dict[str, str]:
    """Collapse symptoms of a model's predictions: {symptom: description}, empty when healthy.

    Args:
      scores: [N, C] probabilities; multilabel: task flag.
      max_share: one-label: flag 'constant_class' when one class takes >= this share of argmaxes.
      std_tol: flag 'constant_probabilities' when every output's std across examples is < this.
    """
    stats = prediction_stats(scores, multilabel=multilabel)
    out = {}
    if stats["num_examples"] < 2:
        return out
    if not multilabel and stats["majority_share"] >= max_share:
        out["constant_class"] = (f"{100 * stats['majority_share']:.1f}% of {stats['num_examples']} "
                                 f"predictions are class {stats['majority_class']}")
    if stats["max_probability_std"] < std_tol:
        what = "every label's probability" if multilabel else "every class probability"
        out["constant_probabilities"] = (f"{what} is constant across examples "
                                         f"(largest std {stats['max_probability_std']:.2g} < {std_tol:g})")
    return out


def gradient_symptoms(grad_norms: Sequence[float], *, ratio: float = GRAD_RATIO) -> dict[str, str]:
    """'dead_gradients' when the last epoch's mean gradient norm < `ratio` x the run's peak.

    Args:
      grad_norms: per-epoch mean gradient norms in epoch order (`metrics.jsonl` train.grad_norm).
      ratio: the fraction of the peak below which the gradients count as dead.
    Returns:
      {'dead_gradients': description} or {} (also {} for fewer than 2 finite epochs).
    """
    g = np.asarray([v for v in grad_norms if v is not None], np.float64)
    g = g[np.isfinite(g)]
    if g.size < 2:
        return {}
    peak, last = float(np.max(g)), float(g[-1])
    if peak > 0 and last < ratio * peak:
        return {"dead_gradients": (f"last-epoch gradient norm {last:.3g} is {last / peak:.2g} of the peak "
                                   f"{peak:.3g} (epoch {int(np.argmax(g)) + 1}; threshold {ratio:g})")}
    return {}


def grad_norm_history(records: Sequence[dict]) -> list[float]:
    """Per-epoch mean gradient norms from `metrics.jsonl` records (epochs without one are skipped)."""
    return [float(r["train"]["grad_norm"]) for r in records
            if isinstance(r.get("train"), dict) and r["train"].get("grad_norm") is not None]


def grad_norms_from_file(path) -> list[float]:
    """`grad_norm_history` of a `metrics.jsonl` file ([] when it does not exist); the one I/O helper."""
    import json  # noqa: PLC0415
    import pathlib  # noqa: PLC0415

    path = pathlib.Path(path)
    if not path.exists():
        return []
    return grad_norm_history([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def describe(symptoms: dict[str, str]) -> str:
    """One line naming every symptom, for logs and the report."""
    return "; ".join(f"{name}: {text}" for name, text in symptoms.items())
