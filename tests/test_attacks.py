"""FGSM / PGD: closed forms on a linear model, eps-ball and pixel-range invariants, PGD vs FGSM,
determinism, and the batch evaluator (masking, per-batch keys, one compile)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rosjax.eval import attacks

B, H, W, C, K = 8, 8, 8, 3, 5  # batch, 8x8 RGB images, 5 classes
D = H * W * C


def _linear_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(0, 0.3, (D, K)).astype(np.float32),  # [D, K]
            "b": rng.normal(0, 0.1, (K,)).astype(np.float32)}


def _linear(params, x):
    """logits = flatten(x) @ W + b (full-precision matmul, also on GPUs that default to TF32)."""
    return jnp.matmul(x.reshape(x.shape[0], -1), params["w"], precision="highest") + params["b"]


def _mlp_params(seed=1, hidden=32):
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(0, 0.4, (D, hidden)).astype(np.float32),
            "b1": rng.normal(0, 0.2, (hidden,)).astype(np.float32),
            "w2": rng.normal(0, 1.0, (hidden, K)).astype(np.float32)}


def _mlp(params, x):
    """A small nonlinear (tanh) model."""
    h = jnp.tanh(jnp.matmul(x.reshape(x.shape[0], -1), params["w1"], precision="highest")
                 + params["b1"])  # [B, hidden]
    return jnp.matmul(h, params["w2"], precision="highest")  # [B, K]


def _images(seed, low=0.0, high=1.0, batch=B):
    return np.random.default_rng(seed).uniform(low, high, (batch, H, W, C)).astype(np.float32)


def _labels(seed, batch=B):
    return np.random.default_rng(seed).integers(0, K, batch).astype(np.int32)


def _multi_hot(seed, batch=B):
    return (np.random.default_rng(seed).random((batch, K)) < 0.4).astype(np.float32)


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_ce(logits, y):
    logits = np.asarray(logits, np.float64)
    return -np.log(_np_softmax(logits)[np.arange(len(y)), y])  # [B]


@functools.partial(jax.jit, static_argnames=("norm", "random_start", "multilabel"))
def _pgd_mlp(params, x, y, key, eps, norm, steps=5, step_size=None, random_start=True,
             multilabel=False):
    """PGD on the MLP; eps and steps are traced so the tests share a few compiles."""
    return attacks.pgd(functools.partial(_mlp, params), x, y, key, eps=eps, norm=norm,
                       steps=steps, step_size=step_size, random_start=random_start,
                       multilabel=multilabel)


@functools.partial(jax.jit, static_argnames=("norm", "multilabel"))
def _fgsm_mlp(params, x, y, eps, norm, multilabel=False):
    """FGSM on the MLP, jitted with a traced eps (one compile per norm and task)."""
    return attacks.fgsm(functools.partial(_mlp, params), x, y, eps=eps, norm=norm,
                        multilabel=multilabel)


def _attack(name, x, y, eps, norm, multilabel=False):
    if name == "fgsm":
        return _fgsm_mlp(_mlp_params(), x, y, eps, norm, multilabel=multilabel)
    return _pgd_mlp(_mlp_params(), x, y, jax.random.key(3), eps, norm, multilabel=multilabel)


@pytest.mark.parametrize("norm,want", [(2, "l2"), (2.0, "l2"), ("2", "l2"), ("L2", "l2"),
                                       (np.inf, "linf"), (float("inf"), "linf"),
                                       ("inf", "linf"), ("linf", "linf")])
def test_norm_spellings(norm, want):
    assert attacks.canonical_norm(norm) == want


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("l2", 128 / 255), ("linf", 0.05),
                                      ("linf", 8 / 255)])
def test_perturbation_in_ball_and_pixels_in_range(name, norm, eps):
    x = _images(0)  # uniform on [0, 1]: many pixels near the boundary, so clipping is active
    x_adv = np.asarray(_attack(name, x, _labels(0), eps, norm), np.float64)
    delta = (x_adv - x).reshape(B, -1)
    size = np.linalg.norm(delta, axis=1) if norm == "l2" else np.abs(delta).max(axis=1)
    assert np.all(size <= eps + 1e-6), size
    assert np.all(size > 0.5 * eps)  # it did move
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_multilabel_perturbation_in_ball(name):
    x = _images(1)
    x_adv = np.asarray(_attack(name, x, _multi_hot(1), 0.5, "l2", multilabel=True), np.float64)
    size = np.linalg.norm((x_adv - x).reshape(B, -1), axis=1)
    assert np.all(size <= 0.5 + 1e-6) and np.all(size > 0.25)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def _fgsm_reference(x, g, eps, norm):
    """Closed-form FGSM step from the input gradient g [B, D] (float64 numpy)."""
    if norm == "l2":
        step = eps * g / np.linalg.norm(g, axis=1, keepdims=True)
    else:
        step = eps * np.sign(g)
    return np.clip(x.reshape(B, -1).astype(np.float64) + step, 0.0, 1.0).reshape(x.shape)


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 0.1)])
def test_fgsm_linear_closed_form_one_label(norm, eps):
    params = _linear_params()
    x, y = _images(2, 0.25, 0.75), _labels(2)
    logits = x.reshape(B, -1).astype(np.float64) @ params["w"] + params["b"]
    onehot = np.eye(K)[y]
    g = (_np_softmax(logits) - onehot) @ params["w"].T.astype(np.float64)  # dCE/dx, [B, D]
    got = attacks.fgsm(functools.partial(_linear, params), x, y, eps=eps, norm=norm)
    np.testing.assert_allclose(np.asarray(got), _fgsm_reference(x, g, eps, norm), atol=2e-6)


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 0.1)])
def test_fgsm_linear_closed_form_multilabel(norm, eps):
    params = _linear_params(seed=4)
    x, y = _images(3, 0.25, 0.75), _multi_hot(3)
    logits = x.reshape(B, -1).astype(np.float64) @ params["w"] + params["b"]
    # d/dx of sum_c BCE(z_c, y_c) = W (sigmoid(z) - y).
    g = (1 / (1 + np.exp(-logits)) - y) @ params["w"].T.astype(np.float64)  # [B, D]
    got = attacks.fgsm(functools.partial(_linear, params), x, y, eps=eps, norm=norm,
                       multilabel=True)
    np.testing.assert_allclose(np.asarray(got), _fgsm_reference(x, g, eps, norm), atol=2e-6)


def test_fgsm_is_jittable_with_traced_eps():
    params = _linear_params()
    x, y = _images(4, 0.25, 0.75), _labels(4)
    logits = x.reshape(B, -1).astype(np.float64) @ params["w"] + params["b"]
    g = (_np_softmax(logits) - np.eye(K)[y]) @ params["w"].T.astype(np.float64)
    jitted = jax.jit(lambda x, y, eps: attacks.fgsm(functools.partial(_linear, params), x, y,
                                                     eps=eps))
    np.testing.assert_allclose(np.asarray(jitted(x, y, 0.3)), _fgsm_reference(x, g, 0.3, "l2"),
                               atol=2e-6)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_zero_eps_changes_nothing(norm):
    params = _mlp_params()
    apply_fn = functools.partial(_mlp, params)
    x, y = _images(5), _labels(5)
    key = jax.random.key(0)
    outs = [_fgsm_mlp(params, x, y, 0.0, norm),
            _pgd_mlp(params, x, y, key, 0.0, norm),  # default step size 2.5 * 0 / steps
            _pgd_mlp(params, x, y, key, 0.0, norm, step_size=0.1)]
    clean_pred = np.argmax(np.asarray(apply_fn(x)), -1)
    for x_adv in outs:
        np.testing.assert_array_equal(np.asarray(x_adv), x)
        np.testing.assert_array_equal(np.argmax(np.asarray(apply_fn(x_adv)), -1), clean_pred)


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 0.03)])
def test_pgd_raises_loss_at_least_as_much_as_fgsm(norm, eps):
    params = _mlp_params()
    apply_fn = functools.partial(_mlp, params)
    x, y = _images(6), _labels(6)
    clean = _np_ce(apply_fn(x), y).mean()
    loss_fgsm = _np_ce(apply_fn(_fgsm_mlp(params, x, y, eps, norm)), y).mean()
    loss_pgd = _np_ce(apply_fn(_pgd_mlp(params, x, y, jax.random.key(1), eps, norm, steps=10)),
                      y).mean()
    assert loss_fgsm > clean
    assert loss_pgd >= loss_fgsm, (clean, loss_fgsm, loss_pgd)


def test_pgd_same_key_same_result():
    x, y = _images(7), _labels(7)
    def run(key):
        return np.asarray(_pgd_mlp(_mlp_params(), x, y, key, 0.5, "l2", steps=3))
    first = run(jax.random.key(11))
    np.testing.assert_array_equal(first, run(jax.random.key(11)))
    assert not np.array_equal(first, run(jax.random.key(12)))  # the random start uses the key


@pytest.mark.parametrize("bad", [1, 3, "l1", "fro", True, -np.inf])
def test_bad_norm_is_rejected(bad):
    with pytest.raises(ValueError, match="norm"):
        attacks.fgsm(functools.partial(_linear, _linear_params()), _images(0), _labels(0),
                     eps=0.1, norm=bad)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="method"):
        attacks.AttackConfig(method="cw")
    with pytest.raises(ValueError, match="eps"):
        attacks.AttackConfig(eps=-0.1)
    with pytest.raises(ValueError, match="steps"):
        attacks.AttackConfig(steps=0)


def _batches(multilabel, n_batches=3, batch=B):
    out = []
    for i in range(n_batches):
        label = _multi_hot(20 + i, batch) if multilabel else _labels(20 + i, batch)
        mask = np.ones(batch, np.float32)
        if i == n_batches - 1:
            mask[-1] = 0.0  # padded row of the last batch
        out.append({"image": _images(20 + i, batch=batch), "label": label, "mask": mask})
    return out


@pytest.mark.parametrize("multilabel", [False, True])
def test_evaluate_under_attack(multilabel):
    variables = _mlp_params()
    traces = []

    def apply_fn(v, x):
        traces.append(1)  # Python side effect: runs once per trace, not per call
        return _mlp(v, x)

    batches = _batches(multilabel)
    config = attacks.AttackConfig(method="pgd", eps=0.5, steps=3)
    key = jax.random.key(5)
    attacks.evaluate_under_attack(apply_fn, variables, batches[:1], config, key,
                                  multilabel=multilabel)
    n_traces = len(traces)
    y_true, clean, adv = attacks.evaluate_under_attack(apply_fn, variables, batches, config, key,
                                                       multilabel=multilabel)
    assert len(traces) == n_traces  # one compile serves every (same-shaped) batch
    keep = np.concatenate([b["mask"] for b in batches]) > 0
    assert keep.sum() == 3 * B - 1 and len(y_true) == len(clean) == len(adv) == 3 * B - 1
    np.testing.assert_array_equal(y_true, np.concatenate([b["label"] for b in batches])[keep])
    logits = np.concatenate([np.asarray(_mlp(variables, b["image"]), np.float64)
                             for b in batches])[keep]
    expect = 1 / (1 + np.exp(-logits)) if multilabel else _np_softmax(logits)
    np.testing.assert_allclose(clean, expect, atol=1e-5)
    # Batch i is attacked with fold_in(key, i).
    x_adv = _pgd_mlp(variables, batches[1]["image"], batches[1]["label"],
                     jax.random.fold_in(key, 1), 0.5, "l2", steps=3, multilabel=multilabel)
    logits_adv = np.asarray(_mlp(variables, x_adv), np.float64)
    expect_adv = 1 / (1 + np.exp(-logits_adv)) if multilabel else _np_softmax(logits_adv)
    np.testing.assert_allclose(adv[B:2 * B], expect_adv, atol=1e-5)
    assert not np.allclose(adv, clean, atol=1e-3)


def test_evaluate_under_attack_fgsm_zero_eps_matches_clean():
    y_true, clean, adv = attacks.evaluate_under_attack(
        _mlp, _mlp_params(), _batches(False), attacks.AttackConfig(method="fgsm", eps=0.0),
        jax.random.key(0), multilabel=False)
    np.testing.assert_allclose(adv, clean, rtol=0, atol=1e-6)  # GPU kernels may differ by an ulp


def test_evaluate_under_attack_rejects_wrong_label_shape():
    with pytest.raises(ValueError, match="batch 0 'label'"):
        attacks.evaluate_under_attack(_mlp, _mlp_params(), _batches(False), attacks.AttackConfig(),
                                      jax.random.key(0), multilabel=True)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_start_is_uniform_in_the_ball(norm):
    # With one step of size 0, PGD returns x + its random start (x = 0.5, eps = 0.4: no clip).
    n, eps = 4000, 0.4
    x = np.full((n, 1, 1, 2), 0.5, np.float32)  # 2-D "images": the ball is a disk / square
    def apply_fn(v):
        return jnp.matmul(v.reshape(n, 2), jnp.ones((2, K)), precision="highest")
    x_adv = attacks.pgd(apply_fn, x, np.zeros(n, np.int32), jax.random.key(9), eps=eps,
                        norm=norm, steps=1, step_size=0.0)
    delta = np.asarray(x_adv, np.float64).reshape(n, 2) - 0.5
    t = np.array([0.25, 0.5, 0.75])
    if norm == "l2":  # uniform in the disk: P(r <= t * eps) = t^2
        r = np.linalg.norm(delta, axis=1) / eps
        np.testing.assert_allclose([np.mean(r <= s) for s in t], t ** 2, atol=0.03)
        assert r.max() <= 1 + 1e-6
    else:  # uniform in the square: each coordinate uniform on [-eps, eps]
        u = (delta / eps + 1) / 2
        np.testing.assert_allclose([np.mean(u <= s) for s in t], t, atol=0.03)
        assert np.abs(delta).max() <= eps + 1e-6
