"""Optimiser, schedule, train/eval steps and evaluation passes against numpy references."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rosjax.config import OptimConfig
from rosjax.train import optim, parallel, steps, validation
from rosjax.train.state import create_train_state


def test_lr_schedule_steps_down_at_epochs_25_and_40():
    spe = 7
    _, schedule = optim.make_optimizer(OptimConfig(), steps_per_epoch=spe)
    # Paper: 0.1, divided by 10 from (0-based) epoch 25 and again from epoch 40.
    expected = {0: 0.1, 25 * spe - 1: 0.1, 25 * spe: 0.01, 40 * spe - 1: 0.01,
                40 * spe: 0.001, 50 * spe - 1: 0.001}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step


def _torch_sgd_reference(w, b, a, y, *, lrs, momentum, wd, decay_bias, clip=0.0):
    """numpy float64 PyTorch SGD on L = 0.5 |a w + b - y|^2 (coupled wd, momentum buffer).

    clip > 0: `torch.nn.utils.clip_grad_norm_(params, clip)` before each `optimizer.step()`.
    """
    buf_w = buf_b = None
    for lr in lrs:
        r = a @ w + b - y                      # [N]
        g_w, g_b = a.T @ r, np.sum(r)          # [D], scalar
        if clip:
            scale = min(1.0, clip / np.sqrt(np.sum(g_w ** 2) + g_b ** 2))
            g_w, g_b = g_w * scale, g_b * scale
        g_w = g_w + wd * w
        g_b = g_b + (wd * b if decay_bias else 0.0)
        buf_w = g_w if buf_w is None else momentum * buf_w + g_w
        buf_b = g_b if buf_b is None else momentum * buf_b + g_b
        w, b = w - lr * buf_w, b - lr * buf_b
    return w, b


@pytest.mark.parametrize("decay_all_params, clip", [(True, 0.0), (False, 0.0), (True, 1.5)])
def test_optimizer_matches_pytorch_sgd_on_a_quadratic(decay_all_params, clip):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3))
    y = rng.normal(size=5)
    w0, b0 = rng.normal(size=3), 0.7
    cfg = OptimConfig(learning_rate=0.1, momentum=0.9, weight_decay=0.05, milestones=(2,),
                      decay_factor=0.5, clip_grad_norm=clip)
    tx, _ = optim.make_optimizer(cfg, steps_per_epoch=2, decay_all_params=decay_all_params)
    # 'w' is a kernel-like [3, 1] array, 'b' a bias [1]: only 'w' decays when restricted.
    params = {"w": jnp.asarray(w0[:, None], jnp.float32), "b": jnp.asarray([b0], jnp.float32)}
    aj, yj = jnp.asarray(a, jnp.float32), jnp.asarray(y, jnp.float32)
    loss = lambda p: 0.5 * jnp.sum((aj @ p["w"][:, 0] + p["b"][0] - yj) ** 2)  # noqa: E731
    opt_state = tx.init(params)

    @jax.jit
    def update(params, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(6):
        params, opt_state = update(params, opt_state)
    lrs = [0.1] * 4 + [0.05] * 2  # epoch 2 (steps 4, 5) is past the milestone
    w_ref, b_ref = _torch_sgd_reference(w0, b0, a, y, lrs=lrs, momentum=0.9, wd=0.05,
                                        decay_bias=decay_all_params, clip=clip)
    if clip:  # the clip is active: the first gradient (norm 5.6) is above 1.5
        r0 = a @ w0 + b0 - y
        assert np.sqrt(np.sum((a.T @ r0) ** 2) + np.sum(r0) ** 2) > clip
    np.testing.assert_allclose(params["w"][:, 0], w_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(params["b"][0], b_ref, rtol=1e-5, atol=1e-5)


class _Linear(nn.Module):
    """logits = flatten(x) W + b; no BatchNorm, so batch_stats stay {}."""
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("multilabel", [False, True])
def test_train_step_is_two_sgd_steps_of_softmax_or_sigmoid_regression(multilabel):
    rng = np.random.default_rng(1)
    b_size, classes, lr, mom, wd = 4, 3, 0.2, 0.9, 0.01
    images = rng.random((b_size, 2, 2, 1), dtype=np.float32)
    if multilabel:
        labels = (rng.random((b_size, classes)) < 0.5).astype(np.float32)
    else:
        labels = np.array([0, 2, 1, 2], np.int32)
    mesh = parallel.make_mesh(jax.devices()[:1])
    tx, _ = optim.make_optimizer(OptimConfig(learning_rate=lr, momentum=mom, weight_decay=wd),
                                 steps_per_epoch=100)
    state = create_train_state(_Linear(classes), tx, jax.random.key(0), (1, 2, 2, 1), mesh)
    w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
    step = jax.jit(functools.partial(steps.train_step, multilabel=multilabel))
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}

    x = images.reshape(b_size, -1).astype(np.float64)
    buf_w = buf_b = None
    for _ in range(2):
        logits = x @ w + b
        if multilabel:
            p = 1 / (1 + np.exp(-logits))
            loss = -np.mean(np.sum(labels * np.log(p) + (1 - labels) * np.log(1 - p), -1))
            delta = (p - labels) / b_size
            acc = np.mean((logits > 0) == (labels > 0.5))
        else:
            p = _softmax(logits)
            loss = -np.mean(np.log(p[np.arange(b_size), labels]))
            delta = (p - np.eye(classes)[labels]) / b_size
            acc = np.mean(np.argmax(logits, -1) == labels)
        g_w, g_b = x.T @ delta + wd * w, delta.sum(0) + wd * b
        buf_w = g_w if buf_w is None else mom * buf_w + g_w
        buf_b = g_b if buf_b is None else mom * buf_b + g_b
        state, metrics = step(state, batch, jax.random.key(5))
        assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)
        assert float(metrics["accuracy"]) == pytest.approx(acc)
        w, b = w - lr * buf_w, b - lr * buf_b

    assert int(state.step) == 2
    assert state.batch_stats == {}
    np.testing.assert_allclose(state.params["Dense_0"]["kernel"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["Dense_0"]["bias"], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(steps.eval_step)(state, batch),
                               x @ w + b, rtol=1e-5, atol=1e-6)


def test_predict_drops_padded_rows_and_keeps_order():
    rng = np.random.default_rng(2)
    mesh = parallel.make_mesh()  # 4 devices: eval batches of 4 rows are split 1 per device
    tx, _ = optim.make_optimizer(OptimConfig(), steps_per_epoch=1)
    state = create_train_state(_Linear(3), tx, jax.random.key(1), (1, 2, 2, 1), mesh)
    images = rng.random((6, 2, 2, 1), dtype=np.float32)
    labels = np.array([2, 0, 1, 1, 0, 2], np.int32)
    pad = lambda a: np.concatenate([a, np.zeros((2, *a.shape[1:]), a.dtype)])  # noqa: E731
    images_p, labels_p = pad(images), pad(labels)
    mask = np.array([1] * 6 + [0] * 2, np.float32)
    batches = [{"image": images_p[i:i + 4], "label": labels_p[i:i + 4], "mask": mask[i:i + 4]}
               for i in (0, 4)]
    out = validation.make_predict(mesh, multilabel=False)(state, batches)

    w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
    logits = images.reshape(6, -1) @ w + b
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["label"], labels)
    ce = -np.log(_softmax(logits)[np.arange(6), labels])
    np.testing.assert_allclose(out["loss"], ce, rtol=1e-5)


def test_step_decay_matches_optax_sgd_and_one_program_serves_every_epoch_length():
    """The epoch length is optimiser state: the same compiled update for 2 and 3 steps per epoch,
    with updates equal (bit for bit) to optax.sgd on optax.piecewise_constant_schedule."""
    cfg = OptimConfig(learning_rate=0.1, momentum=0.9, weight_decay=0.0, milestones=(1, 2), decay_factor=0.1)
    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7}
    rng = np.random.default_rng(0)
    grads = [{"w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)} for _ in range(8)]
    texts = []
    for spe in (2, 3):
        tx, _ = optim.make_optimizer(cfg, steps_per_epoch=spe)
        boundaries = {spe * 1: 0.1, spe * 2: 0.1}
        reference = optax.sgd(optax.piecewise_constant_schedule(0.1, boundaries), momentum=0.9)
        state, ref_state = tx.init(params), reference.init(params)
        update = jax.jit(tx.update)
        texts.append(update.lower(grads[0], state, params).as_text())
        for g in grads:
            ours, state = update(g, state, params)
            theirs, ref_state = jax.jit(reference.update)(g, ref_state, params)
            np.testing.assert_array_equal(np.asarray(ours["w"]), np.asarray(theirs["w"]))
    assert texts[0] == texts[1]


TRACES: list[int] = []


class _CountingDense(nn.Module):
    """A one-layer model that records each time it is traced."""
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        TRACES.append(self.features)
        return nn.Dense(self.features)(x.reshape((x.shape[0], -1)))


def test_runs_of_one_architecture_share_one_traced_init_with_the_same_weights():
    """Every run of an architecture (each teacher, student, sweep point) starts from one traced
    init program; the weights are those of a direct `module.init` with the run's key."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    tx, _ = optim.make_optimizer(OptimConfig(learning_rate=0.1), steps_per_epoch=1)
    TRACES.clear()
    states = [create_train_state(_CountingDense(3), tx, jax.random.key(0), (2, 4, 4, 1), mesh)]
    first_run = TRACES.count(3)
    assert first_run >= 1
    states += [create_train_state(_CountingDense(3), tx, jax.random.key(seed), (2, 4, 4, 1), mesh)
               for seed in (1, 0)]
    assert TRACES.count(3) == first_run  # the later runs traced nothing
    create_train_state(_CountingDense(5), tx, jax.random.key(0), (2, 4, 4, 1), mesh)
    assert TRACES.count(5) == first_run  # another architecture: its own program
    for seed, state in zip((0, 1, 0), states, strict=True):
        direct = _CountingDense(3).init({"params": jax.random.key(seed), "dropout": jax.random.key(seed)},
                                        np.zeros((2, 4, 4, 1), np.float32))["params"]
        np.testing.assert_array_equal(np.asarray(state.params["Dense_0"]["kernel"]),
                                      np.asarray(direct["Dense_0"]["kernel"]))
    assert not np.array_equal(np.asarray(states[0].params["Dense_0"]["kernel"]),
                              np.asarray(states[1].params["Dense_0"]["kernel"]))


