"""Checkpoints and resume: stop/resume and kill -9/resume reproduce the straight run exactly;
best checkpoint, extras, NaN stop, metrics.jsonl, saved variables; leftover temporary folders;
damaged checkpoints (checksum manifests, fallback to an earlier step, clear errors)."""
import json
import logging
import pathlib
import subprocess
import sys

import _train_worker as tw
import jax
import numpy as np
import pytest

from rosjax import checkpoint, checkpoint_integrity, models
from rosjax.config import OptimConfig
from rosjax.train import classifier, loop, parallel, start

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


def test_without_a_final_checkpoint_a_rerun_retrains_the_last_epoch_to_the_same_numbers(straight, tmp_path):
    """`final_checkpoint=False` (the experiment's stages): the last save is the mid-epoch one
    of step 9 (checkpoints every 3 steps), and a process killed after training but before
    exporting retrains from there, to the straight run's variables and metrics."""
    cfg = tw.loop_config(checkpoint_every_steps=3, final_checkpoint=False)
    first = tw.run_counting_fit(tmp_path, parallel.make_mesh(), epochs=2, cfg=cfg)
    _assert_same_variables(first, straight[1])
    with checkpoint.RunCheckpoints(tmp_path) as ckpts:
        assert ckpts.latest_step() == 9
    again = tw.run_counting_fit(tmp_path, parallel.make_mesh(), epochs=2, cfg=cfg)
    assert [r["epoch"] for r in again.history] == [2]
    _assert_same_variables(again, straight[1])
    assert int(again.extras["epochs"]) == 2
    assert tw.metrics_without_timing(tmp_path) == tw.metrics_without_timing(straight[0])


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
    # Epoch 2's train means cover its steps before the kill too (carried by the checkpoint).
    assert tw.metrics_without_timing(tmp_path) == tw.metrics_without_timing(straight[0])


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
    final = checkpoint.load_variables(tmp_path / start.FINAL_DIR)
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


# --- Leftover temporary folders, one manager per directory -------------------------------


def _leftover(root: pathlib.Path, files: int = 200) -> list[pathlib.Path]:
    """Fake unfinished saves (what a kill mid-save leaves): nested tmp folders with files."""
    made = []
    for sub, step in (("ckpt", 10), ("best", 6)):
        tmp = root / sub / f"{step}.orbax-checkpoint-tmp"
        for item in ("state", "extras"):
            d = tmp / f"{item}.orbax-checkpoint-tmp" / "d"
            d.mkdir(parents=True)
            for i in range(files):
                (d / f"{i:04d}").write_bytes(b"x" * 64)
        made.append(tmp)
    return made


def test_leftover_tmp_folders_are_removed_before_the_managers_open(tmp_path):
    """The resume race: Orbax removed leftover tmp folders in a background thread that close()
    did not wait for, so the next manager on the directory deleted the same folder
    concurrently (FileNotFoundError: 'extras.orbax-checkpoint-tmp')."""
    rng = np.random.default_rng(3)
    state = {"w": jax.device_put(rng.normal(size=(4, 3)).astype(np.float32))}
    leftovers = _leftover(tmp_path)
    for _ in range(3):  # open, close, open again at once: the sequence that raced
        ckpts = checkpoint.RunCheckpoints(tmp_path)
        try:
            assert not any(p.exists() for p in leftovers)  # gone before the constructor returns
            assert ckpts.latest_step() is None
        finally:
            ckpts.close()
        leftovers = _leftover(tmp_path)
    with checkpoint.RunCheckpoints(tmp_path) as ckpts:
        ckpts.save(10, state=state, run_key=jax.random.key(0), meta={}, iterator_state={})
        ckpts.save_best(6, 1.0, state=state, run_key=jax.random.key(0), meta={})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["10"]
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["6"]


def test_one_open_run_checkpoints_per_directory(tmp_path):
    first = checkpoint.RunCheckpoints(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="already open in this process"):
            checkpoint.RunCheckpoints(tmp_path)
        checkpoint.RunCheckpoints(tmp_path / "other").close()  # another directory is fine
    finally:
        first.close()
    first.close()  # idempotent
    checkpoint.RunCheckpoints(tmp_path).close()  # and reopenable once closed


# --- Damaged checkpoints -----------------------------------------------------------------


