"""Per-step teacher weights w_m for the KD term of eq. (4).

* `exponential` (RoS-KD): w_m ~ Exp(1) i.i.d., one draw per training step shared by the batch,
  unnormalized, exactly as the paper writes it.  Options: one draw per example ([K, B]), and
  normalization to sum 1 (i.i.d. Exp(1) divided by their sum is Dirichlet(1, ..., 1)) or to
  sum K (mean weight 1, so the expected KD strength matches the unnormalized default while the
  total is no longer random).
* `equal` (baseline III, and baseline II with K=1): w_m = 1/K.  Since KL(q_m || p) is linear in
  q_m up to a student-independent constant (the teachers' entropies),
  (1/K) sum_m KL(q_m || p) = KL(mean_m q_m || p) + const, so the student gets the same gradient
  as from KD to the averaged teacher distribution -- baseline III as the paper describes it.
  With K=1 the weight is 1: plain single-teacher KD (baseline II).

The RL teacher-selection baseline (IV) keeps a learned policy and lives in `rl_policy.py`; the
schemes here are stateless functions of a key.  Keys: `step_key(run_key, step)` folds the step
into the run's key, so a resumed run draws the same weights at the same step.
"""
from __future__ import annotations

from numbers import Integral

import jax
import jax.numpy as jnp

NORMALIZATIONS = (None, "sum1", "sumk")


def step_key(run_key, step):
    """Key for the teacher weights of one step: fold_in(run_key, step)."""
    return jax.random.fold_in(run_key, step)


def _check_common(num_teachers, per_example, batch_size, normalize):
    if not isinstance(num_teachers, Integral) or num_teachers < 1:
        raise ValueError(f"weighting: num_teachers must be a positive int, got {num_teachers!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"weighting: unknown normalize={normalize!r}; options are {NORMALIZATIONS}")
    if per_example and (not isinstance(batch_size, Integral) or batch_size < 1):
        raise ValueError("weighting: per_example=True needs batch_size (a positive int), got "
                         f"batch_size={batch_size!r}")


def _shape(num_teachers, per_example, batch_size):
    return (int(num_teachers), int(batch_size)) if per_example else (int(num_teachers),)


def _normalize(w, normalize):
    """Rescales w [K] or [K, B] along the teacher axis 0."""
    if normalize is None:
        return w
    total = jnp.sum(w, axis=0, keepdims=True)  # [1] or [1, B]
    scale = 1.0 if normalize == "sum1" else float(w.shape[0])
    return w * (scale / total)


def sample_teacher_weights(key, num_teachers, *, per_example=False, batch_size=None,
                           normalize=None):
    """RoS-KD weights w_m ~ Exp(1) i.i.d.

    Args:
      key: a jax.random key (use `step_key(run_key, step)`).
      num_teachers: K.
      per_example: one draw per example ([K, B]) instead of one per step ([K]).
      batch_size: B, required with per_example=True (ignored otherwise).
      normalize: None (paper), 'sum1' (Dirichlet(1,...,1)) or 'sumk' (sum to K) over teachers.
    Returns:
      float32 [K] or [K, B].
    """
    _check_common(num_teachers, per_example, batch_size, normalize)
    w = jax.random.exponential(key, _shape(num_teachers, per_example, batch_size), jnp.float32)
    return _normalize(w, normalize)


def equal_teacher_weights(num_teachers):
    """Baseline III weights 1/K ([K]); K=1 gives weight 1 (baseline II)."""
    _check_common(num_teachers, False, None, None)
    return jnp.full((num_teachers,), 1.0 / num_teachers, jnp.float32)


def _equal(key, num_teachers, *, per_example=False, batch_size=None, normalize=None):
    """Equal weights through the sampler's interface ('sumk' makes each weight 1)."""
    del key  # deterministic
    _check_common(num_teachers, per_example, batch_size, normalize)
    w = jnp.ones(_shape(num_teachers, per_example, batch_size), jnp.float32)
    return _normalize(w, "sum1" if normalize is None else normalize)


TEACHER_WEIGHTINGS = {"exponential": sample_teacher_weights, "equal": _equal}


def teacher_weights(kind, key, num_teachers, *, per_example=False, batch_size=None,
                    normalize=None):
    """Weights of the scheme named `kind` (a key of TEACHER_WEIGHTINGS) -> [K] or [K, B]."""
    if kind not in TEACHER_WEIGHTINGS:
        raise ValueError(f"weighting: unknown teacher weighting kind={kind!r}; options are "
                         f"{sorted(TEACHER_WEIGHTINGS)}")
    return TEACHER_WEIGHTINGS[kind](key, num_teachers, per_example=per_example,
                                    batch_size=batch_size, normalize=normalize)
