"""Throughput benchmark: teachers, distillation (online vs cached teachers), engine loop, data.

Measures, on whatever devices JAX sees (CPU or GPU, unchanged):

* teacher training, per architecture and compute dtype: compile time, images/s of the bare
  jitted step (a Python loop over pre-placed device batches, one block_until_ready at the end),
  FLOPs per image counted from the jaxpr (`experiments.flops`: convolutions and matmuls, right
  on every platform, unlike XLA's cost analysis on GPU), the achieved FLOP/s and the model
  FLOP utilisation against the device's peak (known GPUs only); and images/s of the
  engine's loop (`rosjax.train.loop.fit` over an in-memory grain iterator of host batches,
  the same compiled step, compile excluded) with its ratio to the bare step;
* distillation, per dtype: the online step (every teacher runs on the batch, then the student
  step) against the cached step (`rosjax.distill.cache`: teacher logits come in the batch);
* the cache build (all teachers on stored views, `build_teacher_cache`), counted separately;
* the data pipeline: augmented images/s per grain worker count, and the cached (view replay)
  pipeline.

  python -m experiments.benchmark --image-size 32 --batch-size 16 --steps 5 --out bench.json
  python -m experiments.benchmark --tiny                 # a seconds-long smoke configuration
  python -m experiments.benchmark --print bench.json     # the table of a (partial) JSON file

Results go to stdout as one table and, with --out, to a JSON file rewritten after every
measurement (a run cut short by a timeout leaves what it measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmark_data
from experiments import flops as flops_lib
from rosjax import models
from rosjax.config import PAPER_TEACHERS, OptimConfig
from rosjax.data import views as views_lib
from rosjax.distill import cache as cache_lib
from rosjax.distill import replay
from rosjax.distill.steps import DistillInputs, make_distill_step
from rosjax.distill.weighting import weight_rule
from rosjax.train import loop, optim, parallel, steps
from rosjax.train.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SECTIONS = ("teachers", "distill", "cache", "data")

# Defaults of a normal run and of --tiny; a flag given on the command line wins over both.
DEFAULTS = dict(image_size=32, batch_size=16, steps=5, warmup=2, archs=",".join(PAPER_TEACHERS),
                teachers=",".join(PAPER_TEACHERS), student="resnet18", dtype="float32,bfloat16",
                num_classes=8, workers="0,1", data_batches=5, source_size="450x600",
                cache_batches=2)
TINY = dict(DEFAULTS, image_size=16, batch_size=8, steps=2, warmup=1, archs="tiny_cnn",
            teachers="tiny_cnn,tiny_cnn", student="tiny_cnn", workers="0", data_batches=2,
            source_size="40x48", cache_batches=1)


# ------------------------------------------------------------------------------ helpers


def device_info() -> dict[str, Any]:
    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": len(devices), "process_count": jax.process_count(),
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "jax": jax.__version__}


def host_batches(args, count: int, *, num_teachers: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` random host batches: image [B, S, S, 3], label [B] (+ teacher_logits [B, K, C])."""
    rng = np.random.default_rng(0)
    size, batch = args.image_size, args.batch_size
    batches = []
    for _ in range(count):
        b = {"image": rng.random((batch, size, size, 3), np.float32),
             "label": rng.integers(0, args.num_classes, batch).astype(np.int32)}
        if num_teachers:
            b["teacher_logits"] = rng.normal(
                size=(batch, num_teachers, args.num_classes)).astype(np.float32)
        batches.append(b)
    return batches


def random_variables(model, image_size: int, seed: int) -> dict[str, Any]:
    """{'params', 'batch_stats'} drawn on the host with numpy, He-normal kernels.

    Throughput does not depend on the values, and `model.init` under jit costs XLA:CPU tens of
    seconds of compile for its random-number code, which would dwarf a small benchmark.
    """
    shape = (1, image_size, image_size, 3)
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              jax.ShapeDtypeStruct(shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)  # biases, BatchNorm means

    return jax.tree_util.tree_map_with_path(draw, dict(abstract))


