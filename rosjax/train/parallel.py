"""Data parallelism: a 1-D ('data',) device mesh, shardings, batch placement and jitted steps.

This is what the paper's "pmap" means, written the current JAX way: one `jax.jit` program over
global arrays, the parameters replicated (`P()`), the batch split along its first axis across
every device (`P('data')`). Under jit the model sees the *global* batch, so the mean loss, its
gradient and BatchNorm's batch statistics all cover every example on every device; XLA
inserts the all-reduces. No `pmap`, no `axis_name`, no `pmean`.

Several hosts: call `maybe_initialize_distributed()` first thing in the program; every process
then runs the same code, feeds its own slice of the global batch (`shard_batch` uses
`jax.make_array_from_process_local_data`), and the mesh spans the devices of all processes.
"""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh named 'data' over `devices` (default: every device of every process).

    The axis type is `Auto` (explicitly, since `jax.make_mesh` defaults to `Explicit`): the
    compiler propagates shardings through the linen model, as data parallelism needs.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
    """Every device holds the whole array (parameters, optimiser state, scalar metrics)."""
    return jax.NamedSharding(mesh, jax.P())


def data_sharding(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
    """The leading (batch) axis is split across the 'data' axis."""
    return jax.NamedSharding(mesh, jax.P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """Raises ValueError unless the global batch splits evenly over the mesh's devices."""
    devices = mesh.devices.size
    if batch_size <= 0 or batch_size % devices:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by the number of devices "
            f"{devices}: choose a batch size that is a multiple of {devices} (e.g. "
            f"{max(devices, batch_size // devices * devices)}) or run on fewer devices")
    if batch_size % jax.process_count():
        raise ValueError(f"global batch size {batch_size} is not divisible by the number of "
                         f"processes {jax.process_count()}")


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Host batch (pytree of numpy arrays, this process's rows) -> global arrays split on 'data'.

    With one process the local batch is the global batch; with P processes each passes its
    B/P rows and the result is one [B, ...] array spanning all hosts.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("shard_batch: empty batch")
    check_batch_size(np.shape(leaves[0])[0] * jax.process_count(), mesh)
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Host values that every process holds identically -> global arrays replicated on the mesh.

    Works with several processes, where `jax.device_put` onto a sharding that spans other
    hosts' devices is not allowed. Typed PRNG keys (`jax.random.key`) are supported.
    """
    sharding = replicated(mesh)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(np.asarray(jax.random.key_data(x)))
            wrap = functools.partial(jax.random.wrap_key_data, impl=str(jax.random.key_impl(x)))
            return jax.jit(wrap, out_shardings=sharding)(data)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def _program_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", type(fn).__name__)


_CALLING = threading.local()  # .run: the RunProgram whose call is tracing a program on this thread


@functools.lru_cache(maxsize=64)
def _shared_jit(fn: Callable, mesh: jax.sharding.Mesh, kind: str) -> Any:
    """The one `jax.jit` of `fn` on `mesh` in this process, for every run that passes this `fn`.

    jit keeps one compiled program per argument signature (shapes, dtypes and the static
    fields of the state: `apply_fn`, `tx`), so the runs of one architecture and recipe (the
    student settings, the sweep points) share a program without tracing, lowering or reading
    it from the persistent cache again (a CPU smoke run traced its 200 programs in a minute).
    Sharing needs the same `fn` object: build step functions with cached factories
    (`rosjax.train.steps.bound_train_step`, `rosjax.distill.steps.make_distill_step`).
    The jitted function keeps `fn`'s name: the name is part of the lowered module, and so of
    the key of JAX's persistent compilation cache, so every process's program of one
    architecture and step carries the same name and loads what another process compiled.
    """
    def program(*args):
        run = getattr(_CALLING, "run", None)
        if run is not None:
            run.traced()  # raises on a run's second trace, before anything compiles or runs
        return fn(*args)

    program.__name__ = program.__qualname__ = _program_name(fn)
    rep, dat = replicated(mesh), data_sharding(mesh)
    if kind == "eval":
        return jax.jit(program, in_shardings=(rep, dat), out_shardings=rep)
    in_shardings = (rep, rep, dat, rep) if kind == "train_frozen" else (rep, dat, rep)
    return jax.jit(program, in_shardings=in_shardings, out_shardings=(rep, rep), donate_argnums=(0,))


class RunProgram:
    """One run's handle on a shared jitted program: it may compile once per run, not twice.

    A jitted step is compiled (minutes for DenseNet-121) once per argument signature; a second
    compile within one run means an argument changed shape, dtype, weak type or structure
    between calls (say a state whose step counter became a Python int), and every epoch would
    pay a compile. The first call of a run may trace (a new architecture) or reuse a program an
    earlier run compiled; a later call that would trace raises AssertionError naming it, while
    tracing, before anything is compiled or run (the donated state is still intact).
    """

    def __init__(self, jitted: Any, name: str, frozen: tuple = ()):
        self._jitted, self._name, self._frozen = jitted, name, frozen  # frozen: () or (inputs,)
        self._called = False

    def _arguments(self, args: tuple) -> tuple:
        """The program's arguments: the frozen inputs go second, after the (donated) state."""
        return (args[0], *self._frozen, *args[1:])

    def traced(self) -> None:
        """Called while a call of this run traces the program: allowed on the run's first call only."""
        if self._called:
            raise AssertionError(f"the jitted program {self._name} was traced 2 times in one run: an argument "
                                 "changed shape, dtype, weak type or structure between calls, so every call "
                                 "would compile")

    def __call__(self, *args):
        outer, _CALLING.run = getattr(_CALLING, "run", None), self
        try:
            return self._jitted(*self._arguments(args))
        finally:
            _CALLING.run, self._called = outer, True

    def lower(self, *args):
        """`jax.jit(...).lower` with this run's frozen inputs in place (for compiling ahead)."""
        return self._jitted.lower(*self._arguments(args))


def jit_train_step(step_fn: Callable, mesh: jax.sharding.Mesh, *, frozen: Any = None) -> RunProgram:
    """Compiles `step_fn(state, batch, key) -> (state, metrics)` for data parallelism.

    The state (argument 0) is donated, so its buffers are reused for the new state, and stays
    replicated; the batch is split on 'data' (every leaf has the batch axis first); the key
    and the metrics are replicated.

    With `frozen` (e.g. the teachers' variables, already on the devices), `step_fn` has the
    signature `step_fn(state, frozen, batch, key)` and the returned callable still takes
    `(state, batch, key)`: `frozen` is passed on every call as a separate, *non-donated*,
    replicated argument (never copied into the state, never written back).
    The jitted program is shared by every run passing the same `step_fn` (`_shared_jit`);
    each call of this function is one run, which may compile it once (`RunProgram`).
    """
    if frozen is None:
        return RunProgram(_shared_jit(step_fn, mesh, "train"), _program_name(step_fn))
    return RunProgram(_shared_jit(step_fn, mesh, "train_frozen"), _program_name(step_fn), frozen=(frozen,))


def compile_step(step_fn: Callable, state: Any, host_batch: Any, run_key: jax.Array, mesh: jax.sharding.Mesh) -> None:
    """Compiles a `jit_train_step` program for `state` and a batch like `host_batch`, and drops it.

    With JAX's persistent compilation cache on, this is compiling ahead: a training run that
    later calls the same step on the same shapes loads the program instead of compiling it
    (XLA compiles a program on one core, so another thread can compile the next one).
    """
    step_fn.lower(state, shard_batch(host_batch, mesh), replicate(run_key, mesh)).compile()


def jit_eval_step(eval_fn: Callable, mesh: jax.sharding.Mesh) -> RunProgram:
    """Compiles `eval_fn(state, batch) -> outputs`; outputs come back replicated.

    Replicated outputs can be read by every process (`np.asarray`), which is what a host-side
    metric over the whole split needs, also with several hosts. Evaluation batches have one
    size (the last one padded), so a run compiles the program once (`RunProgram`); runs
    passing the same `eval_fn` share it (`_shared_jit`).
    """
    return RunProgram(_shared_jit(eval_fn, mesh, "eval"), _program_name(eval_fn))


def maybe_initialize_distributed() -> bool:
    """Joins a multi-process run when the environment describes one; returns True if it did.

    Call it before anything else touches JAX. Recognised environments:

    * `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i` (any
      launcher, e.g. two shells on one machine or one per node);
    * a SLURM job step with more than one task (`srun`), or Open MPI (`mpirun`): JAX detects
      the coordinator, process count and id itself.

    Otherwise (a plain single-process run) it does nothing. On CPU, processes exchange data
    through gloo collectives (`jax_cpu_collectives_implementation`, the default in JAX 0.10).
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={address} is set but {', '.join(missing)} "
                             "is not; set all three to join a multi-process run")
        jax.distributed.initialize(address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
        return True
    in_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ
    in_mpi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if in_slurm or in_mpi:
        jax.distributed.initialize()
        return True
    return False
