"""Tests for baseline IV's policy (rosjax.distill.rl_policy) against numpy / hand-derived values."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rosjax.distill import rl_policy


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_ce(logits, labels, multilabel):
    """Per-example CE (one-label) or BCE summed over labels (multi-label)."""
    if multilabel:
        return -(labels * _np_log_sigmoid(logits) + (1 - labels) * _np_log_sigmoid(-logits)).sum(-1)
    return -_np_log_softmax(logits)[np.arange(len(labels)), labels]


def _np_kd(student, teacher, tau, multilabel):
    """Per-example tau^2 KL(teacher || student) at temperature tau."""
    s, t = student / tau, teacher / tau
    if multilabel:
        q, p = _np_sigmoid(t), _np_sigmoid(s)
        kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    else:
        lq, lp = _np_log_softmax(t), _np_log_softmax(s)
        kl = np.exp(lq) * (lq - lp)
    return tau ** 2 * kl.sum(-1)


def _labels(rng, batch, classes, multilabel):
    if multilabel:
        return (rng.random((batch, classes)) < 0.4).astype(np.float32)
    return rng.integers(0, classes, batch).astype(np.int32)


@pytest.mark.parametrize("multilabel", [False, True])
def test_state_features_match_numpy(multilabel):
    rng = np.random.default_rng(0)
    k, b, c, d, tau = 3, 5, 4, 6, 0.5
    emb = rng.normal(size=(b, d)).astype(np.float32)
    t = rng.normal(size=(k, b, c)).astype(np.float32) * 2
    y = _labels(rng, b, c, multilabel)
    feats = np.asarray(jax.jit(functools.partial(rl_policy.state_features, tau=tau,
                                                  multilabel=multilabel))(emb, t, y))
    assert feats.shape == (k, b, rl_policy.num_state_features(d, c, k)) == (k, b, d + c + 1 + k)
    for i in range(k):
        probs = _np_sigmoid(t[i] / tau) if multilabel else np.exp(_np_log_softmax(t[i] / tau))
        ref = np.concatenate([emb / np.linalg.norm(emb, axis=-1, keepdims=True), probs,
                              _np_ce(t[i], y, multilabel)[:, None],
                              np.tile(np.eye(k)[i], (b, 1))], axis=-1)
        np.testing.assert_allclose(feats[i], ref, rtol=1e-5, atol=1e-6)


def test_state_features_reject_mismatched_batch():
    with pytest.raises(ValueError, match="same B"):
        rl_policy.state_features(np.zeros((4, 3)), np.zeros((2, 5, 6)), np.zeros(5, np.int32),
                                 tau=1.0, multilabel=False)


def test_policy_rejects_wrong_feature_length():
    params = rl_policy.init_policy(jax.random.key(0), 7)
    with pytest.raises(ValueError, match="expects 7"):
        rl_policy.selection_probs(params, jnp.zeros((2, 3, 8)))


def test_actions_depend_only_on_key():
    probs = jnp.asarray(np.random.default_rng(1).uniform(0.05, 0.95, size=(5, 4096)))
    sample = jax.jit(rl_policy.sample_actions)
    a1 = sample(jax.random.key(3), probs)
    a2 = sample(jax.random.key(3), probs)
    a3 = sample(jax.random.key(4), probs)
    assert a1.dtype == jnp.bool_ and a1.shape == (5, 4096)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    # Two independent draws disagree on sum_i 2 p_i (1 - p_i) of the pairs (~0.36 here).
    assert np.mean(np.asarray(a1) != np.asarray(a3)) > 0.25
    # Each action is Bernoulli(p): the selection rate tracks p (binned, 5 x 4096 draws).
    p, a = np.asarray(probs).ravel(), np.asarray(a1).ravel()
    for lo in (0.05, 0.35, 0.65):
        sel = (p >= lo) & (p < lo + 0.3)
        assert abs(a[sel].mean() - p[sel].mean()) < 0.03


def test_select_weights_hand_values():
    actions = np.array([[1, 0, 0, 1], [1, 1, 0, 0], [1, 0, 0, 1]], bool)
    ref = np.array([[1 / 3, 0, 0, 0.5], [1 / 3, 1, 0, 0], [1 / 3, 0, 0, 0.5]])
    np.testing.assert_allclose(np.asarray(rl_policy.select_weights(actions)), ref, rtol=1e-6)


@pytest.mark.parametrize("multilabel", [False, True])
def test_rl_kd_loss_matches_numpy(multilabel):
    rng = np.random.default_rng(2)
    k, b, c, tau, alpha = 3, 4, 5, 0.5, 0.9
    s = rng.normal(size=(b, c)).astype(np.float32)
    t = 2 * rng.normal(size=(k, b, c)).astype(np.float32)
    y = _labels(rng, b, c, multilabel)
    # example 0: all teachers, 1: teacher 1 only, 2: none ((1 - alpha) CE), 3: teachers 0 and 2.
    actions = np.array([[1, 0, 0, 1], [1, 1, 0, 0], [1, 0, 0, 1]], bool)
    loss_fn = jax.jit(functools.partial(rl_policy.rl_kd_loss, tau=tau, alpha=alpha,
                                        multilabel=multilabel))
    loss, aux = loss_fn(s, t, y, actions)
    kd = np.stack([_np_kd(s, t[i], tau, multilabel) for i in range(k)])  # [K, B]
    ce = _np_ce(s, y, multilabel)
    per_example = np.array([
        alpha * kd[:, 0].mean() + (1 - alpha) * ce[0],
        alpha * kd[1, 1] + (1 - alpha) * ce[1],
        (1 - alpha) * ce[2],
        alpha * (kd[0, 3] + kd[2, 3]) / 2 + (1 - alpha) * ce[3],
    ])
    np.testing.assert_allclose(float(loss), per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["ce"]), ce.mean(), rtol=1e-5)
    kd_ref = np.array([kd[:, 0].mean(), kd[1, 1], 0.0, (kd[0, 3] + kd[2, 3]) / 2]).mean()
    np.testing.assert_allclose(float(aux["kd"]), kd_ref, rtol=1e-5)
    np.testing.assert_allclose(float(aux["selected_frac"]), 6 / 12, rtol=1e-6)
    np.testing.assert_allclose(float(aux["none_frac"]), 1 / 4, rtol=1e-6)


def test_rl_kd_loss_no_teacher_keeps_the_ce_weight():
    """Dropping every teacher leaves (1 - alpha) * CE: the CE weight never rises (10x at alpha = 0.9)."""
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(5, 3)), rng.normal(size=(2, 5, 3))
    y = rng.integers(0, 3, 5).astype(np.int32)
    loss_fn = jax.jit(functools.partial(rl_policy.rl_kd_loss, tau=1.0, alpha=0.9, multilabel=False))
    loss, _ = loss_fn(s, t, y, np.zeros((2, 5), bool))
    np.testing.assert_allclose(float(loss), 0.1 * _np_ce(s, y, False).mean(), rtol=1e-5)


def test_rl_kd_loss_all_selected_is_equal_weight_kd():
    """Stage 1: all actions True gives alpha * mean_k KD + (1 - alpha) * CE (baseline III)."""
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(6, 4)), rng.normal(size=(2, 6, 4))
    y = rng.integers(0, 4, 6).astype(np.int32)
    loss_fn = jax.jit(functools.partial(rl_policy.rl_kd_loss, tau=2.0, alpha=0.3,
                                        multilabel=False))
    loss, _ = loss_fn(s, t, y, np.ones((2, 6), bool))
    kd = (_np_kd(s, t[0], 2.0, False) + _np_kd(s, t[1], 2.0, False)) / 2
    np.testing.assert_allclose(float(loss), np.mean(0.3 * kd + 0.7 * _np_ce(s, y, False)),
                               rtol=1e-5)


def test_student_reward_is_minus_ce():
    rng = np.random.default_rng(4)
    s, y = rng.normal(size=(5, 3)), rng.integers(0, 3, 5).astype(np.int32)
    np.testing.assert_allclose(float(rl_policy.student_reward(s, y, multilabel=False)),
                               -_np_ce(s, y, False).mean(), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(rl_policy.student_reward(s, y, multilabel=False, per_example=True)),
        -_np_ce(s, y, False), rtol=1e-5)


def test_reinforce_gradient_matches_hand_derivation():
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(2, 1, 4)).astype(np.float32)  # two teachers, one example
    w, b0 = rng.normal(size=4).astype(np.float32), np.float32(0.3)
    actions = np.array([[True], [False]])
    r, base = -0.7, -1.1
    params = {"w": jnp.asarray(w), "b": jnp.asarray(b0)}
    # d/dtheta of -(r - b) sum_k log pi(a_k | s_k) = -(r - b) sum_k (a_k - pi_k) s_k.
    s = feats[:, 0, :]  # [2, 4]
    pi = _np_sigmoid(s @ w + b0)
    a = actions[:, 0].astype(np.float64)
    grad_w = -(r - base) * ((a - pi)[:, None] * s).sum(0)
    grad_b = -(r - base) * (a - pi).sum()
    loss_ref = -(r - base) * np.sum(a * np.log(pi) + (1 - a) * np.log(1 - pi))
    loss, grads = jax.jit(rl_policy.policy_gradient)(params, jnp.asarray(feats), actions,
                                                     r - base)
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["w"]), grad_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(grads["b"]), grad_b, rtol=1e-5, atol=1e-7)

    # policy_step uses the stored baseline (step > 0) and applies the optimiser's update.
    tx = optax.sgd(0.5)
    state = rl_policy.PolicyState(params=params, opt_state=tx.init(params),
                                  baseline=jnp.float32(base), step=jnp.int32(7))
    step = jax.jit(functools.partial(rl_policy.policy_step, tx=tx, baseline_decay=0.8))
    new, metrics = step(state, jnp.asarray(feats), actions, jnp.float32(r))
    np.testing.assert_allclose(np.asarray(new.params["w"]), w - 0.5 * grad_w, rtol=1e-5)
    np.testing.assert_allclose(float(new.params["b"]), b0 - 0.5 * grad_b, rtol=1e-5)
    np.testing.assert_allclose(float(new.baseline), 0.8 * base + 0.2 * r, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["advantage"]), r - base, rtol=1e-6)
    assert int(new.step) == 8


def test_update_baseline_hand_value():
    assert float(rl_policy.update_baseline(jnp.float32(-1.0), jnp.array([-2.0, -4.0]), 0.9)) == \
        pytest.approx(0.9 * -1.0 + 0.1 * -3.0)


def test_first_policy_step_centres_on_its_own_reward():
    """At step 0 the baseline is the batch's mean reward: zero advantage, baseline := reward."""
    tx = optax.sgd(1.0)
    state = rl_policy.init_policy_state(jax.random.key(0), 3, tx)
    feats = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 3)), jnp.float32)
    step = jax.jit(functools.partial(rl_policy.policy_step, tx=tx))
    new, _ = step(state, feats, jnp.ones((2, 4), bool), jnp.float32(-2.5))
    np.testing.assert_allclose(np.asarray(new.params["w"]), np.asarray(state.params["w"]))
    assert float(new.baseline) == pytest.approx(-2.5)


