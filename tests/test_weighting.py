"""Teacher weights: Exp(1) distribution, shapes, normalisations, keys, equal weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rosjax.distill import (equal_teacher_weights, kd_loss, sample_teacher_weights, step_key,
                            teacher_weights)


def test_exponential_draws_follow_exp1():
    w = np.asarray(sample_teacher_weights(jax.random.key(0), 5, per_example=True,
                                          batch_size=8000)).ravel()  # 40k draws
    assert w.min() > 0
    assert abs(w.mean() - 1.0) < 0.02  # standard error 0.005
    assert stats.kstest(w, stats.expon.cdf).pvalue > 0.01


def test_one_draw_per_step_over_many_steps_is_exp1():
    run_key = jax.random.key(1)
    draws = jax.jit(jax.vmap(lambda s: sample_teacher_weights(step_key(run_key, s), 5)))(
        jnp.arange(4000))
    draws = np.asarray(draws)  # [steps, K]
    assert draws.shape == (4000, 5)
    assert stats.kstest(draws.ravel(), stats.expon.cdf).pvalue > 0.01
    # Teachers are independent: correlation between two teachers' weights is ~0 (se ~0.016).
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.06


def test_shapes_and_normalisations():
    key = jax.random.key(2)
    assert sample_teacher_weights(key, 5).shape == (5,)
    assert sample_teacher_weights(key, 5, per_example=True, batch_size=3).shape == (5, 3)
    assert sample_teacher_weights(key, 5, batch_size=3).shape == (5,)  # one draw for the batch
    w1 = np.asarray(sample_teacher_weights(key, 5, per_example=True, batch_size=3000,
                                           normalize="sum1"))
    np.testing.assert_allclose(w1.sum(axis=0), 1.0, rtol=1e-5)
    # Dirichlet(1,...,1): each component is Beta(1, K-1).
    assert stats.kstest(w1[0], stats.beta(1, 4).cdf).pvalue > 0.01
    wk = np.asarray(sample_teacher_weights(key, 5, normalize="sumk"))
    np.testing.assert_allclose(wk.sum(), 5.0, rtol=1e-5)
    # Normalising rescales the same draw: proportional to the unnormalized weights.
    w = np.asarray(sample_teacher_weights(key, 5))
    np.testing.assert_allclose(wk, 5 * w / w.sum(), rtol=1e-5)


def test_keys_reproduce_and_steps_differ():
    run_key = jax.random.key(3)
    a = sample_teacher_weights(step_key(run_key, 7), 5)
    b = sample_teacher_weights(step_key(jax.random.key(3), 7), 5)  # a resumed run
    c = sample_teacher_weights(step_key(run_key, 8), 5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_equal_weights_and_dispatcher():
    np.testing.assert_allclose(equal_teacher_weights(5), np.full(5, 0.2))
    np.testing.assert_allclose(equal_teacher_weights(1), [1.0])  # baseline II
    key = jax.random.key(4)
    np.testing.assert_allclose(teacher_weights("equal", key, 4), np.full(4, 0.25))
    np.testing.assert_allclose(teacher_weights("equal", key, 4, normalize="sumk"), np.ones(4))
    np.testing.assert_allclose(teacher_weights("equal", key, 4, per_example=True, batch_size=2),
                               np.full((4, 2), 0.25))
    np.testing.assert_array_equal(teacher_weights("exponential", key, 4),
                                  sample_teacher_weights(key, 4))


def test_equal_weights_distill_to_the_averaged_teacher():
    """Baseline III: weights 1/K on per-teacher KLs give the student the gradient of
    KL(mean_m q_m || p), the KD to the averaged teacher distribution."""
    rng = np.random.default_rng(0)
    tau, k = 2.0, 3
    student = rng.normal(size=(4, 5)).astype(np.float32)
    teachers = rng.normal(size=(k, 4, 5)).astype(np.float32) * 2
    labels = np.zeros(4, np.int32)
    grad = jax.jit(jax.grad(lambda s: kd_loss(s, teachers, labels, equal_teacher_weights(k),
                                              tau=tau, alpha=1.0, multilabel=False)[0]))(student)
    qbar = np.mean(np.exp(teachers / tau) / np.exp(teachers / tau).sum(-1, keepdims=True), axis=0)
    p = np.exp(student / tau) / np.exp(student / tau).sum(-1, keepdims=True)
    # d/ds tau^2 KL(qbar || softmax(s/tau)) = tau (p - qbar); mean over the batch of 4.
    np.testing.assert_allclose(grad, tau * (p - qbar) / 4, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(per_example=True), "batch_size"),
    (dict(normalize="softmax"), "normalize"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_teacher_weights(jax.random.key(0), 5, **kwargs)


def test_bad_kind_and_count_raise():
    with pytest.raises(ValueError, match="kind"):
        teacher_weights("rl", jax.random.key(0), 5)
    with pytest.raises(ValueError, match="num_teachers"):
        equal_teacher_weights(0)
