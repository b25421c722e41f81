"""Data parallelism: 1 device and 4 devices give the same training; shardings, donation, errors."""
import collections
import functools

import _train_worker as tw
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rosjax import losses, models
from rosjax.config import OptimConfig
from rosjax.train import classifier, optim, parallel, steps, validation
from rosjax.train.state import create_train_state


def _three_steps(mesh, batches):
    tx, _ = optim.make_optimizer(OptimConfig(learning_rate=0.1), steps_per_epoch=10)
    state = create_train_state(models.create("tiny_cnn", tw.CLASSES), tx, jax.random.key(0),
                               (1, tw.IMAGE, tw.IMAGE, tw.CHANNELS), mesh)
    step = parallel.jit_train_step(functools.partial(steps.train_step, multilabel=False), mesh)
    for batch in batches:
        global_batch = parallel.shard_batch(batch, mesh)
        # Each device holds B / num_devices rows of the global batch.
        rows = {s.data.shape[0] for s in global_batch["image"].addressable_shards}
        assert rows == {tw.BATCH // mesh.devices.size}
        state, _ = step(state, global_batch, jax.random.key(1))
    leaf = state.params["conv1"]["kernel"]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == mesh.size
    return jax.device_get((state.params, state.batch_stats))


def test_one_device_and_four_devices_train_identically():
    assert jax.device_count() == 4  # from conftest.py
    images, labels = tw.dataset_arrays()
    batches = [{"image": images[i:i + tw.BATCH], "label": labels[i:i + tw.BATCH]}
               for i in range(0, 3 * tw.BATCH, tw.BATCH)]
    params_1, stats_1 = _three_steps(parallel.make_mesh(jax.devices()[:1]), batches)
    params_4, stats_4 = _three_steps(parallel.make_mesh(), batches)
    # BatchNorm statistics moved away from their init (mean 0, var 1) ...
    assert np.max(np.abs(stats_1["bn1"]["mean"])) > 1e-3
    # ... and, like the parameters, cover the global batch on 4 devices exactly as on 1.
    for tree_1, tree_4 in ((params_1, params_4), (stats_1, stats_4)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     tree_1, tree_4)


def test_mesh_and_shardings():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.shape == (4,)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert parallel.data_sharding(mesh).spec == jax.P("data")
    assert parallel.replicated(mesh).spec == jax.P()


def test_batch_size_not_divisible_by_devices_is_a_clear_error():
    mesh = parallel.make_mesh()
    parallel.check_batch_size(8, mesh)
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by the number of "
                                         r"devices 4"):
        parallel.check_batch_size(6, mesh)
    with pytest.raises(ValueError, match="batch size 6"):
        parallel.shard_batch({"image": np.zeros((6, 2, 2, 1), np.float32)}, mesh)


def test_frozen_argument_is_not_donated_and_the_state_is():
    """Teachers passed with `frozen=` survive the step; the old state's buffers are reused."""
    mesh = parallel.make_mesh()
    tx, _ = optim.make_optimizer(OptimConfig(), steps_per_epoch=1)
    model = models.create("tiny_cnn", tw.CLASSES)
    state = create_train_state(model, tx, jax.random.key(0), (1, 8, 8, 3), mesh)
    teacher = create_train_state(model, tx, jax.random.key(1), (1, 8, 8, 3), mesh).variables

    def distill_like_step(state, teacher, batch, key):
        def loss_fn(params):
            logits, stats = steps.forward_train(state, params, batch["image"], key)
            target = jax.nn.softmax(model.apply(teacher, batch["image"], train=False))
            return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), -1)), stats
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return steps.apply_gradients(state, grads, stats), {"loss": loss}

    step = parallel.jit_train_step(distill_like_step, mesh, frozen=teacher)
    batch = parallel.shard_batch({"image": np.full((8, 8, 8, 3), 0.5, np.float32)}, mesh)
    old_kernel = state.params["conv1"]["kernel"]
    new_state, metrics = step(state, batch, jax.random.key(2))
    assert old_kernel.is_deleted()
    assert not any(x.is_deleted() for x in jax.tree.leaves(teacher))
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
    # The frozen teacher is unchanged and still usable.
    labels = jnp.zeros((8,), jnp.int32)
    assert np.isfinite(float(losses.supervised_loss(
        model.apply(teacher, batch["image"], train=False), labels, multilabel=False)))


