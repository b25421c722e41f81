"""M_smooth: running mean vs an explicit numpy average; BatchNorm recalibration vs statistics
computed by hand in numpy."""
import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from rosjax.config import DistillConfig
from rosjax.distill import SmoothState, recalibrate_batch_stats, should_average, smoothing, trainer, update_running_mean
from rosjax.train import parallel


def test_should_average_schedule():
    assert [should_average(e, 2) for e in range(5)] == [False, False, True, True, True]
    # The paper's 50 epochs with a 10-epoch warm-up: 40 snapshots, first after 0-based epoch 10.
    snapshots = [e for e in range(50) if should_average(e, 10)]
    assert len(snapshots) == 40 and snapshots[0] == 10
    with pytest.raises(ValueError, match="warmup_epochs"):
        should_average(3, -1)


def _random_tree(rng):
    return {"dense": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                      "bias": rng.normal(size=(2,)).astype(np.float32)},
            "scale": rng.normal(size=(4,)).astype(np.float32)}


@pytest.mark.parametrize("average_batch_stats", [False, True])
def test_running_mean_equals_numpy_average_of_epoch_weights(average_batch_stats):
    rng = np.random.default_rng(0)
    epochs, warmup = 5, 2
    params = [_random_tree(rng) for _ in range(epochs)]  # weights at the end of each epoch
    stats = [{"bn": {"mean": rng.normal(size=(4,)).astype(np.float32)}} for _ in range(epochs)]
    state = SmoothState.create(params[0], stats[0], average_batch_stats=average_batch_stats)
    for epoch in range(epochs):
        if should_average(epoch, warmup):
            state = state.update(params[epoch], stats[epoch])
    assert int(state.count) == 3
    kept = params[warmup:]
    np.testing.assert_allclose(state.params["dense"]["kernel"],
                               np.mean([p["dense"]["kernel"] for p in kept], axis=0), rtol=1e-6)
    np.testing.assert_allclose(state.params["dense"]["bias"],
                               np.mean([p["dense"]["bias"] for p in kept], axis=0), rtol=1e-6)
    np.testing.assert_allclose(state.params["scale"], np.mean([p["scale"] for p in kept], axis=0),
                               rtol=1e-6)
    if average_batch_stats:
        np.testing.assert_allclose(state.batch_stats["bn"]["mean"],
                                   np.mean([s["bn"]["mean"] for s in stats[warmup:]], axis=0),
                                   rtol=1e-6)
    else:
        assert state.batch_stats is None


def test_update_running_mean_first_call_copies_and_counts():
    rng = np.random.default_rng(1)
    a, b = _random_tree(rng), _random_tree(rng)
    avg, n = update_running_mean(jax.tree.map(np.zeros_like, a), a, 0)
    assert n == 1
    np.testing.assert_array_equal(avg["scale"], a["scale"])
    avg, n = update_running_mean(avg, b, n)
    assert n == 2
    np.testing.assert_allclose(avg["scale"], (a["scale"] + b["scale"]) / 2, rtol=1e-6)


def test_smooth_state_errors():
    tree = _random_tree(np.random.default_rng(2))
    with pytest.raises(ValueError, match="batch_stats"):
        SmoothState.create(tree, None, average_batch_stats=True)
    state = SmoothState.create(tree, {"bn": {"mean": np.zeros(4)}}, average_batch_stats=True)
    with pytest.raises(ValueError, match="batch_stats"):
        state.update(tree)


# ----------------------------------------------------------------------------------------------
# BatchNorm recalibration


