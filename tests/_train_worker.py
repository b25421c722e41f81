"""Shared fixtures of the engine tests, and the entry point of their subprocesses.

A tiny classification run: `tiny_cnn`, 16-px RGB images, 3 classes, 48 examples, global
batch 8 (6 steps per epoch), from an in-memory grain pipeline (checkpointable, reshuffled
every epoch). The same code runs in-process (4 fake CPU devices from conftest.py) and in the
subprocesses below, which set their own XLA flags before importing JAX:

    python tests/_train_worker.py fit --workdir W --epochs 2 [--kill-at-call K]
            [--kill EVENT:N[:DELAY_S]] [--with-eval] [--out OUT.npz]
        trains like `run_counting_fit`; with --kill-at-call it SIGKILLs itself right after the K-th
        step call, i.e. while the checkpoint issued after step K-1 may still be writing. --kill
        is the general form (see `install_killer`: step, save, tmpdir, eval events); --with-eval
        adds `evaluate_state` as evaluate and its 'score' as best metric; --out writes the
        final variables and extras (`save_final`).
    python tests/_train_worker.py serve
        a fork server (`ForkServer`): imports JAX and the engine once, then for each request
        line {"argv": [...], "log": PATH} on stdin forks a child that runs `main(argv)` with its
        output in PATH, and answers {"returncode": RC} (-9 for SIGKILL) on stdout. Saves the
        ~5 s of imports per run; the parent never initialises a JAX backend, so forking is safe.
    python tests/_train_worker.py multihost --port P --process-id I --num-processes N
        --workdir W --out OUT.npz
        one of N processes joined by jax.distributed (gloo); each feeds its rows of every
        global batch and saves the final parameters to OUT.npz.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import threading
import traceback

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


@functools.cache
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


def evaluate_state(state, extras):
    """A deterministic, cheap evaluate(): statistics of the final layer (and the epoch count)."""
    import jax
    import numpy as np
    kernel = np.asarray(jax.device_get(state.params["fc"]["kernel"]), np.float64)
    return {"score": float(np.abs(kernel).sum()), "mean": float(kernel.mean()),
            "epochs": int(jax.device_get(extras["epochs"]))}


def eval_loop_config(**overrides):
    """`loop_config` with `evaluate_state`'s 'score' as the best metric."""
    return loop_config(**{"best_metric": "score", "best_mode": "max", **overrides})


def save_final(result, out):
    """Writes a FitResult's final variables and extras to `out` (.npz, keys 'variables/...',
    'extras/...'); `load_final` reads them back as {key: numpy array}."""
    import jax
    import numpy as np
    trees = {"variables": jax.device_get(result.state.variables),
             "extras": jax.device_get(result.extras)}
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(trees)[0]}
    np.savez(out, **flat)