def test_a_second_epoch_traces_neither_the_train_nor_the_eval_step_again(monkeypatch, tmp_path):
    """Two epochs of `train_classifier` with a mid-epoch checkpoint and a validation pass per
    epoch: Python runs each step function once, at its only trace (counted here, beside the
    guard), and every later call reuses the program."""
    traces = {"train": 0, "eval": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traces[name] += 1  # Python runs only while jax traces
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(steps, "train_step", counted("train", steps.train_step))
    monkeypatch.setattr(steps, "eval_step", counted("eval", steps.eval_step))
    parallel._shared_jit.cache_clear()  # programs an earlier test of this process compiled for tiny_cnn
    images, labels = tw.dataset_arrays()
    val = [{"image": images[i:i + tw.BATCH], "label": labels[i:i + tw.BATCH], "mask": np.ones(tw.BATCH, np.float32)}
           for i in range(0, 2 * tw.BATCH, tw.BATCH)]
    mesh = parallel.make_mesh()
    evaluator = validation.make_evaluator(lambda: val, mesh=mesh, multilabel=False)
    optim_cfg = OptimConfig(epochs=2, batch_size=tw.BATCH, learning_rate=0.05, milestones=(2,))
    result = classifier.train_classifier(
        models.create("tiny_cnn", tw.CLASSES), tw.train_iter, evaluator, tmp_path, optim_cfg=optim_cfg,
        steps_per_epoch=tw.STEPS_PER_EPOCH, image_shape=(tw.IMAGE, tw.IMAGE, tw.CHANNELS), multilabel=False,
        mesh=mesh, loop_cfg=tw.loop_config(checkpoint_every_steps=3))
    assert int(result.fit.state.step) == 2 * tw.STEPS_PER_EPOCH and len(result.fit.history) == 2
    assert traces == {"train": 1, "eval": 1}


def test_a_second_run_of_one_architecture_and_recipe_traces_nothing(monkeypatch, tmp_path):
    """Two `train_classifier` runs of one architecture, recipe and epoch length in one process
    (the student settings of an experiment): the second traces neither its train step nor its
    evaluation (Python runs a function only while jax traces it), and still trains from its own
    seed."""
    traces = collections.Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traces[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(steps, "train_step", counted("train", steps.train_step))
    monkeypatch.setattr(steps, "eval_step", counted("eval", steps.eval_step))
    parallel._shared_jit.cache_clear()
    images, labels = tw.dataset_arrays()
    val = [{"image": images[:tw.BATCH], "label": labels[:tw.BATCH], "mask": np.ones(tw.BATCH, np.float32)}]
    mesh = parallel.make_mesh()
    optim_cfg = OptimConfig(epochs=1, batch_size=tw.BATCH, learning_rate=0.05, milestones=(2,))
    model = models.create("tiny_cnn", tw.CLASSES, pixel_mean=(0.3,))  # a module no other test builds
    finals, per_run = [], []
    for seed in (0, 1):
        before = dict(traces)
        result = classifier.train_classifier(
            model, tw.train_iter, validation.make_evaluator(lambda: val, mesh=mesh, multilabel=False),
            tmp_path / str(seed), optim_cfg=optim_cfg, steps_per_epoch=tw.STEPS_PER_EPOCH,
            image_shape=(tw.IMAGE, tw.IMAGE, tw.CHANNELS), multilabel=False, seed=seed, mesh=mesh,
            loop_cfg=tw.loop_config(checkpoint_every_steps=0))
        per_run.append({k: traces[k] - before.get(k, 0) for k in ("train", "eval")})
        finals.append(jax.device_get(result.fit.state.params))
    assert per_run == [{"train": 1, "eval": 1}, {"train": 0, "eval": 0}]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])))
    assert diff > 1e-3  # two seeds, two different trained models from the one program


def test_a_retrace_of_a_jitted_step_is_an_error():
    """A batch of another size would compile the step a second time: the guard refuses it."""
    mesh = parallel.make_mesh()
    step = parallel.jit_train_step(lambda state, batch, key: (state + batch["x"].sum(), {}), mesh)
    state = jax.device_put(jnp.zeros(()), parallel.replicated(mesh))  # as the trainers place it
    state, _ = step(state, parallel.shard_batch({"x": np.ones((8,), np.float32)}, mesh), jax.random.key(0))
    state, _ = step(state, parallel.shard_batch({"x": np.ones((8,), np.float32)}, mesh), jax.random.key(1))
    assert float(state) == 16.0  # same shapes: the one program, twice
    with pytest.raises(AssertionError, match=r"traced 2 times"):
        step(state, parallel.shard_batch({"x": np.ones((4,), np.float32)}, mesh), jax.random.key(2))
    predict = parallel.jit_eval_step(lambda state, batch: batch["x"] * state, mesh)
    predict(state, parallel.shard_batch({"x": np.ones((8,), np.float32)}, mesh))
    with pytest.raises(AssertionError, match=r"traced 2 times"):
        predict(state, parallel.shard_batch({"x": np.ones((8, 2), np.float32)}, mesh))


def test_two_runs_build_one_program_so_the_persistent_cache_shares_it():
    """Every run builds its own jitted step (`jit_train_step`); two runs of one architecture must
    lower to the very same module, name included, since the module is the key of JAX's
    persistent compilation cache (and the program `CompileAhead` compiled is loaded by the run
    only under that key). Before the guard kept the step's name, each run's module was named
    `jit_train_step_<n>`, and every run compiled its step anew."""
    mesh = parallel.make_mesh()
    tx, _ = optim.make_optimizer(OptimConfig(learning_rate=0.1), steps_per_epoch=10)
    state = create_train_state(models.create("tiny_cnn", tw.CLASSES), tx, jax.random.key(0),
                               (1, tw.IMAGE, tw.IMAGE, tw.CHANNELS), mesh)
    images, labels = tw.dataset_arrays()
    batch = parallel.shard_batch({"image": images[:tw.BATCH], "label": labels[:tw.BATCH]}, mesh)
    texts = [parallel.jit_train_step(functools.partial(steps.train_step, multilabel=False), mesh)
             .lower(state, batch, parallel.replicate(jax.random.key(1), mesh)).as_text() for _ in range(2)]
    assert texts[0].splitlines()[0].startswith("module @jit_train_step ")
    assert texts[0] == texts[1]


def test_maybe_initialize_distributed(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.maybe_initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        parallel.maybe_initialize_distributed()
