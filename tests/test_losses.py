"""Supervised and KD losses against a float64 numpy/scipy reference and hand-derived limits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_expit, log_softmax

from rosjax import losses

# Jitted entry points: one fused compile per shape instead of one per eager primitive.
kd_loss = jax.jit(losses.kd_loss, static_argnames=("tau", "alpha", "multilabel"))
kd_divergence = jax.jit(losses.kd_divergence, static_argnames=("tau", "multilabel"))
supervised_loss = jax.jit(losses.supervised_loss, static_argnames="multilabel")

# ----------------------------------------------------------------------------------------------
# float64 references (written from the formulas, independent of the JAX code)


def ref_ce(logits, labels, multilabel):
    """Per-example CE [B] (one-label) or BCE summed over labels (multi-label)."""
    z = np.asarray(logits, np.float64)
    if multilabel:
        y = np.asarray(labels, np.float64)
        return -np.sum(y * log_expit(z) + (1 - y) * log_expit(-z), axis=1)
    return -log_softmax(z, axis=1)[np.arange(len(labels)), labels]


def ref_kl(student, teacher, tau, multilabel):
    """Per-example KL(teacher || student) at temperature tau, unscaled: [..., B]."""
    s = np.asarray(student, np.float64) / tau
    t = np.asarray(teacher, np.float64) / tau
    if multilabel:
        lq, lq0, lp, lp0 = log_expit(t), log_expit(-t), log_expit(s), log_expit(-s)
        return np.sum(np.exp(lq) * (lq - lp) + np.exp(lq0) * (lq0 - lp0), axis=-1)
    lq, lp = log_softmax(t, axis=-1), log_softmax(s, axis=-1)
    return np.sum(np.exp(lq) * (lq - lp), axis=-1)


def ref_kd_loss(student, teachers, labels, weights, tau, alpha, multilabel):
    k, b = teachers.shape[:2]
    w = np.broadcast_to(np.asarray(weights, np.float64).reshape(k, -1), (k, b))
    kl = tau ** 2 * np.stack([ref_kl(student, teachers[m], tau, multilabel) for m in range(k)])
    kd = np.mean(np.sum(w * kl, axis=0))
    ce = np.mean(ref_ce(student, labels, multilabel))
    return alpha * kd + (1 - alpha) * ce, kd, ce, kl.mean(axis=1)


def make_batch(rng, b, c, k, multilabel, scale=3.0):
    student = rng.normal(size=(b, c)).astype(np.float32) * scale
    teachers = rng.normal(size=(k, b, c)).astype(np.float32) * scale
    if multilabel:
        labels = (rng.random((b, c)) < 0.3).astype(np.float32)
    else:
        labels = rng.integers(0, c, size=b).astype(np.int32)
    return student, teachers, labels


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multilabel", [False, True])
def test_supervised_loss_matches_numpy_with_mask(multilabel):
    rng = np.random.default_rng(0)
    logits, _, labels = make_batch(rng, 7, 5, 1, multilabel)
    np.testing.assert_allclose(supervised_loss(logits, labels, multilabel=multilabel),
                               ref_ce(logits, labels, multilabel).mean(), rtol=1e-5)
    mask = np.array([1, 1, 0, 1, 0, 1, 1], np.float32)
    expected = ref_ce(logits, labels, multilabel)[mask > 0].mean()
    np.testing.assert_allclose(supervised_loss(logits, labels, multilabel=multilabel, mask=mask),
                               expected, rtol=1e-5)
    assert float(supervised_loss(logits, labels, multilabel=multilabel,
                                 mask=np.zeros(7, np.float32))) == 0.0


def test_supervised_loss_extreme_logits():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], np.float32)
    # One-label: the true class of row 0 wins (loss 0); row 1's true class 0 is 2e4 behind.
    ce = supervised_loss(logits, np.array([0, 0], np.int32), multilabel=False)
    np.testing.assert_allclose(ce, (0.0 + 2e4) / 2, rtol=1e-6)
    # Multi-label: row 0 with labels [1, 0, 0]: 0 + 0 + log 2; row 1 with [1, 1, 1]: 1e4 + 0 + log 2.
    y = np.array([[1, 0, 0], [1, 1, 1]], np.float32)
    bce = supervised_loss(logits, y, multilabel=True)
    np.testing.assert_allclose(bce, (np.log(2) + 1e4 + np.log(2)) / 2, rtol=1e-6)


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("per_example", [False, True])
def test_kd_loss_matches_reference(multilabel, k, per_example):
    rng = np.random.default_rng(k + 10 * multilabel + 100 * per_example)
    b, c, tau, alpha = 6, 4, 0.5, 0.9
    student, teachers, labels = make_batch(rng, b, c, k, multilabel)
    weights = rng.exponential(size=(k, b) if per_example else (k,)).astype(np.float32)
    loss, aux = kd_loss(student, teachers, labels, weights, tau=tau, alpha=alpha,
                        multilabel=multilabel)
    ref_loss, ref_kd, ref_ce_, ref_per_teacher = ref_kd_loss(student, teachers, labels, weights,
                                                             tau, alpha, multilabel)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    np.testing.assert_allclose(aux["kd"], ref_kd, rtol=2e-5)
    np.testing.assert_allclose(aux["ce"], ref_ce_, rtol=2e-5)
    np.testing.assert_allclose(aux["kl_per_teacher"], ref_per_teacher, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(
        kd_divergence(student, teachers[0], tau=tau, multilabel=multilabel),
        tau ** 2 * ref_kl(student, teachers[0], tau, multilabel), rtol=2e-5, atol=1e-7)


def test_kd_loss_mask_ignores_padded_rows():
    rng = np.random.default_rng(3)
    student, teachers, labels = make_batch(rng, 5, 3, 2, False)
    weights = np.array([0.7, 1.9], np.float32)
    mask = np.array([1, 1, 1, 0, 0], np.float32)
    loss, aux = kd_loss(student, teachers, labels, weights, tau=2.0, alpha=0.6, multilabel=False,
                        mask=mask)
    ref = ref_kd_loss(student[:3], teachers[:, :3], labels[:3], weights, 2.0, 0.6, False)
    np.testing.assert_allclose(loss, ref[0], rtol=2e-5)
    np.testing.assert_allclose(aux["kl_per_teacher"], ref[3], rtol=2e-5)


@pytest.mark.parametrize("big", [1e3, 1e4])
def test_kd_extreme_logits_finite_and_at_the_limit(big):
    tau = 0.5
    # One-label: teacher puts all mass on class 0 (q -> e_0); student logits all 0 (p uniform over
    # 3 classes), so KL -> -log p_0 = log 3 and the tau^2-scaled term -> tau^2 log 3.
    student = np.zeros((1, 3), np.float32)
    teacher = np.array([[[big, 0.0, -big]]], np.float32)
    loss, aux = kd_loss(student, teacher, np.array([2], np.int32), np.ones(1, np.float32), tau=tau,
                        alpha=1.0, multilabel=False)
    np.testing.assert_allclose(loss, tau ** 2 * np.log(3.0), rtol=1e-6)
    # Student also extreme, on the wrong class: KL -> (2 big) / tau, and the gradient is finite.
    student = np.array([[-big, big, 0.0]], np.float32)
    grad = jax.jit(jax.grad(lambda s: kd_loss(s, teacher, np.array([0], np.int32), np.ones(1),
                                              tau=tau, alpha=0.9, multilabel=False)[0]))(student)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(kd_divergence(student, teacher[0], tau=tau, multilabel=False),
                               tau ** 2 * ref_kl(student, teacher[0], tau, False), rtol=1e-6)
    np.testing.assert_allclose(kd_divergence(student, teacher[0], tau=tau, multilabel=False),
                               [tau ** 2 * 2 * big / tau], rtol=1e-6)
    # Multi-label: teacher label probabilities (1, 0.5, 0), student (0, 0.5, 1) at the limit.
    # Per-label KL: -log sigmoid(-big/tau) = big/tau, 0, and big/tau again -> tau^2 * 2 big / tau.
    teacher_ml = np.array([[[big, 0.0, -big]]], np.float32)
    student_ml = np.array([[-big, 0.0, big]], np.float32)
    labels_ml = np.array([[1, 0, 0]], np.float32)
    loss, aux = kd_loss(student_ml, teacher_ml, labels_ml, np.ones(1), tau=tau, alpha=1.0,
                        multilabel=True)
    np.testing.assert_allclose(loss, tau ** 2 * 2 * big / tau, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda s: kd_loss(s, teacher_ml, labels_ml, np.ones(1), tau=tau,
                                              alpha=0.5, multilabel=True)[0]))(student_ml)
    assert np.all(np.isfinite(grad))


def test_weighted_kl_and_mixture_kl_give_the_same_student_gradient():
    """sum_m w_m KL(q_m||p) = sum_m w_m sum_c q_mc log q_mc - S sum_c qbar_c log p_c, with
    S = sum_m w_m and qbar = sum_m w_m q_m / S.  S KL(qbar||p) = S sum_c qbar_c log qbar_c
    - S sum_c qbar_c log p_c.  The two differ only in the entropy terms, which do not depend on
    the student logits, so the gradients wrt the student are equal (not the values)."""
    rng = np.random.default_rng(5)
    b, c, k, tau = 4, 6, 5, 0.5
    student, teachers, _ = make_batch(rng, b, c, k, False)
    w = rng.exponential(size=k).astype(np.float32)

    def weighted(s):
        return jnp.sum(w[:, None] * jax.vmap(
            lambda t: kd_divergence(s, t, tau=tau, multilabel=False))(teachers))

    def mixture(s):
        q = jax.nn.softmax(teachers / tau, axis=-1)  # [K, B, C]
        qbar = jnp.sum(w[:, None, None] * q, axis=0) / w.sum()  # [B, C]
        log_p = jax.nn.log_softmax(s / tau, axis=-1)
        kl = jnp.sum(qbar * (jnp.log(qbar) - log_p), axis=-1)  # [B]
        return w.sum() * tau ** 2 * jnp.sum(kl)

    g1, g2 = jax.jit(jax.grad(weighted))(student), jax.jit(jax.grad(mixture))(student)
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)
    # The values differ by the (student-independent) entropy terms.
    assert not np.isclose(jax.jit(weighted)(student), jax.jit(mixture)(student))
    # Closed form: d/ds of tau^2 S KL(qbar || softmax(s / tau)) is tau S (p - qbar).
    p = np.exp(log_softmax(student.astype(np.float64) / tau, axis=-1))
    q = np.exp(log_softmax(teachers.astype(np.float64) / tau, axis=-1))
    qbar = np.tensordot(w, q, axes=1) / w.sum()
    np.testing.assert_allclose(g1, tau * w.sum() * (p - qbar), rtol=1e-4, atol=1e-6)


def test_no_gradient_reaches_the_teachers():
    rng = np.random.default_rng(6)
    student, teachers, labels = make_batch(rng, 3, 4, 2, False)
    g = jax.jit(jax.grad(lambda t: kd_loss(student, t, labels, np.ones(2), tau=2.0, alpha=0.9,
                                           multilabel=False)[0]))(teachers)
    assert np.all(g == 0)


def test_bad_inputs_raise():
    s = np.zeros((3, 4), np.float32)
    t = np.zeros((2, 3, 4), np.float32)
    y = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="teacher_weights"):
        kd_loss(s, t, y, np.ones(3), tau=1.0, alpha=0.5, multilabel=False)
    with pytest.raises(ValueError, match="tau"):
        kd_loss(s, t, y, np.ones(2), tau=0.0, alpha=0.5, multilabel=False)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, t, y, np.ones(2), tau=1.0, alpha=1.5, multilabel=False)
    with pytest.raises(ValueError, match="multi-hot"):
        supervised_loss(s, y, multilabel=True)
    with pytest.raises(ValueError, match="integer"):
        supervised_loss(s, y.astype(np.float32), multilabel=False)
    with pytest.raises(ValueError, match=r"\[K, B, C\]"):
        kd_loss(s, t[0], y, np.ones(2), tau=1.0, alpha=0.5, multilabel=False)