def _saved_steps(root: pathlib.Path, steps=(1, 2)) -> dict[int, dict]:
    """Resume checkpoints of numpy-made values at `steps`; returns what each step holds."""
    rng = np.random.default_rng(7)
    saved = {}
    with checkpoint.RunCheckpoints(root) as ckpts:
        for step in steps:
            values = {"state": {"w": rng.normal(size=(64, 32)).astype(np.float32),
                                "b": rng.normal(size=(32,)).astype(np.float32),
                                "step": np.int32(step)},
                      "extras": {"avg": rng.normal(size=(16,)).astype(np.float32)},
                      "position": {"next_index": 10 * step}}
            ckpts.save(step, state=jax.device_put(values["state"]), run_key=jax.random.key(step),
                       meta={"step": step}, iterator_state=values["position"],
                       extras=jax.device_put(values["extras"]))
            saved[step] = values
    for step in steps:
        assert (root / "ckpt" / str(step) / checkpoint_integrity.MANIFEST_FILE).is_file()
    return saved


def _targets(values):
    return (checkpoint.abstract_like(jax.device_put(values["state"])),
            checkpoint.abstract_like(jax.device_put(values["extras"])))


def _assert_restored(restored, values, step):
    assert restored.step == step
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), values["state"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.extras),
                 values["extras"])
    assert restored.iterator_state == values["position"]
    assert restored.meta == {"step": step}
    np.testing.assert_array_equal(jax.random.key_data(restored.run_key),
                                  jax.random.key_data(jax.random.key(step)))


def test_intact_checkpoints_restore_and_match_their_manifest(tmp_path):
    saved = _saved_steps(tmp_path)
    for step in (1, 2):
        assert checkpoint_integrity.check_folder(tmp_path / "ckpt" / str(step)) == ("intact", None)
    state_t, extras_t = _targets(saved[2])
    with checkpoint.RunCheckpoints(tmp_path) as ckpts:
        _assert_restored(ckpts.restore_latest(abstract_state=state_t, abstract_extras=extras_t),
                         saved[2], 2)
        _assert_restored(ckpts.restore(1, abstract_state=state_t, abstract_extras=extras_t),
                         saved[1], 1)
    # Restoring wrote nothing into the step folders: they still match their manifests.
    assert checkpoint_integrity.check_folder(tmp_path / "ckpt" / "2") == ("intact", None)


