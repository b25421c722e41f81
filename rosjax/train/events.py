"""TensorBoard event files for the epoch loop, written without TensorFlow (tensorboardX).

`fit` (rosjax.train.loop) writes, beside `metrics.jsonl` (which stays the canonical record),
one event file per process start into the run's own folder, so `tensorboard --logdir WORKDIR`
shows every run of an experiment (teachers, students, sweep points) side by side:

  per epoch, at the epoch's last step (`record["step"]`, the number of updates done):
    train/<name>    the epoch's train means (loss, accuracy, grad_norm, kd, ce, weight_sum,
                    weight_mean/t<k>, select_prob/t<k>, ...: whatever the step returns)
    val/<name>      the numeric validation metrics (nested dicts flattened with '/')
    lr, images_per_s, epoch_seconds, best_value
  per step, whenever the loop reads the step metrics (every `log_every_steps` steps):
    step/loss       the loss of each step read, at step index + 1

Only the main process (jax.process_index() == 0) writes. A resumed run opens a new event
file (unique name: time, host, pid, random suffix) and never touches the earlier ones, so no
file is duplicated or corrupted; TensorBoard then shows the steps between the resumed
checkpoint and the interruption twice (once from each file), while metrics.jsonl holds each
epoch once. A file cut short by a killed process is read up to its last whole record.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import pathlib
import uuid
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def flat_scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite real numbers of a (nested) metric dict, keyed 'prefix/a/b'; the rest dropped."""
    out = {}
    for name, value in values.items():
        tag = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            out.update(flat_scalars(value, tag))
            continue
        if getattr(value, "ndim", None) == 0:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if math.isfinite(float(value)):
            out[tag] = float(value)
    return out


class _WandbRun:
    """The same scalars to a Weights & Biases run (only when the user names a project).

    One W&B run per training folder: its id is derived from the folder, so a resumed run
    continues it (`resume="allow"`; W&B ignores steps it already holds).
    """

    def __init__(self, project: str, logdir: pathlib.Path):
        import wandb  # noqa: PLC0415 (optional; validate.check_options makes sure it is installed)

        run_id = uuid.uuid5(uuid.NAMESPACE_URL, str(logdir.resolve())).hex[:16]
        self._run = wandb.init(project=project, name=f"{logdir.parent.name}/{logdir.name}", id=run_id,
                               dir=str(logdir), resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._run.log(values, step=int(step))

    def close(self) -> None:
        self._run.finish()


class EventWriter:
    """Scalars of one run into a new event file in `logdir` (tensorboardX's SummaryWriter), and
    to a Weights & Biases project when `wandb_project` is given."""

    def __init__(self, logdir: str | os.PathLike, wandb_project: str = ""):
        from tensorboardX import SummaryWriter  # imported here: only the main process writes
        pathlib.Path(logdir).mkdir(parents=True, exist_ok=True)
        suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"  # tensorboardX names by time+host only
        self._writer = SummaryWriter(logdir=str(logdir), filename_suffix=suffix, flush_secs=30)
        self._wandb = _WandbRun(wandb_project, pathlib.Path(logdir)) if wandb_project else None

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        flat = flat_scalars(values, prefix)
        for tag, value in flat.items():
            self._writer.add_scalar(tag, value, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(step, flat)

    def step_losses(self, losses: list[tuple[int, float]]) -> None:
        """`(update count, loss)` pairs of the steps just read."""
        for step, loss in losses:
            if math.isfinite(loss):
                self._writer.add_scalar("step/loss", loss, global_step=int(step))
                if self._wandb is not None:
                    self._wandb.log(step, {"step/loss": loss})

    def epoch(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl record: train/*, val/* and the top-level numbers."""
        step = record["step"]
        self.scalars(step, record.get("train", {}), "train")
        self.scalars(step, record.get("val", {}), "val")
        self.scalars(step, {k: v for k, v in record.items()
                            if k in ("lr", "images_per_s", "epoch_seconds", "best_value")})
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        if self._wandb is not None:
            self._wandb.close()


def open_writer(logdir: str | os.PathLike, enabled: bool = True, wandb_project: str = "") -> EventWriter | None:
    """An EventWriter, or None when disabled or tensorboardX cannot be imported (a warning)."""
    if not enabled:
        return None
    try:
        return EventWriter(logdir, wandb_project)
    except ImportError as e:
        log.warning("no TensorBoard event files (%s); metrics.jsonl is still written", e)
        return None