class TinyBNNet(nn.Module):
    """conv 3x3 VALID -> BN(momentum 0.9) -> relu -> mean pool -> dense -> BN(momentum 0.99)."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn1")(h)
        h = nn.relu(h).mean(axis=(1, 2))
        h = nn.Dense(3, name="dense")(h)
        return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-5,
                            name="bn2")(h)


def _numpy_batch_stats(params, x):
    """Per-batch BN statistics of TinyBNNet in train mode, computed by hand in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    k = p["conv"]["kernel"]  # [3, 3, Cin, 4]
    h = sum(np.einsum("bhwc,co->bhwo", x[:, i:i + 4, j:j + 4, :], k[i, j])
            for i in range(3) for j in range(3)) + p["conv"]["bias"]  # [B, 4, 4, 4]
    m1, v1 = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))  # biased variance, like flax
    h = (h - m1) / np.sqrt(v1 + 1e-5) * p["bn1"]["scale"] + p["bn1"]["bias"]
    h = np.maximum(h, 0).mean(axis=(1, 2))  # [B, 4]
    h = h @ p["dense"]["kernel"] + p["dense"]["bias"]  # [B, 3]
    return {"bn1": (m1, v1), "bn2": (h.mean(axis=0), h.var(axis=0))}


def test_recalibration_reproduces_hand_computed_statistics():
    rng = np.random.default_rng(3)
    model = TinyBNNet()
    batches = [{"image": rng.random((5, 6, 6, 2)).astype(np.float32)} for _ in range(3)]
    variables = jax.jit(model.init)(jax.random.key(0), batches[0]["image"])
    # Non-trivial BN affine parameters, so bn2's input depends on them.
    params = dict(variables["params"])
    params["bn1"] = {"scale": rng.normal(size=4).astype(np.float32) + 1.0,
                     "bias": rng.normal(size=4).astype(np.float32)}
    # Stale running statistics that must not leak into the result.
    stale = jax.tree.map(lambda a: a + 7.0, variables["batch_stats"])

    smoothing._accumulate_batch_statistics.clear_cache()  # other tests may have compiled it
    stats = recalibrate_batch_stats(model, params, stale, batches)

    per_batch = [_numpy_batch_stats(params, b["image"]) for b in batches]
    for layer in ("bn1", "bn2"):
        mean = np.mean([s[layer][0] for s in per_batch], axis=0)
        var = np.mean([s[layer][1] for s in per_batch], axis=0)
        np.testing.assert_allclose(stats[layer]["mean"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[layer]["var"], var, rtol=1e-4, atol=1e-5)
    # One compile for all batches (same model and shapes).
    assert smoothing._accumulate_batch_statistics._cache_size() == 1
    # Plain arrays work as well as batch dicts.
    again = recalibrate_batch_stats(model, params, stale, [b["image"] for b in batches])
    np.testing.assert_allclose(again["bn2"]["var"], stats["bn2"]["var"], rtol=1e-6)


def test_recalibration_needs_batches():
    model = TinyBNNet()
    x = np.zeros((2, 6, 6, 2), np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batch_stats(model, variables["params"], variables["batch_stats"], [])


def test_full_pass_recalibration_uses_one_epoch_of_batches():
    """--distill.recalibration_batches=0: the statistics are the mean over exactly one epoch's batches
    (torch's update_bn over the train loader), here 3 of an endless cycle over 3 batches."""
    rng = np.random.default_rng(5)
    model = TinyBNNet()
    batches = [{"image": rng.random((4, 6, 6, 2)).astype(np.float32) + i, "label": np.zeros(4, np.int32)}
               for i in range(3)]  # shifted inputs: any other number of batches gives other statistics
    variables = jax.jit(model.init)(jax.random.key(1), batches[0]["image"])
    smooth = SmoothState.create(variables["params"]).update(variables["params"])
    out = trainer.smoothed_variables(model, smooth, variables, DistillConfig(recalibration_batches=0),
                                     lambda: itertools.cycle(batches), parallel.make_mesh(), steps_per_epoch=3)
    per_batch = [_numpy_batch_stats(variables["params"], b["image"]) for b in batches]
    for layer in ("bn1", "bn2"):
        for i, name in enumerate(("mean", "var")):
            ref = np.mean([s[layer][i] for s in per_batch], axis=0)
            np.testing.assert_allclose(out["batch_stats"][layer][name], ref, rtol=1e-4, atol=1e-5)
