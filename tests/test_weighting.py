"""Teacher weights: Exp(1) distribution, shapes, normalisations, keys, equal weights, and the
default (Dirichlet, sum 1) against the paper's literal unnormalised Exp(1) (KD gradient K x larger)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_student import tiny_student
from scipy import stats

from rosjax.config import OptimConfig
from rosjax.distill import equal_teacher_weights, kd_loss, sample_teacher_weights, step_key, teacher_weights, weighting
from rosjax.distill.steps import DistillInputs, make_distill_step
from rosjax.distill.weighting import weight_rule
from rosjax.models import create
from rosjax.train import optim, parallel
from rosjax.train.state import create_train_state


def test_exponential_draws_follow_exp1():
    w = np.asarray(sample_teacher_weights(jax.random.key(0), 5, per_example=True,
                                          batch_size=8000, normalize="none")).ravel()  # 40k draws
    assert w.min() > 0
    assert abs(w.mean() - 1.0) < 0.02  # standard error 0.005
    assert stats.kstest(w, stats.expon.cdf).pvalue > 0.01


def test_one_draw_per_step_over_many_steps_is_exp1():
    run_key = jax.random.key(1)
    draws = jax.jit(jax.vmap(lambda s: sample_teacher_weights(step_key(run_key, s), 5, normalize="none")))(
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
    w = np.asarray(sample_teacher_weights(key, 5, normalize="none"))
    np.testing.assert_allclose(sample_teacher_weights(key, 5), w / w.sum(), rtol=1e-5)  # default: sum1
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
    (dict(normalize=None), "now spelled 'none'"),  # the old spelling of the paper's formula
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_teacher_weights(jax.random.key(0), 5, **kwargs)


def test_bad_kind_and_count_raise():
    with pytest.raises(ValueError, match="kind"):
        teacher_weights("rl", jax.random.key(0), 5)
    with pytest.raises(ValueError, match="num_teachers"):
        equal_teacher_weights(0)


# --- the default recipe (sum1) against the paper's literal formula (none) -------------------------


def _per_step_draws(normalize, steps=20000, k=5):
    run_key = jax.random.key(11)
    return np.asarray(jax.jit(jax.vmap(lambda s: sample_teacher_weights(step_key(run_key, s), k,
                                                                        normalize=normalize)))(jnp.arange(steps)))


def test_default_weights_are_dirichlet_with_baseline_iii_strength():
    """Default 'sum1': sum 1 at every step and mean 1/K per teacher (equal weights' strength),
    still random: Var w_m = (K-1) / (K^2 (K+1)) for Dirichlet(1,...,1)."""
    k = 5
    w = _per_step_draws("sum1", k=k)  # [steps, K], the default
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(np.abs(w.mean(axis=0) - 1 / k) < 0.005)  # se = sqrt(Var / 20000) = 0.0012
    assert abs(w.var() - (k - 1) / (k ** 2 * (k + 1))) < 0.002  # 0.0267
    np.testing.assert_array_equal(w, _per_step_draws(weighting.DEFAULT_NORMALIZE, k=k))


def test_paper_literal_weights_are_exp1():
    """'none': unnormalised Exp(1), mean 1 and variance 1 per teacher, sum ~ Gamma(K, 1) (mean K)."""
    w = _per_step_draws("none")
    assert abs(w.mean() - 1.0) < 0.02 and abs(w.var() - 1.0) < 0.05  # se 0.003 and ~0.01
    assert abs(w.sum(axis=1).mean() - 5.0) < 0.05


def _kd_grad_norms(normalize, weighting_kind="exponential", steps=(0,), k=5):
    """First-step gradient norms of a tiny student distilled (alpha=1: KD only) from synthetic
    cached teacher logits with the given weighting; also returns the steps' weight sums."""
    rng = np.random.default_rng(0)
    b, c = 16, 8
    batch = {"image": jnp.asarray(rng.random((b, 8, 8, 3), dtype=np.float32)),
             "label": jnp.asarray(rng.integers(0, c, b).astype(np.int32)),
             "teacher_logits": jnp.asarray(4.0 * rng.normal(size=(k, b, c)).astype(np.float32))}
    mesh = parallel.make_mesh(jax.devices()[:1])
    tx, _ = optim.make_optimizer(OptimConfig(learning_rate=0.05), steps_per_epoch=10)
    state = create_train_state(create("tiny_cnn", c), tx, jax.random.key(0), (1, 8, 8, 3), mesh)
    step = jax.jit(make_distill_step((None,) * k, tau=0.5, alpha=1.0, multilabel=False))
    inputs = DistillInputs(teachers=(), rule=weight_rule(weighting_kind, k, normalize=normalize))
    norms, sums = [], []
    for s in steps:  # the same state, the weights of step s
        _, m = step(state.replace(step=jnp.asarray(s, state.step.dtype)), inputs, batch, jax.random.key(1))
        norms.append(float(m["grad_norm"]))
        sums.append(float(m["weight_sum"]))
    return np.array(norms), np.array(sums)


def test_paper_literal_kd_gradient_is_weight_sum_times_the_default():
    """Hand-derived: for one draw w ~ Exp(1)^K, the paper's KD gradient is sum_m w_m grad KL_m and
    the default's is (sum_m w_m grad KL_m) / S with S = sum_m w_m, so the gradient-norm ratio is
    exactly S, whose mean is K. Equal weights (baseline III) have sum 1, like the default."""
    steps = range(64)
    none, s_none = _kd_grad_norms("none", steps=steps)
    sum1, s_sum1 = _kd_grad_norms("sum1", steps=steps)
    np.testing.assert_allclose(s_sum1, 1.0, rtol=1e-5)
    np.testing.assert_allclose(none / sum1, s_none, rtol=1e-3)  # ratio = S at every step
    assert 4.0 < np.mean(none / sum1) < 6.0  # E[S] = K = 5; se of the mean of 64 Gamma(5,1) ~ 0.28
    equal, s_equal = _kd_grad_norms("sum1", weighting_kind="equal")
    np.testing.assert_allclose(s_equal, 1.0, rtol=1e-6)
    # The default's gradient norm is a convex mix of the teachers': within the range of baseline
    # III's scale, while the paper's is on average K times larger.
    assert np.mean(sum1) < 1.5 * equal[0] and np.mean(none) > 3.0 * equal[0]


@pytest.mark.parametrize("kind", ["exponential", "equal"])
@pytest.mark.parametrize("normalize", ["none", "sum1", "sumk"])
@pytest.mark.parametrize("per_example", [False, True])
def test_weight_rule_gives_the_schemes_weights_bit_for_bit(kind, normalize, per_example):
    """The traced rule (one compiled step for every scheme) draws exactly `teacher_weights`' weights."""
    key = jax.random.key(7)
    expected = teacher_weights(kind, key, 5, per_example=per_example, batch_size=4, normalize=normalize)
    rule = weight_rule(kind, 5, normalize=normalize)
    got = jax.jit(lambda r, k: weighting.rule_weights(r, k, 5, per_example=per_example, batch_size=4))(rule, key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_every_weight_rule_runs_in_one_compiled_distillation_step():
    """Baseline III's equal weights and RoS-KD's draws: one program (the rule is an argument)."""
    k, b, c = 3, 4, 5
    state, batch = tiny_student(k, b, c, np.random.default_rng(0))
    step = jax.jit(make_distill_step((None,) * k, tau=0.5, alpha=0.9, multilabel=False))
    sums = {}
    for kind, normalize in (("equal", "sum1"), ("exponential", "sum1"), ("exponential", "none")):
        inputs = DistillInputs(teachers=(), rule=weight_rule(kind, k, normalize=normalize))
        sums[kind, normalize] = float(step(state, inputs, batch, jax.random.key(1))[1]["weight_sum"])
    assert step._cache_size() == 1
    assert sums["equal", "sum1"] == pytest.approx(1.0) and sums["exponential", "sum1"] == pytest.approx(1.0)
    assert sums["exponential", "none"] != pytest.approx(1.0)  # unnormalised Exp(1) draws
