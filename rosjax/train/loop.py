"""The epoch loop shared by teacher training and distillation: `fit`.

`fit` runs a compiled step `(state, batch, key) -> (state, metrics)` over a checkpointable
train iterator (grain `DatasetIterator`: `next`, `get_state`, `set_state`; infinite, e.g.
`...repeat().batch(...)`), `steps_per_epoch` steps per epoch, and at every epoch end:
`on_epoch_end` (may update `extras`), `evaluate`, one JSON line in `<workdir>/metrics.jsonl`,
the best model by a validation metric (`TrainState.model_state()`: the optimiser state is only
needed to resume) and a resume checkpoint (after the last epoch only with
`LoopConfig.final_checkpoint`); the same scalars (and the
loss of every step read) also go to a TensorBoard event file in `<workdir>` (see
`rosjax.train.events`; `LoopConfig.tensorboard=False` turns it off). Restarting with the same
work directory resumes from the latest intact checkpoint at the exact batch (a damaged one is
skipped with a warning, see `rosjax.checkpoint`), and the resumed run's parameters and
metrics.jsonl (but for the timing fields) are those of a run that never stopped: checkpoints
carry the running sums of the current epoch's train metrics.

The host never waits for the devices inside a step: batches are placed on the devices
`prefetch_batches` ahead, and step metrics stay on the devices until they are read every
`log_every_steps` steps (and before each checkpoint), where a non-finite value stops the run
with `NonFiniteError` naming the step; no checkpoint is written after a step whose metrics
(loss, gradient norm, ...) were not all finite, so the latest checkpoint stays a good one.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import tqdm

from rosjax import atomic, checkpoint
from rosjax.train import events, parallel

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    log_every_steps: int = 50          # Host reads step metrics this often (NaN check, bar).
    checkpoint_every_steps: int = 500  # Mid-epoch resume checkpoint interval; 0: epoch ends only.
    keep_checkpoints: int = 2          # Resume checkpoints kept on disk (the latest ones).
    best_metric: str | None = None     # evaluate() key that ranks checkpoints; None: no best.
    best_mode: str = "max"             # "max" or "min": the better direction of best_metric.
    prefetch_batches: int = 2          # Batches placed on the devices ahead of the running step.
    progress: bool | None = None       # tqdm bar per epoch; None: only if stdout is a terminal.
    async_checkpointing: bool = True   # Write checkpoints in a background thread.
    tensorboard: bool = True           # Also write TensorBoard event files (rosjax.train.events).
    wandb_project: str = ""            # Also log to this Weights & Biases project ("": nothing leaves the machine).
    # A resume checkpoint after the last epoch too, to train on later with more epochs. False
    # where the caller exports the model at once: a run killed before the export then retrains
    # its last epoch from the checkpoint before, to the same numbers, and each run saves one
    # state fewer (the experiment's stages, which never train on once done).
    final_checkpoint: bool = True

    def __post_init__(self):
        for name, low in (("log_every_steps", 1), ("checkpoint_every_steps", 0),
                          ("keep_checkpoints", 1), ("prefetch_batches", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"LoopConfig.{name} must be >= {low}, got {getattr(self, name)}")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"LoopConfig.best_mode must be 'max' or 'min', got {self.best_mode!r}")


class NonFiniteError(FloatingPointError):
    """A step produced a NaN/Inf metric (loss, gradient norm, ...); training stopped."""


@dataclasses.dataclass(frozen=True)
class FitResult:
    state: Any                   # the state after the last step
    extras: dict[str, Any]       # the extras after the last epoch
    history: list[dict]          # the metrics.jsonl records written by this call


class _DeviceFeeder:
    """Pulls host batches, places them on the mesh ahead of use, remembers each position.

    `next()` returns (global batch, iterator state right after that batch); the latter is
    what a checkpoint taken after training on the batch must store.
    """

    def __init__(self, iterator: Iterator, mesh: jax.sharding.Mesh, depth: int):
        self._iterator, self._mesh, self._depth = iterator, mesh, depth
        self._queue = collections.deque()

    def next(self):
        while len(self._queue) <= self._depth:
            try:
                host_batch = next(self._iterator)
            except StopIteration:
                raise RuntimeError("the train iterator ended; fit needs an endless iterator "
                                   "(e.g. grain's MapDataset...repeat().batch(...))") from None
            position = self._iterator.get_state()
            self._queue.append((parallel.shard_batch(host_batch, self._mesh), position))
        return self._queue.popleft()


class _StepMetrics:
    """Step metrics kept on the devices until `flush` reads them (a few at a time)."""

    def __init__(self, first_step: int, batch_size: int, sums: dict[str, float] | None = None,
                 count: int = 0):
        self._pending: list[tuple[int, dict]] = []
        self._sums: dict[str, float] = collections.defaultdict(float, sums or {})
        self._count = count
        self._batch_size = batch_size
        self._last_time = time.perf_counter()
        self._last_step = first_step
        self.latest: dict[str, float] = {}
        self.read_losses: list[tuple[int, float]] = []  # (step + 1, loss) of the last flush
        self.images_per_s = float("nan")

    def add(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))

    def flush(self) -> int:
        """Reads pending metrics; raises NonFiniteError on the first bad step.

        Returns the number of steps read.
        """
        if not self._pending:
            return 0
        values = jax.device_get([m for _, m in self._pending])
        for (step, _), metrics in zip(self._pending, values):
            bad = sorted((name != "loss", name) for name, value in metrics.items()
                         if not np.all(np.isfinite(value)))  # 'loss' first
            if bad:
                described = ", ".join(f"{name} = {metrics[name]}" for _, name in bad)
                raise NonFiniteError(f"non-finite {described} at step {step} "
                                     "(0-based update index)")
            for name, value in metrics.items():
                self._sums[name] += float(value)
        self._count += len(values)
        self.latest = {k: float(v) for k, v in values[-1].items()}
        self.read_losses = [(step + 1, float(m["loss"])) for (step, _), m in
                            zip(self._pending, values) if "loss" in m]
        now, last_step = time.perf_counter(), self._pending[-1][0] + 1
        self.images_per_s = (last_step - self._last_step) * self._batch_size / max(
            now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, last_step
        read = len(self._pending)
        self._pending = []
        return read

    def means(self) -> dict[str, float]:
        return {k: v / self._count for k, v in self._sums.items()} if self._count else {}

    def totals(self) -> dict[str, Any]:
        """The running sums and their count (flushed steps only), for a checkpoint's meta."""
        return {"train_sums": dict(self._sums), "train_count": self._count}


