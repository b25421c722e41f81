"""How checkpoints are stored: arrays uncompressed, and compressed ones (rosjax 0.1) still restore.

The reference sizes are the arrays' own byte counts (numpy's `nbytes`): 1 MiB of zeros, which
zstd (Orbax's default codec) shrinks to a few hundred bytes, takes at least 1 MiB on disk only
if it is stored uncompressed.
"""
import pathlib

import _train_worker as tw
import jax
import numpy as np
import orbax.checkpoint as ocp

from rosjax import checkpoint, checkpoint_meta
from rosjax.train import parallel

ZEROS = np.zeros((256, 1024), np.float32)  # 1 MiB


def _bytes_under(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_resume_best_and_final_arrays_are_stored_uncompressed(tmp_path):
    state = {"w": jax.device_put(ZEROS)}
    with checkpoint.RunCheckpoints(tmp_path) as ckpts:
        ckpts.save(2, state=state, run_key=jax.random.key(0), meta={}, iterator_state={},
                   extras={"avg": jax.device_put(ZEROS)})
        ckpts.save_best(2, 1.0, state=state, run_key=jax.random.key(0), meta={})
    checkpoint.save_variables(tmp_path / "final", state)
    for folder in (tmp_path / "ckpt" / "2" / "state", tmp_path / "ckpt" / "2" / "extras",
                   tmp_path / "best" / "2" / "state", tmp_path / "final"):
        assert _bytes_under(folder) >= ZEROS.nbytes, folder


def test_a_compressed_best_checkpoint_and_compressed_variables_still_restore(tmp_path):
    rng = np.random.default_rng(0)
    values = {"w": rng.normal(size=(64, 32)).astype(np.float32), "step": np.int32(4)}
    key = jax.random.key(5)
    # What rosjax 0.1 wrote: Orbax's default StandardSave (zstd) items.
    manager = ocp.CheckpointManager(tmp_path / "best", options=ocp.CheckpointManagerOptions(
        best_fn=lambda m: m["value"], enable_async_checkpointing=False))
    manager.save(4, args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.device_put(values)),
        meta=ocp.args.JsonSave({"step": 4, "run_key": checkpoint_meta.key_to_json(key)})),
        metrics={"value": 0.5})
    manager.close()
    writer = ocp.StandardCheckpointer()
    writer.save(tmp_path / "final", jax.device_put(values))
    writer.wait_until_finished()
    writer.close()

    with checkpoint.RunCheckpoints(tmp_path) as ckpts:
        restored = ckpts.restore_best(abstract_state=checkpoint.abstract_like(jax.device_put(values)))
    assert restored.step == 4
    np.testing.assert_array_equal(jax.device_get(restored.state["w"]), values["w"])
    np.testing.assert_array_equal(jax.random.key_data(restored.run_key), jax.random.key_data(key))
    loaded = checkpoint.load_variables(tmp_path / "final")
    np.testing.assert_array_equal(np.asarray(loaded["w"]), values["w"])
    assert int(loaded["step"]) == 4


def test_the_best_checkpoint_holds_the_model_without_the_optimiser_state(tmp_path):
    """The best epoch is kept to be exported, never to resume from: its momentum buffers (as
    many bytes as the parameters under SGD with momentum) are not written."""
    mesh = parallel.make_mesh()
    result = tw.run_counting_fit(tmp_path, mesh, epochs=2, cfg=tw.eval_loop_config(checkpoint_every_steps=0),
                                 evaluate=tw.evaluate_state)
    with checkpoint.RunCheckpoints(tmp_path) as ckpts:
        step = ckpts.best_step()
        assert step is not None
        restored = ckpts.restore_best(abstract_state=checkpoint.abstract_like(result.state.model_state()),
                                      abstract_extras=checkpoint.abstract_like(result.extras))
        same_epoch = ckpts.restore(step, abstract_state=checkpoint.abstract_like(result.state),
                                   abstract_extras=checkpoint.abstract_like(result.extras))
    def stored_keys(folder):
        return set(ocp.PyTreeCheckpointer().metadata(folder / "state").item_metadata.tree)

    assert stored_keys(tmp_path / "best" / str(step)) == {"params", "batch_stats"}
    assert stored_keys(tmp_path / "ckpt" / str(step)) == {"step", "params", "batch_stats", "opt_state"}
    # The model of the best epoch, as its resume checkpoint (kept: 2 epochs, 2 kept) holds it.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state.variables),
                 jax.device_get(same_epoch.state.variables))
