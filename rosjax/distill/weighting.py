"""Per-step teacher weights w_m for the KD term of eq. (4).

* `exponential` (RoS-KD): w_m ~ Exp(1) i.i.d., one draw per training step shared by the batch,
  then rescaled along the teacher axis by `normalize`:
    "sum1" (default)  w / sum(w): Dirichlet(1, ..., 1), E[w_m] = 1/K and sum 1 every step, so
                      the KD term has baseline III's strength (equal weights 1/K) and only the
                      mix of teachers is random;
    "none"            the paper's literal formula, unnormalised Exp(1): sum(w) ~ Gamma(K, 1), on
                      average K times baseline III's KD term at the same learning rate (with
                      the paper's K = 5 teachers and lr this blew the student up in its first
                      epoch into a constant predictor; see README, "Settings");
    "sumk"            K w / sum(w): sum K every step (the paper's mean strength, not random).
  Option: one draw per example ([K, B]) instead of one per step.
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

import functools
from numbers import Integral
from typing import NamedTuple

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("none", "sum1", "sumk")
DEFAULT_NORMALIZE = "sum1"  # Dirichlet(1, ..., 1); "none" is the paper's unnormalised Exp(1).


def step_key(run_key, step):
    """Key for the teacher weights of one step: fold_in(run_key, step)."""
    return jax.random.fold_in(run_key, step)


def _check_common(num_teachers, per_example, batch_size, normalize):
    if not isinstance(num_teachers, Integral) or num_teachers < 1:
        raise ValueError(f"weighting: num_teachers must be a positive int, got {num_teachers!r}")
    if normalize not in NORMALIZATIONS:
        hint = " (the paper's unnormalised formula is now spelled 'none')" if normalize is None else ""
        raise ValueError(f"weighting: unknown normalize={normalize!r}; options are {NORMALIZATIONS}{hint}")
    if per_example and (not isinstance(batch_size, Integral) or batch_size < 1):
        raise ValueError("weighting: per_example=True needs batch_size (a positive int), got "
                         f"batch_size={batch_size!r}")


def _shape(num_teachers, per_example, batch_size):
    return (int(num_teachers), int(batch_size)) if per_example else (int(num_teachers),)


def _normalize(w, normalize):
    """Rescales w [K] or [K, B] along the teacher axis 0 ('none': unchanged)."""
    if normalize == "none":
        return w
    total = jnp.sum(w, axis=0, keepdims=True)  # [1] or [1, B]
    scale = 1.0 if normalize == "sum1" else float(w.shape[0])
    return w * (scale / total)


def sample_teacher_weights(key, num_teachers, *, per_example=False, batch_size=None,
                           normalize=DEFAULT_NORMALIZE):
    """RoS-KD weights: w_m ~ Exp(1) i.i.d., rescaled by `normalize`.

    Args:
      key: a jax.random key (use `step_key(run_key, step)`).
      num_teachers: K.
      per_example: one draw per example ([K, B]) instead of one per step ([K]).
      batch_size: B, required with per_example=True (ignored otherwise).
      normalize: 'sum1' (default: w / sum w, Dirichlet(1,...,1), mean 1/K), 'none' (the paper's
        literal unnormalised Exp(1), mean 1) or 'sumk' (K w / sum w) over teachers.
    Returns:
      float32 [K] or [K, B].
    """
    _check_common(num_teachers, per_example, batch_size, normalize)
    w = jax.random.exponential(key, _shape(num_teachers, per_example, batch_size), jnp.float32)
    return _normalize(w, normalize)


def equal_teacher_weights(num_teachers):
    """Baseline III weights 1/K ([K]); K=1 gives weight 1 (baseline II)."""
    _check_common(num_teachers, False, None, "none")
    return jnp.full((num_teachers,), 1.0 / num_teachers, jnp.float32)


def _equal(key, num_teachers, *, per_example=False, batch_size=None, normalize=DEFAULT_NORMALIZE):
    """Equal weights through the sampler's interface: 1/K ('none' or 'sum1'); 'sumk' makes each 1."""
    del key  # deterministic
    _check_common(num_teachers, per_example, batch_size, normalize)
    w = jnp.ones(_shape(num_teachers, per_example, batch_size), jnp.float32)
    return _normalize(w, "sum1" if normalize == "none" else normalize)


TEACHER_WEIGHTINGS = {"exponential": sample_teacher_weights, "equal": _equal}


def teacher_weights(kind, key, num_teachers, *, per_example=False, batch_size=None,
                    normalize=DEFAULT_NORMALIZE):
    """Weights of the scheme named `kind` (a key of TEACHER_WEIGHTINGS) -> [K] or [K, B]."""
    if kind not in TEACHER_WEIGHTINGS:
        raise ValueError(f"weighting: unknown teacher weighting kind={kind!r}; options are "
                         f"{sorted(TEACHER_WEIGHTINGS)}")
    return TEACHER_WEIGHTINGS[kind](key, num_teachers, per_example=per_example,
                                    batch_size=batch_size, normalize=normalize)


class WeightRule(NamedTuple):
    """A teacher-weight scheme as arrays, so that it is an argument of the compiled step, not a
    constant in it: the students of baselines II/III, RoS-KD and its variants then share one
    compiled program per (student, number of teachers), where a CPU spends most of a short run
    compiling. `rule_weights` turns it into the weights of one step, bit for bit the weights of
    `teacher_weights` for the same scheme and key."""
    random: jax.Array     # [] bool: draw Exp(1) weights (True) or take `fixed` (False)
    normalize: jax.Array  # [] int32: the draws' rescaling, an index into NORMALIZATIONS
    fixed: jax.Array      # [K] float32: the weights when not random (equal: 1/K, or 1 with 'sumk')


def weight_rule(kind, num_teachers, *, normalize=DEFAULT_NORMALIZE) -> WeightRule:
    """The WeightRule of the scheme `kind` ('exponential' or 'equal', as `teacher_weights`)."""
    if kind not in TEACHER_WEIGHTINGS:
        raise ValueError(f"weighting: unknown teacher weighting kind={kind!r}; options are "
                         f"{sorted(TEACHER_WEIGHTINGS)}")
    _check_common(num_teachers, False, None, normalize)
    fixed = _equal(None, num_teachers, normalize=normalize)  # [K]; unused by 'exponential'
    return WeightRule(random=jnp.asarray(kind == "exponential"),
                      normalize=jnp.asarray(NORMALIZATIONS.index(normalize), jnp.int32), fixed=fixed)


def rule_weights(rule: WeightRule, key, num_teachers, *, per_example=False, batch_size=None):
    """The weights [K] or [K, B] of one step under `rule` (traced; see WeightRule)."""
    _check_common(num_teachers, per_example, batch_size, "none")
    shape = _shape(num_teachers, per_example, batch_size)
    w = jax.random.exponential(key, shape, jnp.float32)
    rescaled = jax.lax.switch(rule.normalize, [functools.partial(_normalize, normalize=n) for n in NORMALIZATIONS], w)
    fixed = jnp.broadcast_to(rule.fixed.reshape((-1,) + (1,) * (len(shape) - 1)), shape)
    return jnp.where(rule.random, rescaled, fixed)