def test_one_optimiser_program_serves_every_epoch_length():
    """Teachers on subsets of different sizes: their optimisers compare equal (one train step
    program for all), while each optimiser state holds its own epoch length, so the learning
    rate drops at each run's own milestone."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    cfg = OptimConfig(learning_rate=0.1, milestones=(2,))
    (tx3, _), (tx7, _) = (optim.make_optimizer(cfg, steps_per_epoch=n) for n in (3, 7))
    assert tx3 == tx7 and hash(tx3) == hash(tx7)
    assert optim.make_optimizer(dataclasses.replace(cfg, learning_rate=0.2), 3)[0] != tx3
    for tx, epoch_length in ((tx3, 3), (tx7, 7)):
        state = create_train_state(_Linear(2), tx, jax.random.key(0), (1, 2, 2, 1), mesh)
        decay = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optim.StepDecayState))
                 if isinstance(s, optim.StepDecayState)]
        assert [int(d.steps_per_epoch) for d in decay] == [epoch_length]
        grads = jax.tree.map(jnp.ones_like, state.params)
        opt_state, rates = state.opt_state, []
        for _ in range(2 * epoch_length + 1):
            updates, opt_state = tx.update(grads, opt_state, state.params)
            rates.append(float(jax.tree.leaves(updates)[0].ravel()[0]))
        # Each update is -lr * b, b the momentum buffer of constant unit gradients, growing by less than
        # a factor 2 a step: the tenfold drop of lr at epoch 2 is the one ratio below 0.5, at update 2n.
        drop = [i for i in range(1, len(rates)) if abs(rates[i] / rates[i - 1]) < 0.5]
        assert drop == [2 * epoch_length]
