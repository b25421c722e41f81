"""Checkpoints: the one module that talks to Orbax (orbax-checkpoint v0 `CheckpointManager` API).

A training run's work directory holds two managers:

    <workdir>/ckpt/<step>/   resume checkpoints, the latest `keep` of them; items:
                             state   the TrainState pytree (params, batch_stats, opt_state, step)
                             extras  optional extra pytrees (e.g. the running-mean weights)
                             data    the grain train iterator's position, one JSON file per process
                             meta    JSON: epoch, run key, steps per epoch, ...
    <workdir>/best/<step>/   the best checkpoint by a validation metric (state, extras, meta):
                             written only when the metric improves; Orbax keeps the single
                             best one by the metric saved with it.

Saves are asynchronous: arrays are copied off the devices before `save` returns and are
written in a background thread. Every step is written to a temporary folder that is renamed
when complete, so a process killed mid-save leaves the previous checkpoint as the latest
usable one (the leftover temporary folder is ignored, and removed the next time the manager
opens). Restores take an abstract target (shapes, dtypes, shardings of the *current* mesh),
so a run can resume on a different number of devices.

`save_variables` / `load_variables` store finished models ({'params', 'batch_stats'}) for the
notebook loader and the distillation stage.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

_LATEST_DIR = "ckpt"
_BEST_DIR = "best"
_BEST_METRIC = "value"


def abstract_like(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


class _IteratorState:
    """A frozen iterator position in the form grain's Orbax handler saves and restores.

    The loop prefetches batches, so the live iterator is ahead of the last batch trained on;
    it records the position after each batch and saves that one. Grain's handler writes
    `get_state()` as text (one file per process) and on restore calls `set_state()` and
    `start_prefetch()`.
    """

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Nothing to prefetch: this object only carries a position."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `RunCheckpoints.restore*` returns."""
    step: int
    state: Any
    extras: dict[str, Any]
    run_key: jax.Array
    meta: dict[str, Any]
    iterator_state: dict | None  # None for best checkpoints (they store no data position)


def _best_metric(metrics: dict[str, float]) -> float:
    return metrics[_BEST_METRIC]


def _key_to_json(key: jax.Array) -> dict[str, Any]:
    return {"impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.random.key_data(key)).tolist()}


def _key_from_json(payload: dict[str, Any]) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(payload["data"], np.uint32), impl=payload["impl"])


class RunCheckpoints:
    """Resume checkpoints (latest few) and the best checkpoint of one training run."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, best_mode: str = "max",
                 async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (resume needs a checkpoint), got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        root = pathlib.Path(workdir).expanduser().absolute()
        self._best_mode, self._best_value = best_mode, None
        self._latest = ocp.CheckpointManager(
            root / _LATEST_DIR,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(keep),
                enable_async_checkpointing=async_save, cleanup_tmp_directories=True))
        # best_fn makes Orbax store the metric with each step; BestN(n=1) deletes the others.
        self._best = ocp.CheckpointManager(
            root / _BEST_DIR,
            options=ocp.CheckpointManagerOptions(
                best_fn=_best_metric, best_mode=best_mode,
                preservation_policy=ocp.checkpoint_managers.BestN(
                    get_metric_fn=_best_metric, reverse=best_mode == "min", n=1,
                    keep_checkpoints_without_metrics=False),
                enable_async_checkpointing=async_save, cleanup_tmp_directories=True))

    @property
    def directory(self) -> pathlib.Path:
        return pathlib.Path(self._latest.directory)

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return self._best.best_step()

    def save(self, step: int, *, state: Any, run_key: jax.Array, meta: dict[str, Any],
             iterator_state: dict, extras: dict[str, Any] | None = None) -> None:
        """Starts an (asynchronous) resume checkpoint of everything a run needs to continue.

        `iterator_state` is the train iterator's `get_state()` after the last batch trained on.
        """
        items = {"state": ocp.args.StandardSave(state),
                 "data": grain.checkpoint.CheckpointSave(_IteratorState(iterator_state)),
                 "meta": ocp.args.JsonSave({**meta, "run_key": _key_to_json(run_key)})}
        if extras:
            items["extras"] = ocp.args.StandardSave(extras)
        self._latest.save(step, args=ocp.args.Composite(**items))

    def best_value(self) -> float | None:
        """The metric of the best checkpoint (None before the first one)."""
        if self._best_value is None and self.best_step() is not None:
            self._best_value = self._best.metrics(self.best_step())[_BEST_METRIC]
        return self._best_value

    def save_best(self, step: int, value: float, *, state: Any, run_key: jax.Array,
                  meta: dict[str, Any], extras: dict[str, Any] | None = None) -> bool:
        """Saves a checkpoint scored `value` if it beats the best so far; returns whether it did.

        Ties keep the earlier checkpoint. A step that is already saved (a resumed run repeating
        an epoch end) is left as it is.
        """
        best = self.best_value()
        if best is not None and not (value > best if self._best_mode == "max" else value < best):
            return False
        if step in self._best.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({**meta, "run_key": _key_to_json(run_key)})}
        if extras:
            items["extras"] = ocp.args.StandardSave(extras)
        self._best.save(step, args=ocp.args.Composite(**items),
                        metrics={_BEST_METRIC: float(value)})
        self._best_value = float(value)
        return True

    def restore(self, step: int, *, abstract_state: Any,
                abstract_extras: dict[str, Any] | None = None) -> Restored:
        """Restores resume checkpoint `step` onto the shardings of `abstract_state`."""
        return self._restore(self._latest, step, abstract_state, abstract_extras, with_data=True)

    def restore_best(self, *, abstract_state: Any,
                     abstract_extras: dict[str, Any] | None = None) -> Restored:
        """Restores the best checkpoint (no data position) onto `abstract_state`'s shardings."""
        step = self.best_step()
        if step is None:
            raise FileNotFoundError(f"no best checkpoint under {self._best.directory}")
        return self._restore(self._best, step, abstract_state, abstract_extras, with_data=False)

    @staticmethod
    def _restore(manager, step, abstract_state, abstract_extras, with_data) -> Restored:
        position = _IteratorState()
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if abstract_extras:
            items["extras"] = ocp.args.StandardRestore(abstract_extras)
        if with_data:
            items["data"] = grain.checkpoint.CheckpointRestore(position)
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        meta = dict(restored["meta"])
        run_key = _key_from_json(meta.pop("run_key"))
        extras = dict(restored["extras"]) if abstract_extras else {}
        return Restored(step=step, state=restored["state"], extras=extras, run_key=run_key,
                        meta=meta, iterator_state=position.state if with_data else None)

    def wait_until_finished(self) -> None:
        """Blocks until every started save is on disk."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the managers' threads."""
        self._latest.close()
        self._best.close()


def save_variables(path: str | os.PathLike, variables: Any) -> None:
    """Writes a finished model's variables (any pytree of arrays) to the folder `path`.

    Overwrites an existing folder; the write is atomic (temporary folder + rename).
    """
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(pathlib.Path(path).expanduser().absolute(), variables, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def load_variables(path: str | os.PathLike,
                   sharding: jax.sharding.Sharding | None = None) -> Any:
    """Reads variables written by `save_variables` as jax arrays placed with `sharding`.

    Default placement: the first local device (what a notebook wants); pass
    `parallel.replicated(mesh)` to place frozen teachers on every device of a mesh.
    """
    path = pathlib.Path(path).expanduser().absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no saved variables at {path}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          tree)
    variables = checkpointer.restore(path, target)
    checkpointer.close()
    return variables
