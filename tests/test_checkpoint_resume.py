"""Checkpoints and resume: stop/resume and kill -9/resume reproduce the straight run exactly;
best checkpoint, extras, NaN stop, metrics.jsonl, saved variables."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import _train_worker as tw
from rosjax import checkpoint, models
from rosjax.config import OptimConfig
from rosjax.train import classifier, loop, parallel

WORKER = pathlib.Path(__file__).with_name("_train_worker.py")


def _fit(workdir, epochs):
    return tw.run_counting_fit(workdir, parallel.make_mesh(), epochs=epochs,
                               cfg=tw.loop_config(checkpoint_every_steps=3))


def _assert_same_variables(result, variables):
    """Parameters and BatchNorm statistics are bit-for-bit those of the straight run."""
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.variables),
                 variables)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two epochs in one go: (workdir, final variables)."""
    workdir = tmp_path_factory.mktemp("straight")
    result = _fit(workdir, 2)
    assert int(result.extras["epochs"]) == 2
    return workdir, jax.device_get(result.state.variables)


def test_stop_after_one_epoch_then_resume(straight, tmp_path):
    first = _fit(tmp_path, 1)
    assert [r["epoch"] for r in first.history] == [1]
    second = _fit(tmp_path, 2)  # same workdir: resumes at step 6 with the iterator position
    assert [r["epoch"] for r in second.history] == [2]
    _assert_same_variables(second, straight[1])
    assert int(second.extras["epochs"]) == 2  # restored 1, then one more epoch end

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    # learning_rate 0.05 divided by 10 from epoch 1 (milestones=(1,)).
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.005], rel=1e-6)
    assert records[1]["step"] == 2 * tw.STEPS_PER_EPOCH
    assert all(np.isfinite(r["train"]["loss"]) for r in records)


def test_kill_9_mid_epoch_then_resume(straight, tmp_path):
    # Steps per epoch 6, checkpoints every 2 steps: the process dies right after the 11th
    # step call, while the checkpoint of step 10 (mid epoch 2) may still be being written.
    proc = subprocess.run([sys.executable, str(WORKER), "fit", "--workdir", str(tmp_path),
                           "--kill-at-call", "11"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = checkpoint.RunCheckpoints(tmp_path)
    latest = ckpts.latest_step()
    ckpts.close()
    assert latest in (8, 10)  # both mid-epoch; 10 only if its save finished before the kill
    result = _fit(tmp_path, 2)
    assert [r["epoch"] for r in result.history] == [2]
    _assert_same_variables(result, straight[1])


def test_restore_onto_a_one_device_mesh(straight):
    """A checkpoint written on 4 devices restores onto another mesh's shardings."""
    st, _, _ = tw.make_state_and_step(parallel.make_mesh())
    one = parallel.replicated(parallel.make_mesh(jax.devices()[1:2]))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), st)
    ckpts = checkpoint.RunCheckpoints(straight[0])
    try:
        restored = ckpts.restore(ckpts.latest_step(), abstract_state=target)
    finally:
        ckpts.close()
    kernel = restored.state.params["conv1"]["kernel"]
    assert kernel.sharding.device_set == {jax.devices()[1]}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state.variables),
                 straight[1])
    assert restored.meta["step"] == 2 * tw.STEPS_PER_EPOCH


def test_resume_refuses_a_different_epoch_length(straight):
    mesh = parallel.make_mesh()
    st, step, _ = tw.make_state_and_step(mesh)
    with pytest.raises(ValueError, match="steps_per_epoch=6, this run has 3"):
        loop.fit(st, step, tw.train_iter(), run_key=jax.random.key(0), num_epochs=2,
                 steps_per_epoch=3, workdir=straight[0], mesh=mesh, cfg=tw.loop_config())


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # Metrics are read every 2 steps, checkpoints written every 3: the NaN of batch 9 is
    # seen after step 10, when the checkpoint of step 9 (taken after a clean read) exists.
    with pytest.raises(loop.NonFiniteError, match=r"non-finite loss = nan, .* at step 9 "):
        tw.run_fit(tmp_path, parallel.make_mesh(), epochs=2,
                   cfg=tw.loop_config(checkpoint_every_steps=3),
                   iterator=tw.train_iter(nan_batch=9))
    st, _, _ = tw.make_state_and_step(parallel.make_mesh())
    ckpts = checkpoint.RunCheckpoints(tmp_path)
    try:
        assert ckpts.latest_step() == 9
        restored = ckpts.restore(9, abstract_state=checkpoint.abstract_like(st))
    finally:
        ckpts.close()
    assert int(restored.state.step) == 9
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(
        restored.state.params)))
    assert restored.iterator_state == {"next_index": 9}  # resumes at the NaN batch
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 only


def test_train_classifier_keeps_and_exports_the_best_epoch(tmp_path):
    scores = iter([0.9, 0.5])  # validation f1_macro of epochs 1 and 2
    seen = []

    def evaluate(state, extras):
        seen.append(jax.device_get(state.variables))
        return {"f1_macro": next(scores), "auroc_macro": 0.5}

    optim_cfg = OptimConfig(epochs=2, batch_size=tw.BATCH, learning_rate=0.05, milestones=(2,))
    result = classifier.train_classifier(
        models.create("tiny_cnn", tw.CLASSES),
        tw.train_iter, evaluate, tmp_path, optim_cfg=optim_cfg,
        steps_per_epoch=tw.STEPS_PER_EPOCH, image_shape=(tw.IMAGE, tw.IMAGE, tw.CHANNELS),
        multilabel=False, loop_cfg=tw.loop_config(checkpoint_every_steps=0))
    assert result.best_step == tw.STEPS_PER_EPOCH
    final = checkpoint.load_variables(tmp_path / classifier.FINAL_DIR)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(final), seen[0])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.variables), seen[0])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val"]["f1_macro"] for r in records] == [0.9, 0.5]
    assert [r["best_value"] for r in records] == [0.9, 0.9]
    assert sorted(int(p.name) for p in (tmp_path / "best").iterdir()) == [tw.STEPS_PER_EPOCH]
    # The last state (epoch 2) differs from the exported best one (epoch 1).
    assert not np.array_equal(jax.device_get(result.fit.state.params["fc"]["kernel"]),
                              seen[0]["params"]["fc"]["kernel"])


def test_save_and_load_variables_onto_another_sharding(tmp_path):
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    variables = {"params": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
                 "batch_stats": {"mean": rng.normal(size=(4,)).astype(np.float32)}}
    on_mesh = jax.device_put(variables, parallel.replicated(mesh))
    checkpoint.save_variables(tmp_path / "model", on_mesh)
    loaded = checkpoint.load_variables(tmp_path / "model")
    assert loaded["params"]["w"].sharding.device_set == {jax.local_devices()[0]}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), variables)
    two = parallel.make_mesh(jax.devices()[:2])
    loaded_2 = checkpoint.load_variables(tmp_path / "model", parallel.replicated(two))
    assert len(loaded_2["params"]["w"].sharding.device_set) == 2
    with pytest.raises(FileNotFoundError, match="missing"):
        checkpoint.load_variables(tmp_path / "missing")