def new_state(arch: str, dtype: str, args, mesh, seed: int = 0) -> TrainState:
    """A replicated TrainState of `arch` with host-drawn variables and a zero optimiser state."""
    model = models.create(arch, args.num_classes, dtype=DTYPES[dtype])
    tx, _ = optim.make_optimizer(OptimConfig(), steps_per_epoch=1000)
    variables = random_variables(model, args.image_size, seed)
    params = variables["params"]
    opt_state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), jax.eval_shape(tx.init, params))
    state = TrainState(step=np.zeros((), np.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}), opt_state=opt_state,
                       apply_fn=model.apply, tx=tx)
    return jax.device_put(state, parallel.replicated(mesh))


def compile_step(jitted, example_args: tuple) -> tuple[Callable, float, dict[str, float | None]]:
    """AOT-compiles `jitted` for `example_args`: (compiled, seconds, FLOPs per call).

    The FLOPs are {'jaxpr': counted from the jaxpr by `experiments.flops` (convolutions and
    matmuls, the same on every platform), 'xla': XLA's cost analysis or None}. The latter is
    kept to show the gap: on GPU it misses the cuDNN convolutions. It describes the program of
    one device; with the batch split over N devices the whole step is N times that.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*example_args).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    xla = (cost or {}).get("flops")
    return compiled, seconds, {"jaxpr": flops_lib.count_flops(jitted, *example_args),
                               "xla": float(xla) * jax.device_count() if xla and xla > 0 else None}


def time_bare(compiled, state, device_batches, key, args, *, frozen=None):
    """Bare loop: warm-up steps, then `args.steps` timed steps, one block_until_ready at the end.

    Returns (state, metrics of the last step, images/s).
    """
    call = (lambda s, b: compiled(s, b, key)) if frozen is None else (  # noqa: E731
        lambda s, b: compiled(s, frozen, b, key))
    metrics = None
    for i in range(args.warmup):
        state, metrics = call(state, device_batches[i % len(device_batches)])
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = call(state, device_batches[i % len(device_batches)])
    jax.block_until_ready((state, metrics))
    return state, metrics, args.steps * args.batch_size / (time.perf_counter() - start)


def time_fit(compiled, state, batches, args, mesh) -> float:
    """images/s of `loop.fit` in its second epoch of `args.steps` steps (the first warms up).

    fit places each host batch on the devices itself (prefetched), reads metrics at the epoch
    end and checkpoints between epochs (synchronously, outside the timed epoch).
    """
    iterator = iter(grain.MapDataset.source(batches).repeat(None).to_iter_dataset())
    cfg = loop.LoopConfig(log_every_steps=args.steps, checkpoint_every_steps=0, progress=False,
                          async_checkpointing=False)
    with tempfile.TemporaryDirectory() as workdir:
        result = loop.fit(state, compiled, iterator, run_key=jax.random.key(1), num_epochs=2,
                          steps_per_epoch=args.steps, workdir=workdir, mesh=mesh, cfg=cfg)
    return result.history[-1]["images_per_s"]


def precision(state, metrics) -> dict[str, str]:
    """Dtypes that mixed precision must keep float32: parameters, BatchNorm statistics, loss."""
    def kinds(tree):
        return ",".join(sorted({str(x.dtype) for x in jax.tree.leaves(tree)}))

    return {"params": kinds(state.params), "batch_stats": kinds(state.batch_stats),
            "loss": str(metrics["loss"].dtype)}


def throughput(images_per_s: float, flops_per_step: dict[str, float | None], batch: int,
               dtype: str) -> dict:
    """images/s, FLOPs per image (jaxpr count; XLA's beside it), FLOP/s and the model FLOP
    utilisation: FLOP/s over the peak of all devices in `dtype` (None for unknown devices)."""
    per_image = flops_per_step["jaxpr"] / batch
    xla = flops_per_step["xla"]
    peak = flops_lib.peak_flop_per_s(jax.devices()[0].device_kind, dtype)
    return {"images_per_s": images_per_s, "flops_per_image": per_image,
            "xla_flops_per_image": None if xla is None else xla / batch,
            "flop_per_s": per_image * images_per_s,
            "mfu": None if peak is None else per_image * images_per_s / (peak * jax.device_count())}


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass
class Prepared:
    """A compiled step ready to time: call it as `compiled(state, [frozen,] batch, key)`."""
    compiled: Callable
    state: TrainState
    device_batches: list
    host_batches: list
    key: jax.Array
    compile_s: float
    flops: dict[str, float | None]
    frozen: Any = None

    def time(self, args) -> tuple[Any, float]:
        """One bare timing (`time_bare`); the state moves on. Returns (metrics, images/s)."""
        self.state, metrics, ips = time_bare(self.compiled, self.state, self.device_batches,
                                             self.key, args, frozen=self.frozen)
        return metrics, ips


def prepare_teacher(arch: str, dtype: str, args, mesh) -> Prepared:
    """One architecture's supervised train step, compiled, on 2 random device batches."""
    state = new_state(arch, dtype, args, mesh)
    jitted = parallel.jit_train_step(functools.partial(steps.train_step, multilabel=False), mesh)
    batches = host_batches(args, 2)
    device = [parallel.shard_batch(b, mesh) for b in batches]
    key = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
    compiled, compile_s, flops = compile_step(jitted, (state, device[0], key))
    return Prepared(compiled, state, device, batches, key, compile_s, flops)


def measure_teacher(arch: str, dtype: str, args, mesh) -> dict[str, Any]:
    """One architecture's supervised train step: compile, bare loop, fit loop."""
    prepared = prepare_teacher(arch, dtype, args, mesh)
    metrics, bare = prepared.time(args)
    record = {"arch": arch, "dtype": dtype, "compile_s": prepared.compile_s,
              **throughput(bare, prepared.flops, args.batch_size, dtype),
              "precision": precision(prepared.state, metrics)}
    record["fit_images_per_s"] = time_fit(prepared.compiled, prepared.state,
                                          prepared.host_batches, args, mesh)
    record["fit_over_bare"] = record["fit_images_per_s"] / bare
    return record


def make_teachers(args, dtype: str, mesh) -> list[tuple[Callable, Any]]:
    """(apply_fn, variables) of randomly initialised teachers, replicated on the mesh."""
    teachers = []
    for i, arch in enumerate(args.teachers):
        model = models.create(arch, args.num_classes, dtype=DTYPES[dtype])
        variables = random_variables(model, args.image_size, seed=100 + i)
        teachers.append((model.apply, jax.device_put(variables, parallel.replicated(mesh))))
    return teachers


def prepare_online_distill(dtype: str, args, mesh) -> tuple[Callable, Prepared]:
    """(the distillation step function, its online form compiled): every teacher runs on the
    batch, as `parallel.jit_train_step(step, mesh, frozen=teachers)` compiles it."""
    teachers = make_teachers(args, dtype, mesh)
    apply_fns = tuple(apply for apply, _ in teachers)
    rule = weight_rule("exponential", len(teachers))
    frozen = DistillInputs(teachers=tuple(v for _, v in teachers), rule=rule)
    distill_step = make_distill_step(apply_fns, tau=0.5, alpha=0.9, multilabel=False)
    key = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
    rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
    state = new_state(args.student, dtype, args, mesh)
    batches = host_batches(args, 2)
    device = [parallel.shard_batch(b, mesh) for b in batches]
    online = jax.jit(distill_step, in_shardings=(rep, rep, dat, rep), out_shardings=(rep, rep),
                     donate_argnums=(0,))
    compiled, compile_s, flops = compile_step(online, (state, frozen, device[0], key))
    return distill_step, Prepared(compiled, state, device, batches, key, compile_s, flops, frozen)


def measure_distill(dtype: str, args, mesh) -> list[dict[str, Any]]:
    """The online distillation step against the cached one (same student, same batch size)."""
    distill_step, online = prepare_online_distill(dtype, args, mesh)
    key = online.key
    common = {"dtype": dtype, "student": args.student, "teachers": list(args.teachers)}
    metrics, ips = online.time(args)
    records = [{**common, "mode": "online", "compile_s": online.compile_s,
                **throughput(ips, online.flops, args.batch_size, dtype),
                "precision": precision(online.state, metrics)}]
    del online

    # Cached: the student step alone, teacher logits [B, K, C] in the batch.
    state = new_state(args.student, dtype, args, mesh)
    device = [parallel.shard_batch(b, mesh)
              for b in host_batches(args, 2, num_teachers=len(args.teachers))]
    rep = parallel.replicated(mesh)
    cached_inputs = jax.device_put(DistillInputs(teachers=(), rule=weight_rule("exponential", len(args.teachers))), rep)
    cached = parallel.jit_train_step(replay.cached_distill_step(distill_step), mesh, frozen=cached_inputs)
    compiled, compile_s, flops = compile_step(cached, (state, device[0], key))
    state, metrics, ips = time_bare(compiled, state, device, key, args, frozen=cached_inputs)
    records.append({**common, "mode": "cached", "compile_s": compile_s,
                    **throughput(ips, flops, args.batch_size, dtype),
                    "precision": precision(state, metrics),
                    "speedup_over_online": ips / records[0]["images_per_s"]})
    return records


def jpeg_source(args, length: int) -> benchmark_data.JpegSource:
    height, width = (int(v) for v in args.source_size.lower().split("x"))
    return benchmark_data.JpegSource(benchmark_data.synthetic_jpegs(16, height, width, seed=0),
                                     length)


def measure_cache(dtype: str, args, mesh, directory: pathlib.Path) -> dict[str, Any]:
    """Builds a 1-batch cache (compiles the K-teacher forward), then one of
    `cache_batches` batches, timed alone; returns seconds and views/s."""
    teachers = make_teachers(args, dtype, mesh)
    rows = np.arange(args.batch_size * args.cache_batches)
    source = jpeg_source(args, len(rows))
    build = functools.partial(cache_lib.build_teacher_cache, teachers, source,
                              image_size=args.image_size,
                              augment=views_lib.AugmentConfig.dermoscopy(), num_views=1, seed=0,
                              batch_size=args.batch_size, mesh=mesh)
    start = time.perf_counter()
    build(rows[:args.batch_size], directory=directory / "first")
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    build(rows, directory=directory / "steady")
    seconds = time.perf_counter() - start
    return {"dtype": dtype, "teachers": list(args.teachers), "first_batch_s": first_s,
            "views": len(rows), "seconds": seconds, "views_per_s": len(rows) / seconds}


def measure_data(args, cache_directory: pathlib.Path | None) -> list[dict[str, Any]]:
    """Augmented training images/s per grain worker count, and the cached view replay."""
    length = (args.data_batches + 1) * args.batch_size
    source = jpeg_source(args, length)
    options = argparse.Namespace(image_size=args.image_size, batch_size=args.batch_size,
                                 augment="dermoscopy", threads=2, prefetch=2, warmup=1,
                                 batches=args.data_batches)
    records = []
    for workers in args.workers:
        result = benchmark_data.measure(source, workers=workers, args=options)
        records.append({"pipeline": "online", "workers": workers,
                        "images_per_s": result["images_per_s"],
                        "images_per_s_per_process": result["images_per_s"] / max(workers, 1)})
    if cache_directory is not None:
        cache = cache_lib.TeacherCache.open(cache_directory)
        source = jpeg_source(args, len(cache.rows))
        iterator = replay.cached_train_iterator(
            source, cache.rows, np.zeros(len(source), np.int32), cache,
            image_size=args.image_size, batch_size=args.batch_size, seed=0)
        next(iterator)
        start = time.perf_counter()
        for _ in range(args.data_batches):
            next(iterator)
        ips = args.data_batches * args.batch_size / (time.perf_counter() - start)
        records.append({"pipeline": "cached", "workers": 0, "images_per_s": ips,
                        "images_per_s_per_process": ips})
    return records


# ------------------------------------------------------------------------------ table


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    """The report as one plain-text table (also works on a partial report)."""
    d, c = report.get("device", {}), report.get("config", {})
    lines = [f"device: {d.get('device_kind')} ({d.get('platform')}) x{d.get('device_count')}, "
             f"{d.get('cpu_count')} CPUs, load {_fmt((d.get('load_average') or [None])[0], '.1f')}"
             f", jax {d.get('jax')} | {c.get('image_size')} px, batch {c.get('batch_size')}, "
             f"{c.get('steps')} timed steps after {c.get('warmup')}"]
    if report.get("teachers"):
        lines += ["", "Teacher training (bare: jitted step on device batches; fit: the engine's "
                  "loop, same step)",
                  f"{'arch':<14}{'dtype':<10}{'compile s':>10}{'img/s':>10}{'GFLOP/img':>11}"
                  f"{'TFLOP/s':>9}{'MFU':>7}{'fit img/s':>11}{'fit/bare':>9}"]
        for r in report["teachers"]:
            if "error" in r:
                lines.append(f"{r['arch']:<14}{r['dtype']:<10}  error: {r['error']}")
                continue
            lines.append(
                f"{r['arch']:<14}{r['dtype']:<10}{r['compile_s']:>10.1f}{r['images_per_s']:>10.1f}"
                f"{_fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '.3f'):>11}"
                f"{_fmt(r['flop_per_s'] and r['flop_per_s'] / 1e12, '.3f'):>9}"
                f"{_fmt(r.get('mfu'), '.1%'):>7}"
                f"{r['fit_images_per_s']:>11.1f}{r['fit_over_bare']:>9.2f}")
    if report.get("distill"):
        first = report["distill"][0]
        lines += ["", f"Distillation step: student {first.get('student')}, teachers "
                  f"{','.join(first.get('teachers', []))}",
                  f"{'dtype':<10}{'teachers':<10}{'compile s':>10}{'img/s':>10}{'GFLOP/img':>11}"
                  f"{'TFLOP/s':>9}{'MFU':>7}{'speedup':>9}"]
        for r in report["distill"]:
            if "error" in r:
                lines.append(f"{r['dtype']:<10}{r.get('mode', '?'):<10}  error: {r['error']}")
                continue
            lines.append(
                f"{r['dtype']:<10}{r['mode']:<10}{r['compile_s']:>10.1f}{r['images_per_s']:>10.1f}"
                f"{_fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '.3f'):>11}"
                f"{_fmt(r['flop_per_s'] and r['flop_per_s'] / 1e12, '.3f'):>9}"
                f"{_fmt(r.get('mfu'), '.1%'):>7}"
                f"{_fmt(r.get('speedup_over_online'), '.2f'):>9}")
    if report.get("cache"):
        r = report["cache"]
        if "error" in r:
            lines += ["", f"Cache build: error: {r['error']}"]
        else:
            lines += ["", f"Cache build ({r['dtype']}, {len(r['teachers'])} teachers): "
                      f"{r['views']} views in {r['seconds']:.1f} s = {r['views_per_s']:.1f} "
                      f"views/s (first batch incl. compile {r['first_batch_s']:.1f} s)"]
    if report.get("data"):
        lines += ["", "Data pipeline (dermoscopy augmentation from "
                  f"{c.get('source_size')} JPEGs, 2 threads/process)",
                  f"{'pipeline':<10}{'workers':>8}{'img/s':>10}{'img/s/process':>15}"]
        for r in report["data"]:
            if "error" in r:
                lines.append(f"{r.get('pipeline', '?'):<10}  error: {r['error']}")
                continue
            lines.append(f"{r['pipeline']:<10}{r['workers']:>8}{r['images_per_s']:>10.1f}"
                         f"{r['images_per_s_per_process']:>15.1f}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, help="side of the square images (px)")
    parser.add_argument("--batch-size", type=int, help="global batch, split over the devices")
    parser.add_argument("--steps", type=int, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, help="untimed steps before them")
    parser.add_argument("--archs", help="comma-separated teacher architectures to time")
    parser.add_argument("--teachers", help="comma-separated teachers of the distillation step")
    parser.add_argument("--student", help="student architecture of the distillation step")
    parser.add_argument("--dtype", help="comma-separated compute dtypes: float32,bfloat16")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--workers", help="comma-separated grain worker counts (data pipeline)")
    parser.add_argument("--data-batches", type=int, help="timed batches of the data pipeline")
    parser.add_argument("--source-size", help="stored JPEG size HxW of the data benchmark")
    parser.add_argument("--cache-batches", type=int, help="batches of the timed cache build")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke configuration (tiny_cnn, 16 px, 2 steps)")
    parser.add_argument("--out", help="write the figures here as JSON (after every measurement)")
    parser.add_argument("--print", dest="print_file", metavar="FILE",
                        help="print the table of an existing JSON report and exit")
    args = parser.parse_args(argv)
    complete_args(parser, args, TINY if args.tiny else DEFAULTS, {"dtype": DTYPES, "sections": SECTIONS})
    args.workers = [int(w) for w in args.workers.split(",") if w]
    return args


def complete_args(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict[str, Any],
                  valid: dict[str, Any]) -> None:
    """Fills the flags not given from `defaults`, splits the comma-separated lists (archs,
    teachers, dtype and the keys of `valid`) and rejects a value outside `valid[name]`."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in {"archs", "teachers", "dtype", *valid}:
        setattr(args, name, [v for v in getattr(args, name).split(",") if v])
    for name, allowed in valid.items():
        if bad := [v for v in getattr(args, name) if v not in allowed]:
            parser.error(f"--{name}: unknown {', '.join(bad)}; valid: {', '.join(allowed)}")


def _record(fn: Callable, *args, **ids) -> Any:
    """Runs one measurement; an exception becomes an {'error': ...} record so the rest runs."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a benchmark reports a failed cell and goes on
        return {**ids, "error": f"{type(e).__name__}: {e}"}


def measure_host_side(report: dict, args, mesh, save: Callable[[str], None]) -> None:
    """The cache build (first dtype) and the data pipelines, in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = None
        if "cache" in args.sections:
            report["cache"] = _record(measure_cache, args.dtype[0], args, mesh,
                                      pathlib.Path(tmp), dtype=args.dtype[0])
            if "error" not in report["cache"]:
                cache_dir = pathlib.Path(tmp) / "steady"
            save("cache build")
        if "data" in args.sections:
            result = _record(measure_data, args, cache_dir, pipeline="data")
            report["data"] = result if isinstance(result, list) else [result]
            save("data pipeline")


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.print_file:
        print(format_table(json.loads(pathlib.Path(args.print_file).read_text())))
        return {}
    mesh = parallel.make_mesh()
    parallel.check_batch_size(args.batch_size, mesh)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "print_file")}
    report: dict[str, Any] = {"device": device_info(), "config": config}
    started = time.perf_counter()

    def save(what: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {what}", file=sys.stderr, flush=True)
        if args.out:
            tmp = pathlib.Path(args.out + ".tmp")
            tmp.write_text(json.dumps(report, indent=2))
            os.replace(tmp, args.out)

    save("start")
    # dtype by dtype, so that a run cut short by a timeout has a complete first dtype; the
    # cache build and the data pipeline come after the first one.
    for i, dtype in enumerate(args.dtype):
        if "teachers" in args.sections:
            for arch in args.archs:
                report.setdefault("teachers", []).append(
                    _record(measure_teacher, arch, dtype, args, mesh, arch=arch, dtype=dtype))
                save(f"teacher {arch} {dtype}")
        if "distill" in args.sections:
            result = _record(measure_distill, dtype, args, mesh, dtype=dtype)
            report.setdefault("distill", []).extend(result if isinstance(result, list)
                                                    else [result])
            save(f"distill {dtype}")
        if i == 0:
            measure_host_side(report, args, mesh, save)
    report["total_s"] = time.perf_counter() - started
    save("done")
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