@pytest.mark.parametrize("kind", tw.DAMAGE_KINDS)
def test_damaged_latest_falls_back_to_the_earlier_step(tmp_path, caplog, kind):
    saved = _saved_steps(tmp_path)
    damaged = tmp_path / "ckpt" / "2"
    tw.damage(damaged, kind)
    assert checkpoint_integrity.check_folder(damaged)[0] == "damaged"
    state_t, extras_t = _targets(saved[1])
    with caplog.at_level(logging.WARNING, logger="rosjax.checkpoint"):
        with checkpoint.RunCheckpoints(tmp_path) as ckpts:
            restored = ckpts.restore_latest(abstract_state=state_t, abstract_extras=extras_t)
            _assert_restored(restored, saved[1], 1)
            assert ckpts.latest_step() == 1
            # The resumed run can write step 2 again: the damaged one was moved aside.
            ckpts.save(2, state=jax.device_put(saved[2]["state"]), run_key=jax.random.key(2),
                       meta={"step": 2}, iterator_state=saved[2]["position"],
                       extras=jax.device_put(saved[2]["extras"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"checkpoint {damaged} is damaged" in w for w in warnings), warnings
    assert (tmp_path / "damaged" / "ckpt-2").is_dir()
    with checkpoint.RunCheckpoints(tmp_path) as ckpts:
        _assert_restored(ckpts.restore_latest(abstract_state=state_t, abstract_extras=extras_t),
                         saved[2], 2)


@pytest.mark.parametrize("kind", ["missing_item", "broken_json"])
def test_damaged_latest_without_manifest_falls_back_when_it_does_not_restore(
        tmp_path, caplog, kind):
    """Killed between the save and its manifest: unverified; it counts if it restores."""
    saved = _saved_steps(tmp_path)
    (tmp_path / "ckpt" / "2" / checkpoint_integrity.MANIFEST_FILE).unlink()
    assert checkpoint_integrity.check_folder(tmp_path / "ckpt" / "2")[0] == "unverified"
    state_t, extras_t = _targets(saved[1])
    with checkpoint.RunCheckpoints(tmp_path) as ckpts:  # unverified but whole: it is used
        _assert_restored(ckpts.restore_latest(abstract_state=state_t, abstract_extras=extras_t),
                         saved[2], 2)
    tw.damage(tmp_path / "ckpt" / "2", kind)
    with caplog.at_level(logging.WARNING, logger="rosjax.checkpoint"):
        with checkpoint.RunCheckpoints(tmp_path) as ckpts:
            _assert_restored(ckpts.restore_latest(abstract_state=state_t,
                                                  abstract_extras=extras_t), saved[1], 1)
    assert any(f"{tmp_path / 'ckpt' / '2'} is damaged" in r.getMessage()
               and "no checksum manifest" in r.getMessage() for r in caplog.records)


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    saved = _saved_steps(tmp_path)
    tw.damage(tmp_path / "ckpt" / "1", "flipped_bytes")
    tw.damage(tmp_path / "ckpt" / "2", "truncated_file")
    state_t, extras_t = _targets(saved[1])
    with checkpoint.RunCheckpoints(tmp_path) as ckpts:
        with pytest.raises(checkpoint.CheckpointError) as info:
            ckpts.restore_latest(abstract_state=state_t, abstract_extras=extras_t)
        with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint .*ckpt/1 is damaged"):
            ckpts.restore(1, abstract_state=state_t, abstract_extras=extras_t)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(tmp_path / "ckpt" / "1") in message and str(tmp_path / "ckpt" / "2") in message
    assert "sha256" in message and f"Delete {tmp_path / 'ckpt'}" in message
    assert (tmp_path / "ckpt" / "2").is_dir()  # nothing moved when nothing restored


def test_fit_resumes_from_the_step_before_a_damaged_one(straight, tmp_path, caplog):
    _fit(tmp_path, 1)  # checkpoints at steps 3 and 6 (the epoch end)
    tw.damage(tmp_path / "ckpt" / "6", "flipped_bytes")
    with caplog.at_level(logging.WARNING, logger="rosjax.checkpoint"):
        result = _fit(tmp_path, 2)  # resumes at step 3: reruns the end of epoch 1
    assert any("ckpt/6 is damaged" in r.getMessage() for r in caplog.records)
    assert [r["epoch"] for r in result.history] == [1, 2]
    _assert_same_variables(result, straight[1])
    assert int(result.extras["epochs"]) == 2
    assert tw.metrics_without_timing(tmp_path) == tw.metrics_without_timing(straight[0])


@pytest.mark.parametrize("kind", ["truncated_file", "broken_json", "flipped_bytes"])
def test_load_variables_of_a_damaged_folder_is_a_clear_error(tmp_path, kind):
    rng = np.random.default_rng(5)
    variables = {"params": {"w": rng.normal(size=(64, 32)).astype(np.float32)},
                 "batch_stats": {"mean": rng.normal(size=(32,)).astype(np.float32)}}
    checkpoint.save_variables(tmp_path / "model", jax.device_put(variables))
    checkpoint.save_variables(tmp_path / "model", jax.device_put(variables))  # overwrite: fresh
    assert checkpoint_integrity.check_folder(tmp_path / "model") == ("intact", None)
    tw.damage(tmp_path / "model", kind)
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"saved variables {tmp_path / 'model'} are damaged: .*delete "):
        checkpoint.load_variables(tmp_path / "model")


def test_load_variables_without_manifest(tmp_path):
    """Exports from before manifests: loaded if whole, a clear error if they do not restore."""
    rng = np.random.default_rng(6)
    variables = {"params": {"w": rng.normal(size=(8, 4)).astype(np.float32)}}
    checkpoint.save_variables(tmp_path / "model", jax.device_put(variables))
    (tmp_path / "model" / checkpoint_integrity.MANIFEST_FILE).unlink()
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(checkpoint.load_variables(tmp_path / "model")), variables)
    tw.damage(tmp_path / "model", "broken_json")
    with pytest.raises(checkpoint.CheckpointError, match="no checksum manifest.*do not restore"):
        checkpoint.load_variables(tmp_path / "model")