def load_final(out):
    import numpy as np
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def metrics_without_timing(workdir):
    """metrics.jsonl records without the wall-clock fields (the rest is deterministic)."""
    records = [json.loads(line) for line in
               (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("images_per_s", None)
        record.pop("epoch_seconds", None)
    return records


DAMAGE_KINDS = ("truncated_file", "missing_item", "broken_json", "flipped_bytes")


def damage(folder, kind: str) -> pathlib.Path:
    """Damages the checkpoint folder `folder` (a step folder, or a `save_variables` folder)
    the way a bad disk or an interrupted copy would; returns the file or folder it changed.

      truncated_file  the largest array data file (`.../d/<hash>`) loses its second half
      missing_item    the `state` item folder is gone (a step folder only)
      broken_json     a JSON metadata file is cut in half (`meta/metadata` in a step folder,
                      `_METADATA` in a variables folder)
      flipped_bytes   one byte in the middle of the largest array data file is inverted
    """
    import shutil
    folder = pathlib.Path(folder)
    data_files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(data_files, key=lambda p: p.stat().st_size)
    if kind == "truncated_file":
        largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
        return largest
    if kind == "missing_item":
        shutil.rmtree(folder / "state")
        return folder / "state"
    if kind == "broken_json":
        step_folder = (folder / "meta").is_dir()
        target = folder / "meta" / "metadata" if step_folder else folder / "_METADATA"
        text = target.read_text()
        json.loads(text)  # it was valid JSON
        target.write_text(text[:len(text) // 2])
        return target
    if kind == "flipped_bytes":
        data = bytearray(largest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        largest.write_bytes(bytes(data))
        return largest
    raise ValueError(f"damage kind must be one of {DAMAGE_KINDS}, got {kind!r}")


KILL_EVENTS = ("step", "save", "tmpdir", "eval")


def _kill_in(delay_s: float) -> None:
    if delay_s <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
    timer = threading.Timer(delay_s, os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()


def install_killer(event: str, count: int, delay_s: float = 0.0, workdir=None) -> None:
    """Makes this process SIGKILL itself `delay_s` seconds after the `count`-th `event`:

      step    a step call of `loop.fit` returned (the step itself may still be running on the
              devices; with a delay, a moment during the following steps);
      save    `RunCheckpoints.save` or `.save_best` returned (the write goes on in the
              background: with a small delay, a moment mid-write);
      tmpdir  a new temporary checkpoint folder (`*.orbax-checkpoint-tmp*`) appeared under
              `workdir`/ckpt or /best (mid-save, before the rename; polled every ms);
      eval    an evaluate() call of `loop.fit` started (mid-evaluation).

    It patches `rosjax.train.loop.fit` and `rosjax.checkpoint.RunCheckpoints`, so it works for
    anything that trains through them (e.g. the experiment CLI run in-process after this).
    """
    if event not in KILL_EVENTS:
        raise ValueError(f"kill event must be one of {KILL_EVENTS}, got {event!r}")
    from rosjax import checkpoint
    from rosjax.train import loop
    seen = collections.Counter()
    lock = threading.Lock()

    def hit(name):
        with lock:
            seen[name] += 1
            if name == event and seen[name] == count:
                _kill_in(delay_s)

    original_fit = loop.fit

    def fit(state, step_fn, *args, evaluate=None, **kwargs):
        def step(*step_args):
            out = step_fn(*step_args)
            hit("step")
            return out
        wrapped_eval = None
        if evaluate is not None:
            def wrapped_eval(st, extras):
                hit("eval")
                return evaluate(st, extras)
        return original_fit(state, step, *args, evaluate=wrapped_eval, **kwargs)

    loop.fit = fit
    for name in ("save", "save_best"):
        original = getattr(checkpoint.RunCheckpoints, name)

        def saving(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            if out is not False:  # save_best returns False when it saved nothing
                hit("save")
            return out
        setattr(checkpoint.RunCheckpoints, name, saving)

    if event == "tmpdir":
        if workdir is None:
            raise ValueError("the tmpdir kill event needs the work directory")
        folders = [pathlib.Path(workdir) / "ckpt", pathlib.Path(workdir) / "best"]

        def watch():
            known = set()
            while True:
                for folder in folders:
                    try:
                        names = [e.name for e in os.scandir(folder)]
                    except FileNotFoundError:
                        continue
                    for name in names:
                        if ".orbax-checkpoint-tmp" in name and (folder, name) not in known:
                            known.add((folder, name))
                            hit("tmpdir")
                threading.Event().wait(0.001)

        threading.Thread(target=watch, name="kill-watch", daemon=True).start()


def parse_kill(spec: str) -> tuple[str, int, float]:
    """'EVENT:N[:DELAY_S]' -> (event, n, delay)."""
    parts = spec.split(":")
    return parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0


def kill_spec(event: str, count: int, delay_s: float = 0.0) -> str:
    return f"{event}:{count}:{delay_s:.4f}"


def random_kill_specs(rng, n: int, *, max_step: int = 8, max_save: int = 3,
                      max_delay_s: float = 0.03) -> list[str]:
    """`n` kill moments drawn from a numpy Generator: a mix of the `install_killer` events,
    early enough in a run that the run is still going (counts are per process)."""
    specs = []
    for i in range(n):
        event = KILL_EVENTS[i % len(KILL_EVENTS)] if i < len(KILL_EVENTS) else str(
            rng.choice(KILL_EVENTS))
        count = {"step": lambda: rng.integers(1, max_step + 1),
                 "save": lambda: rng.integers(1, max_save + 1),
                 "tmpdir": lambda: rng.integers(1, max_save + 1),
                 "eval": lambda: 1}[event]()
        delay = 0.0 if event == "tmpdir" or rng.random() < 0.3 else rng.uniform(0, max_delay_s)
        specs.append(kill_spec(event, int(count), float(delay)))
    return specs


class ForkServer:
    """Runs `main(argv)` of this module in forked children of one long-lived server process.

        with ForkServer() as server:
            rc = server.run(["fit", "--workdir", W, "--kill", "step:3"], log_path)
    """

    def __init__(self, timeout_s: float = 300):
        self._timeout_s = timeout_s
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        self._proc = subprocess.Popen([sys.executable, str(pathlib.Path(__file__)), "serve"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env=env, cwd=str(pathlib.Path(__file__).parent))

    def run(self, argv, log_path) -> int:
        """Runs one child; returns its exit status (negative: killed by that signal)."""
        self._proc.stdin.write(json.dumps({"argv": [str(a) for a in argv],
                                           "log": str(log_path)}) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], self._timeout_s)
        if not ready:
            self.close()
            raise TimeoutError(f"worker {argv} did not finish in {self._timeout_s} s; "
                               f"its log: {log_path}")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self._proc.wait()})")
        return json.loads(line)["returncode"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve() -> None:
    """The fork server's loop (see the module docstring)."""
    import flax  # noqa: F401
    import grain  # noqa: F401
    import jax  # noqa: F401 - imported once here; the backend starts in each child
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401

    from rosjax import checkpoint, models  # noqa: F401
    from rosjax.train import loop, optim, parallel, state, steps  # noqa: F401
    assert threading.active_count() == 1, threading.enumerate()  # fork needs a lone thread
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                main(request["argv"])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        sys.stdout.write(json.dumps({"returncode": code}) + "\n")
        sys.stdout.flush()


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("fit", "multihost", "serve"))
    parser.add_argument("--workdir")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--kill-at-call", type=int, default=None)
    parser.add_argument("--kill", default=None, help="EVENT:N[:DELAY_S], see install_killer")
    parser.add_argument("--with-eval", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--port", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        _serve()
        return
    if args.workdir is None:
        parser.error("--workdir is required")

    if args.mode == "fit":
        _use_cpu_devices(4)
        from rosjax.train import parallel
        if args.kill:
            install_killer(*parse_kill(args.kill), workdir=args.workdir)
        wrapper = _kill_after(args.kill_at_call) if args.kill_at_call else None
        extra = {}
        if args.with_eval:
            extra = dict(evaluate=evaluate_state,
                         cfg=eval_loop_config(checkpoint_every_steps=args.checkpoint_every))
        elif args.checkpoint_every != 2:
            extra = dict(cfg=loop_config(checkpoint_every_steps=args.checkpoint_every))
        result = run_counting_fit(args.workdir, parallel.make_mesh(), epochs=args.epochs,
                                  step_wrapper=wrapper, **extra)
        if args.out:
            save_final(result, args.out)
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
