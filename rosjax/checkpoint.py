"""Checkpoints: the one module that talks to Orbax (orbax-checkpoint v0 `CheckpointManager` API).

A training run's work directory holds two managers:

    <workdir>/ckpt/<step>/   resume checkpoints, the latest `keep` of them; items:
                             state   the TrainState pytree (params, batch_stats, opt_state, step)
                             extras  optional extra pytrees (e.g. the running-mean weights)
                             data    the grain train iterator's position, one JSON file per process
                             meta    JSON: epoch, run key, steps per epoch, ...
    <workdir>/best/<step>/   the best checkpoint by a validation metric (the model, i.e. a
                             `ModelState` without the optimiser's momentum, extras, meta):
                             written only when the metric improves; Orbax keeps the single
                             best one by the metric saved with it.

Saves are asynchronous: arrays are copied off the devices before `save` returns and are
written in a background thread. Every step is written to a temporary folder that is renamed
when complete, so a process killed mid-save leaves the previous checkpoint as the latest
usable one. Leftover temporary folders (`*.orbax-checkpoint-tmp*`) are removed here,
synchronously, before a manager opens; Orbax's own background clean-up is off, because two
of them (one per manager opened on a directory) could delete the same folder at once. A
process holds at most one `RunCheckpoints` per work directory at a time.

Integrity (the file checks are `rosjax.checkpoint_integrity`'s): once a step is on disk (the
manager's finalize thread is done), a background thread writes its checksum manifest.
Restores check it first. `restore_latest` falls back, with a WARNING naming the damaged folder,
to the newest earlier step that is intact, and moves the damaged newer steps to
`<workdir>/damaged/` (so the resumed run can write those steps again); if no step is intact it
raises `CheckpointError`. A step without a manifest (the process died between the save and the
manifest) is unverified: it counts as damaged if it fails to restore or restores non-finite
values. Restores take an abstract target (shapes, dtypes, shardings of the *current* mesh), so
a run can resume on a different number of devices.

`save_variables` / `load_variables` store finished models ({'params', 'batch_stats'}) for the
notebook loader and the distillation stage, with the same manifest.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pathlib
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from rosjax import checkpoint_integrity as integrity
from rosjax import checkpoint_meta
from rosjax.errors import UserError

log = logging.getLogger(__name__)

_LATEST_DIR = "ckpt"
_BEST_DIR = "best"
_BEST_METRIC = "value"


class CheckpointError(UserError, ValueError):
    """A checkpoint on disk is damaged and no intact one can stand in for it."""


def _is_primary() -> bool:
    return jax.process_index() == 0


_barriers = itertools.count()


def _sync(name: str) -> None:
    """A barrier across processes (nothing with one process). Every process makes the same
    calls in the same order, so the counter gives each barrier the unique name Orbax needs."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"{name}.{next(_barriers)}")


_open_lock = threading.Lock()
_open_dirs: set[pathlib.Path] = set()