def test_policy_state_is_a_pytree_of_arrays():
    tx = optax.adam(1e-2)
    state = rl_policy.init_policy_state(jax.random.key(1), 5, tx)
    leaves, treedef = jax.tree.flatten(state)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    # A checkpoint restore rebuilds the state from host copies of the leaves.
    restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    assert isinstance(restored, rl_policy.PolicyState)
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(state.params["w"]))


def test_policy_learns_to_prefer_the_right_teacher():
    """Teacher 0 always predicts the label, teacher 1 is random; reward = log-likelihood of
    the label under the mixture of the selected teachers (uniform when none is selected)."""
    b, c, d, steps = 64, 4, 8, 300  # 2 teachers
    rng = np.random.default_rng(7)
    y = rng.integers(0, c, (steps, b)).astype(np.int32)  # [N, B]
    right = 8.0 * np.eye(c, dtype=np.float32)[y]  # [N, B, C]
    rand = 3.0 * rng.normal(size=(steps, b, c)).astype(np.float32)  # [N, B, C]
    teachers = jnp.asarray(np.stack([right, rand], axis=1))  # [N, K, B, C]
    emb = jnp.asarray(rng.normal(size=(steps, b, d)), jnp.float32)  # [N, B, D]
    feats = jax.vmap(functools.partial(rl_policy.state_features, tau=1.0, multilabel=False))(
        emb, teachers, jnp.asarray(y))  # [N, K, B, F]
    tx = optax.adam(0.05)
    state0 = rl_policy.init_policy_state(jax.random.key(0), feats.shape[-1], tx)

    def step(state, xs):
        f, t, lab, key = xs
        actions = rl_policy.sample_actions(key, rl_policy.selection_probs(state.params, f))
        mix = jnp.sum(rl_policy.select_weights(actions)[..., None] * jax.nn.softmax(t), 0)
        mix = jnp.where(jnp.any(actions, 0)[:, None], mix, 1.0 / c)  # [B, C]
        reward = jnp.log(jnp.take_along_axis(mix, lab[:, None], 1)[:, 0])  # [B]
        return rl_policy.policy_step(state, f, actions, reward, tx)[0], None

    keys = jax.random.split(jax.random.key(1), steps)
    state = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs)[0])(
        state0, (feats, teachers, jnp.asarray(y), keys))

    def mean_probs(params):  # [K] mean selection probability over 20 batches
        return np.asarray(jnp.mean(rl_policy.selection_probs(params, feats[:20]), axis=(0, 2)))

    before, after = mean_probs(state0.params), mean_probs(state.params)
    assert abs(before[0] - 0.5) < 0.1 and abs(before[1] - 0.5) < 0.1, before
    assert after[0] > 0.9, after
    assert after[1] < 0.3, (before, after)
    assert int(state.step) == steps


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="alpha"):
        rl_policy.rl_kd_loss(np.zeros((2, 3)), np.zeros((1, 2, 3)), np.zeros(2, np.int32),
                             np.ones((1, 2), bool), tau=1.0, alpha=1.5, multilabel=False)
    tx = optax.sgd(1.0)
    with pytest.raises(ValueError, match="baseline_decay"):
        rl_policy.policy_step(rl_policy.init_policy_state(jax.random.key(0), 3, tx),
                              jnp.zeros((1, 2, 3)), jnp.ones((1, 2), bool), 0.0, tx,
                              baseline_decay=1.0)
