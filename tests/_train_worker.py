"""Shared fixtures of the engine tests, and the entry point of their subprocesses.

A tiny classification run: `tiny_cnn`, 16-px RGB images, 3 classes, 48 examples, global
batch 8 (6 steps per epoch), from an in-memory grain pipeline (checkpointable, reshuffled
every epoch). The same code runs in-process (4 fake CPU devices from conftest.py) and in the
subprocesses below, which set their own XLA flags before importing JAX:

    python tests/_train_worker.py fit --workdir W --epochs 2 [--kill-at-call K]
        trains like `run_counting_fit`; with --kill-at-call it SIGKILLs itself right after the K-th
        step call, i.e. while the checkpoint issued after step K-1 may still be writing.
    python tests/_train_worker.py multihost --port P --process-id I --num-processes N
        --workdir W --out OUT.npz
        one of N processes joined by jax.distributed (gloo); each feeds its rows of every
        global batch and saves the final parameters to OUT.npz.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import signal
import sys

IMAGE, CHANNELS, CLASSES = 16, 3, 3
NUM_EXAMPLES, BATCH = 48, 8
STEPS_PER_EPOCH = NUM_EXAMPLES // BATCH
DATA_SEED, SHUFFLE_SEED, RUN_SEED = 0, 1, 2
CACHE_DIR = pathlib.Path.home() / ".cache" / "rosjax-test-jit"


def dataset_arrays(seed: int = DATA_SEED):
    """images [N, 16, 16, 3] in [0, 1], labels [N] int32, from a seeded numpy Generator."""
    import numpy as np
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, NUM_EXAMPLES).astype(np.int32)
    images = rng.random((NUM_EXAMPLES, IMAGE, IMAGE, CHANNELS), dtype=np.float32)
    images[..., 0] += 0.5 * labels[:, None, None]  # a learnable signal in channel 0
    return np.clip(images, 0.0, 1.0), labels


def train_iter(*, nan_batch: int | None = None, process_index: int = 0, process_count: int = 1):
    """Endless, checkpointable iterator of batches {'image', 'label', 'index'}.

    nan_batch: the batch (0-based) whose first image is set to NaN.
    process_index/count: this process keeps its contiguous share of every global batch.
    """
    import grain
    import numpy as np
    images, labels = dataset_arrays()
    records = [{"image": images[i], "label": labels[i], "index": np.int32(i)}
               for i in range(NUM_EXAMPLES)]
    rows = BATCH // process_count
    lo = process_index * rows

    def finish(i, batch):
        batch = {k: v[lo:lo + rows] for k, v in batch.items()}
        if i == nan_batch:
            batch["image"] = batch["image"].copy()
            batch["image"][0] = np.nan
        return batch

    ds = (grain.MapDataset.source(records).seed(SHUFFLE_SEED).shuffle().repeat()
          .batch(BATCH, drop_remainder=True).map_with_index(finish))
    return iter(ds.to_iter_dataset())


def make_state_and_step(mesh, *, epochs: int = 2):
    """A fresh copy of the initial TrainState (paper SGD recipe at a small learning rate), the
    compiled step and the schedule. The optimiser does not depend on `epochs` (the schedule is
    per step), so runs of any length share one state, one trace and one compilation."""
    del epochs
    import jax
    import jax.numpy as jnp
    initial, step, schedule = _initial_state_and_step(mesh)
    return jax.tree.map(jnp.copy, initial), step, schedule


@functools.lru_cache(maxsize=None)
def _initial_state_and_step(mesh):
    import jax
    from rosjax import models
    from rosjax.config import OptimConfig
    from rosjax.train import optim, parallel, state, steps
    cfg = OptimConfig(batch_size=BATCH, learning_rate=0.05, milestones=(1,))
    tx, schedule = optim.make_optimizer(cfg, STEPS_PER_EPOCH)
    init_key = jax.random.fold_in(jax.random.key(RUN_SEED), 0)
    st = state.create_train_state(models.create("tiny_cnn", CLASSES), tx, init_key,
                                  (1, IMAGE, IMAGE, CHANNELS), mesh)
    step = parallel.jit_train_step(functools.partial(steps.train_step, multilabel=False), mesh)
    return st, step, schedule


def loop_config(**overrides):
    from rosjax.train import loop
    base = dict(log_every_steps=2, checkpoint_every_steps=2, keep_checkpoints=2, progress=False)
    return loop.LoopConfig(**{**base, **overrides})


def run_fit(workdir, mesh, *, epochs: int = 2, step_wrapper=None, iterator=None, **fit_kwargs):
    """`loop.fit` on the tiny run; returns the FitResult."""
    import jax
    from rosjax.train import loop
    st, step, schedule = make_state_and_step(mesh, epochs=epochs)
    if step_wrapper is not None:
        step = step_wrapper(step)
    fit_kwargs.setdefault("cfg", loop_config())
    return loop.fit(st, step, iterator if iterator is not None else train_iter(),
                    run_key=jax.random.key(RUN_SEED), num_epochs=epochs,
                    steps_per_epoch=STEPS_PER_EPOCH, workdir=workdir, mesh=mesh,
                    schedule=schedule, **fit_kwargs)


def count_epochs(state, epoch, extras):
    """on_epoch_end hook: extras['epochs'] counts finished epochs (saved with the state)."""
    return {"epochs": extras["epochs"] + 1}


def run_counting_fit(workdir, mesh, *, epochs: int = 2, **kwargs):
    """`run_fit` with `count_epochs` as the epoch hook and its counter as the only extra."""
    import jax.numpy as jnp
    return run_fit(workdir, mesh, epochs=epochs, on_epoch_end=count_epochs,
                   extras={"epochs": jnp.zeros((), jnp.int32)}, **kwargs)


def _use_cpu_devices(count: int, extra_xla_flags: str = "") -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count} {extra_xla_flags}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _kill_after(calls_before_kill: int):
    """Wraps a step so that the process SIGKILLs itself right after call `calls_before_kill`."""
    def wrap(step):
        calls = [0]

        def killing_step(state, batch, key):
            out = step(state, batch, key)
            calls[0] += 1
            if calls[0] == calls_before_kill:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return killing_step
    return wrap


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("fit", "multihost"))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--kill-at-call", type=int, default=None)
    parser.add_argument("--port", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    if args.mode == "fit":
        _use_cpu_devices(4)
        from rosjax.train import parallel
        wrapper = _kill_after(args.kill_at_call) if args.kill_at_call else None
        run_counting_fit(args.workdir, parallel.make_mesh(), epochs=args.epochs,
                         step_wrapper=wrapper)
        return

    # gloo waits 30 s by default for the other process to join a collective; a loaded test
    # machine can fall further behind than that (e.g. while compiling).
    _use_cpu_devices(2, "--xla_cpu_collective_timeout_seconds=600")
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{args.port}",
                      JAX_NUM_PROCESSES=str(args.num_processes),
                      JAX_PROCESS_ID=str(args.process_id))
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from rosjax.train import parallel
    assert parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh()
    result = run_fit(args.workdir, mesh, epochs=1, cfg=loop_config(checkpoint_every_steps=0),
                     iterator=train_iter(process_index=jax.process_index(),
                                         process_count=jax.process_count()))
    params = jax.device_get(result.state.params)
    flat = {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(args.out, devices=np.int32(jax.device_count()), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