def _rewrite_metrics_log(path: pathlib.Path, completed_epochs: int) -> None:
    """Drops lines of epochs that the restored checkpoint does not include (they will rerun)."""
    if not path.exists():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= completed_epochs:
                lines.append(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
    atomic.write_text(path, "".join(line + "\n" for line in lines))


def _to_json(value):
    """json.dumps fallback for numpy scalars and arrays in metric dicts."""
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not "
                    "JSON-serialisable")


def _rounded(value) -> str:
    """A metric for the console: 4 significant digits, `-` when missing."""
    return "-" if value is None else f"{value:.4g}"


def _best_value(val: dict, name: str):
    if name not in val:
        raise KeyError(f"best_metric {name!r} is not among evaluate()'s results: "
                       f"{', '.join(sorted(val))}")
    value = val[name]
    if value is None or not math.isfinite(value):
        log.warning("validation %s is %s; this epoch cannot be the best", name, value)
        return None
    return float(value)


def fit(state: Any, step_fn: Callable, train_iter: Iterator, *, run_key: jax.Array,
        num_epochs: int, steps_per_epoch: int, workdir: str | os.PathLike,
        mesh: jax.sharding.Mesh, cfg: LoopConfig = LoopConfig(),
        evaluate: Callable[[Any, dict], dict] | None = None,
        on_epoch_end: Callable[[Any, int, dict], dict] | None = None,
        extras: dict[str, Any] | None = None,
        schedule: Callable[[int], Any] | None = None) -> FitResult:
    """Trains `num_epochs` epochs (resuming from `<workdir>/ckpt` when it holds a checkpoint).

    Args:
      state: the initial state (a fresh one when resuming: it gives the restore target).
      step_fn: compiled `(state, batch, key) -> (state, dict of scalar metrics)`; `key` is
        the run key (the step folds in state.step). Teachers go in through
        `parallel.jit_train_step(..., frozen=teachers)`.
      train_iter: endless, checkpointable iterator of host batches (this process's rows).
      run_key: the run's key; a resumed run uses the key saved in its checkpoint.
      num_epochs, steps_per_epoch: length of the run.
      workdir: where checkpoints and metrics.jsonl go.
      mesh: the data-parallel mesh (`parallel.make_mesh()`).
      cfg: logging, checkpoint and progress options.
      evaluate: `evaluate(state, extras) -> dict` at each epoch end (JSON-serialisable values).
      on_epoch_end: `on_epoch_end(state, epoch, extras) -> extras` (epoch 0-based), before
        `evaluate`; returns the (possibly updated) extras with the same tree structure.
      extras: pytrees saved and restored with the state (e.g. averaged weights); give them
        their final structure from the start, since they are the restore target.
      schedule: the learning-rate schedule, to log each epoch's learning rate.
    """
    if cfg.best_metric is not None and evaluate is None:
        raise ValueError(f"LoopConfig.best_metric={cfg.best_metric!r} needs an evaluate callback")
    workdir = pathlib.Path(workdir).expanduser().absolute()
    main_process = jax.process_index() == 0
    extras = dict(extras or {})
    ckpts = checkpoint.RunCheckpoints(workdir, keep=cfg.keep_checkpoints, best_mode=cfg.best_mode,
                                      async_save=cfg.async_checkpointing)
    writer = None
    try:
        restored = ckpts.restore_latest(abstract_state=checkpoint.abstract_like(state),
                                        abstract_extras=checkpoint.abstract_like(extras))
        epoch_totals = None
        if restored is not None:
            if restored.meta["steps_per_epoch"] != steps_per_epoch:
                raise ValueError(
                    f"{ckpts.directory} was written with steps_per_epoch="
                    f"{restored.meta['steps_per_epoch']}, this run has {steps_per_epoch}: use a "
                    "fresh work directory or the original batch size and dataset")
            state, extras, run_key = restored.state, restored.extras, restored.run_key
            train_iter.set_state(restored.iterator_state)
            if "train_sums" in restored.meta:
                epoch_totals = (restored.meta["train_sums"], restored.meta["train_count"])
            log.info("resuming from %s at step %d", ckpts.directory, restored.step)
        step = int(jax.device_get(state.step))
        metrics_path = workdir / METRICS_FILE
        if main_process:
            _rewrite_metrics_log(metrics_path, step // steps_per_epoch)
            writer = events.open_writer(workdir, cfg.tensorboard, cfg.wandb_project)
        return _run(state, step, step_fn, train_iter, run_key, num_epochs, steps_per_epoch,
                    mesh, cfg, evaluate, on_epoch_end, extras, schedule, ckpts,
                    metrics_path if main_process else None,
                    epoch_totals if step % steps_per_epoch else None, writer)
    finally:
        try:
            if writer is not None:
                writer.close()
        finally:
            ckpts.close()


def _run(state, step, step_fn, train_iter, run_key, num_epochs, steps_per_epoch, mesh, cfg,
         evaluate, on_epoch_end, extras, schedule, ckpts, metrics_path, epoch_totals=None,
         writer=None):
    """The epoch loop of `fit`, from host step `step` on.

    epoch_totals: (train metric sums, count) of the steps of the current epoch before `step`
    (a run resumed mid-epoch), so that the epoch's train means cover the whole epoch.
    writer: the `events.EventWriter` of the main process (None: no event file).
    """
    total_steps = num_epochs * steps_per_epoch
    key = parallel.replicate(run_key, mesh)
    feeder = _DeviceFeeder(train_iter, mesh, cfg.prefetch_batches)
    show = (cfg.progress if cfg.progress is not None else sys.stdout.isatty()) and (
        metrics_path is not None)

    def meta(at_step, tracker):
        return {"step": at_step, "epoch": at_step / steps_per_epoch,
                "steps_per_epoch": steps_per_epoch, **tracker.totals()}

    history = []
    while step < total_steps:
        epoch, epoch_start = step // steps_per_epoch, time.perf_counter()
        epoch_end = (epoch + 1) * steps_per_epoch
        tracker, batch_size = None, None
        bar = tqdm.tqdm(total=steps_per_epoch, initial=step - epoch * steps_per_epoch,
                        desc=f"epoch {epoch + 1}/{num_epochs}", unit="step", file=sys.stdout,
                        disable=not show, dynamic_ncols=True)
        first_step = step
        while step < epoch_end:
            batch, position = feeder.next()
            if tracker is None:
                batch_size = jax.tree.leaves(batch)[0].shape[0]
                sums, count = epoch_totals or (None, 0)
                tracker, epoch_totals = _StepMetrics(step, batch_size, sums, count), None
            state, metrics = step_fn(state, batch, key)
            tracker.add(step, metrics)
            step += 1
            mid_checkpoint = (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
                              and step < epoch_end)
            if step % cfg.log_every_steps == 0 or mid_checkpoint or step == epoch_end:
                read = tracker.flush()
                if writer is not None:
                    writer.step_losses(tracker.read_losses)
                bar.set_postfix(step=step, loss=tracker.latest.get("loss", float("nan")),
                                img_s=f"{tracker.images_per_s:.1f}", refresh=False)
                bar.update(read)
            if mid_checkpoint:
                ckpts.save(step, state=state, run_key=run_key, meta=meta(step, tracker),
                           iterator_state=position, extras=extras)
        bar.close()
        train_seconds = time.perf_counter() - epoch_start

        if on_epoch_end is not None:
            updated = on_epoch_end(state, epoch, extras)
            if jax.tree.structure(updated) != jax.tree.structure(extras):
                raise ValueError("on_epoch_end must return extras with the structure it was "
                                 f"given: {jax.tree.structure(extras)}, got "
                                 f"{jax.tree.structure(updated)}")
            extras = updated
        val = dict(evaluate(state, extras)) if evaluate is not None else {}
        record = {"epoch": epoch + 1, "step": step,
                  "train": tracker.means(),
                  "val": val,
                  "images_per_s": (step - first_step) * batch_size / train_seconds,
                  "epoch_seconds": time.perf_counter() - epoch_start}
        if schedule is not None:
            record["lr"] = float(schedule(epoch * steps_per_epoch))
        if cfg.best_metric is not None:
            value = _best_value(val, cfg.best_metric)
            if value is not None:
                ckpts.save_best(step, value, state=state.model_state(), run_key=run_key, extras=extras,
                                meta={**meta(step, tracker), "best_metric": cfg.best_metric,
                                      "value": value})
            record["best_value"] = ckpts.best_value()
        history.append(record)
        if metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record, default=_to_json) + "\n")
            if writer is not None:
                writer.epoch(record)
            summary = " ".join(f"{k} {_rounded(v)}" for k, v in record["train"].items())
            if cfg.best_metric is not None:
                summary += (f" | val {cfg.best_metric} {_rounded(val.get(cfg.best_metric))} "
                            f"(best {_rounded(record['best_value'])})")
            log.info("epoch %d/%d: %s | %.1f s", epoch + 1, num_epochs, summary,
                     record["epoch_seconds"])
        if step < total_steps or cfg.final_checkpoint:
            ckpts.save(step, state=state, run_key=run_key, meta=meta(step, tracker),
                       iterator_state=position, extras=extras)
    return FitResult(state=state, extras=extras, history=history)