def abstract_like(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


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


def _claim_directory(root: pathlib.Path) -> None:
    """Registers `root` as open in this process; RuntimeError if it already is."""
    with _open_lock:
        if root in _open_dirs:
            raise RuntimeError(f"checkpoints of {root} are already open in this process; "
                               "close() them before opening them again")
        _open_dirs.add(root)


def _array_handler() -> ocp.PyTreeCheckpointHandler:
    """The handler of the array items (state, extras, a finished model's variables): uncompressed.

    Orbax compresses arrays with zstd by default. Float weights are noise-like bytes: it saves
    about 7 % of a checkpoint and doubles the CPU time of a save (0.29 s against 0.16 s for
    94 MB on the 2-core CI machine), which a CPU run pays at every epoch end. Checkpoints
    written compressed (by rosjax 0.1) still restore: the codec is in their metadata.
    """
    return ocp.PyTreeCheckpointHandler(use_compression=False)


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """One handler per checkpoint item (a manager given some must be given all)."""
    return {"state": _array_handler(), "extras": _array_handler(), "meta": ocp.JsonCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler()}


def _restore_tree(abstract: Any) -> ocp.args.PyTreeRestore:
    """Restores onto the shapes, dtypes and shardings of `abstract` (`abstract_like`)."""
    return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def _latest_manager(directory: pathlib.Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    """The resume checkpoints' manager: keeps the latest `keep` steps."""
    return ocp.CheckpointManager(directory, item_handlers=_item_handlers(), options=ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=False))


def _best_manager(directory: pathlib.Path, best_mode: str, async_save: bool) -> ocp.CheckpointManager:
    """The best checkpoint's manager: best_fn makes Orbax store the metric with each step, and
    BestN(n=1) deletes all but the best."""
    return ocp.CheckpointManager(directory, item_handlers=_item_handlers(), options=ocp.CheckpointManagerOptions(
        best_fn=_best_metric, best_mode=best_mode,
        preservation_policy=ocp.checkpoint_managers.BestN(
            get_metric_fn=_best_metric, reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=False))


def _save_items(state: Any, run_key: jax.Array, meta: dict[str, Any], extras: dict[str, Any] | None) -> dict:
    """The Orbax items of a checkpoint: the state, the meta with the run key, the extras if any."""
    items = {"state": ocp.args.PyTreeSave(state),
             "meta": ocp.args.JsonSave({**meta, "run_key": checkpoint_meta.key_to_json(run_key)})}
    if extras:
        items["extras"] = ocp.args.PyTreeSave(extras)
    return items


class RunCheckpoints:
    """Resume checkpoints (latest few) and the best checkpoint of one training run.

    One instance per work directory per process at a time (a second one raises RuntimeError
    until the first is closed); usable as a context manager.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, best_mode: str = "max",
                 async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (resume needs a checkpoint), got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        root = pathlib.Path(workdir).expanduser().absolute()
        _claim_directory(root)
        self._root, self._closed = root, False
        self._best_mode, self._best_value = best_mode, None
        self._async = async_save
        self._manifest_threads: list[threading.Thread] = []
        self._latest = self._best = None
        try:
            # Unfinished saves of an earlier process: removed before any manager looks.
            if _is_primary():
                integrity.remove_tmp_folders(root / _LATEST_DIR)
                integrity.remove_tmp_folders(root / _BEST_DIR)
            _sync("rosjax_checkpoint_tmp_cleanup")
            self._latest = _latest_manager(root / _LATEST_DIR, keep, async_save)
            self._best = _best_manager(root / _BEST_DIR, best_mode, async_save)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def directory(self) -> pathlib.Path:
        return pathlib.Path(self._latest.directory)

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return self._best.best_step()

    @staticmethod
    def _folder(manager, step: int) -> pathlib.Path:
        return pathlib.Path(manager.directory) / str(step)

    def _after_save(self, manager, step: int) -> None:
        """Writes the manifest of `step` once it is on disk (in the background if async)."""
        if not _is_primary():
            return
        folder = self._folder(manager, step)
        if not self._async:
            integrity.write_manifest_if_present(folder)
            return

        def when_finished():
            try:
                manager.wait_until_finished()  # safe from several threads (Orbax joins)
            except BaseException:  # noqa: BLE001 - the training thread sees it on its next wait
                return
            integrity.write_manifest_if_present(folder)

        thread = threading.Thread(target=when_finished, name=f"rosjax-manifest-{step}",
                                  daemon=True)
        thread.start()
        self._manifest_threads.append(thread)

    def _join_manifests(self) -> None:
        while self._manifest_threads:
            self._manifest_threads.pop(0).join()

    def save(self, step: int, *, state: Any, run_key: jax.Array, meta: dict[str, Any],
             iterator_state: dict, extras: dict[str, Any] | None = None) -> None:
        """Starts an (asynchronous) resume checkpoint of everything a run needs to continue.

        `iterator_state` is the train iterator's `get_state()` after the last batch trained on.
        """
        items = {**_save_items(state, run_key, meta, extras),
                 "data": grain.checkpoint.CheckpointSave(checkpoint_meta.IteratorPosition(iterator_state))}
        self._join_manifests()  # Orbax waits for the previous save here anyway
        self._latest.save(step, args=ocp.args.Composite(**items))
        self._after_save(self._latest, step)

    def best_value(self) -> float | None:
        """The metric of the best checkpoint (None before the first one)."""
        if self._best_value is None and self.best_step() is not None:
            self._best_value = self._best.metrics(self.best_step())[_BEST_METRIC]
        return self._best_value

    def save_best(self, step: int, value: float, *, state: Any, run_key: jax.Array,
                  meta: dict[str, Any], extras: dict[str, Any] | None = None) -> bool:
        """Saves a checkpoint scored `value` if it beats the best so far; returns whether it did.

        Ties keep the earlier checkpoint. A step that is already saved (a resumed run repeating
        an epoch end) is left as it is. `state` is what to keep of the best epoch: `loop.fit`
        passes the model (`TrainState.model_state()`), which is all that is exported.
        """
        best = self.best_value()
        if best is not None and not (value > best if self._best_mode == "max" else value < best):
            return False
        if step in self._best.all_steps():
            return False
        items = _save_items(state, run_key, meta, extras)
        self._join_manifests()
        self._best.save(step, args=ocp.args.Composite(**items),
                        metrics={_BEST_METRIC: float(value)})
        self._after_save(self._best, step)
        self._best_value = float(value)
        return True

    def restore(self, step: int, *, abstract_state: Any,
                abstract_extras: dict[str, Any] | None = None) -> Restored:
        """Restores resume checkpoint `step` onto the shardings of `abstract_state`.

        Raises CheckpointError if the step is damaged (see `restore_latest` for a fallback).
        """
        restored, problem = self._try_restore(self._latest, step, abstract_state,
                                              abstract_extras, with_data=True)
        if restored is None:
            folder = self._folder(self._latest, step)
            raise CheckpointError(f"checkpoint {folder} is damaged: {problem}. Delete it to "
                                  "resume from an earlier step, or delete the work directory "
                                  f"{self._root} to restart the run from scratch")
        return restored

    def restore_latest(self, *, abstract_state: Any,
                       abstract_extras: dict[str, Any] | None = None) -> Restored | None:
        """Restores the newest intact resume checkpoint (None if there is none at all).

        A damaged newer step is skipped with a WARNING and, once an intact one restored, moved
        to `<workdir>/damaged/`. Raises CheckpointError when every step is damaged.
        """
        steps = sorted(self._latest.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            restored, problem = self._try_restore(self._latest, step, abstract_state,
                                                  abstract_extras, with_data=True)
            if restored is not None:
                if damaged:
                    self._set_aside([folder for folder, _ in damaged])
                    log.warning("resuming from the earlier checkpoint %s instead",
                                self._folder(self._latest, step))
                return restored
            folder = self._folder(self._latest, step)
            log.warning("checkpoint %s is damaged and will not be used: %s", folder, problem)
            damaged.append((folder, problem))
        if damaged:
            listed = "; ".join(f"{folder}: {problem}" for folder, problem in damaged)
            raise CheckpointError(
                f"no intact resume checkpoint under {self.directory} ({listed}). Delete "
                f"{self.directory} (or the work directory {self._root}) to restart the run "
                "from scratch")
        return None

    def _set_aside(self, folders: list[pathlib.Path]) -> None:
        """Moves damaged step folders to <workdir>/damaged/ and makes the manager forget them."""
        _sync("rosjax_checkpoint_set_aside_start")
        if _is_primary():
            integrity.move_aside(folders, self._root)
        _sync("rosjax_checkpoint_set_aside_done")
        self._latest.reload()

    def restore_best(self, *, abstract_state: Any,
                     abstract_extras: dict[str, Any] | None = None) -> Restored:
        """Restores the best checkpoint (no data position) onto `abstract_state`'s shardings.

        Raises CheckpointError if it is damaged.
        """
        step = self.best_step()
        if step is None:
            raise FileNotFoundError(f"no best checkpoint under {self._best.directory}")
        restored, problem = self._try_restore(self._best, step, abstract_state,
                                              abstract_extras, with_data=False)
        if restored is None:
            folder = self._folder(self._best, step)
            raise CheckpointError(f"best checkpoint {folder} is damaged: {problem}. Delete the "
                                  f"work directory {self._root} to train again")
        return restored

    def _try_restore(self, manager, step, abstract_state, abstract_extras, with_data):
        """(Restored, None), or (None, what is wrong) for a damaged step.

        A verified step that fails to restore raises (the files are as written: the target
        does not fit them, e.g. another model); an unverified one counts as damaged.
        """
        status, problem = integrity.check_folder(self._folder(manager, step))
        if status == integrity.DAMAGED:
            return None, problem
        try:
            restored = self._restore(manager, step, abstract_state, abstract_extras, with_data)
        except Exception as e:  # noqa: BLE001
            if status == integrity.INTACT:
                raise
            return None, f"{problem} and does not restore ({type(e).__name__}: {e})"
        if status == integrity.UNVERIFIED and not integrity.all_finite((restored.state, restored.extras)):
            return None, f"{problem} and restores non-finite values"
        return restored, None

    @staticmethod
    def _restore(manager, step, abstract_state, abstract_extras, with_data) -> Restored:
        position = checkpoint_meta.IteratorPosition()
        items = {"state": _restore_tree(abstract_state), "meta": ocp.args.JsonRestore()}
        if abstract_extras:
            items["extras"] = _restore_tree(abstract_extras)
        if with_data:
            items["data"] = grain.checkpoint.CheckpointRestore(position)
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        meta = dict(restored["meta"])
        run_key = checkpoint_meta.key_from_json(meta.pop("run_key"))
        extras = dict(restored["extras"]) if abstract_extras else {}
        return Restored(step=step, state=restored["state"], extras=extras, run_key=run_key,
                        meta=meta, iterator_state=position.state if with_data else None)

    def wait_until_finished(self) -> None:
        """Blocks until every started save is on disk, with its manifest."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()
        self._join_manifests()

    def close(self) -> None:
        """Waits for pending saves and manifests and releases the managers' threads.

        Idempotent; the work directory can be opened again afterwards.
        """
        if self._closed:
            return
        self._closed = True
        try:
            try:
                if self._latest is not None:
                    self._latest.close()
            finally:
                try:
                    if self._best is not None:
                        self._best.close()
                finally:
                    self._join_manifests()
        finally:
            with _open_lock:
                _open_dirs.discard(self._root)


def save_variables(path: str | os.PathLike, variables: Any) -> None:
    """Writes a finished model's variables (any pytree of arrays) to the folder `path`.

    Overwrites an existing folder; the write is atomic (temporary folder + rename), and
    followed by the folder's checksum manifest.
    """
    path = pathlib.Path(path).expanduser().absolute()
    checkpointer = ocp.Checkpointer(_array_handler())
    try:
        checkpointer.save(path, args=ocp.args.PyTreeSave(variables), force=True)
    finally:
        checkpointer.close()
    if _is_primary():
        integrity.write_manifest(path)
    _sync("rosjax_save_variables_manifest")


def load_variables(path: str | os.PathLike,
                   sharding: jax.sharding.Sharding | None = None) -> Any:
    """Reads variables written by `save_variables` as jax arrays placed with `sharding`.

    Default placement: the first local device (what a notebook wants); pass
    `parallel.replicated(mesh)` to place frozen teachers on every device of a mesh. Raises
    CheckpointError if the folder does not match its checksum manifest (or, without one,
    does not restore).
    """
    path = pathlib.Path(path).expanduser().absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no saved variables at {path}")
    how_to_fix = (f"delete {path} and rerun the stage that wrote it (for a training stage, "
                  "also delete its work directory to retrain)")
    status, problem = integrity.check_folder(path)
    if status == integrity.DAMAGED:
        raise CheckpointError(f"saved variables {path} are damaged: {problem}; {how_to_fix}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree = checkpointer.metadata(path).item_metadata.tree
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
        variables = checkpointer.restore(path, target)
    except Exception as e:  # noqa: BLE001
        if status == integrity.INTACT:
            raise
        raise CheckpointError(f"saved variables {path} ({problem}) do not restore "
                              f"({type(e).__name__}: {e}); {how_to_fix}") from e
    finally:
        checkpointer.close()
    if status == integrity.UNVERIFIED and not integrity.all_finite(variables):
        raise CheckpointError(f"saved variables {path} ({problem}) hold non-finite values; "
                              f"{how_to_fix}")
    return variables
