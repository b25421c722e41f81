"""The work directory of one experiment, and the completion markers that make stages resumable.

Layout (documented in the README):

    WORKDIR/
      config.json                      the resolved ExperimentConfig
      data/summary.json                split sizes, groups shared between splits, teacher subsets
      teachers/<i>-<arch>/             one teacher: ckpt/ (Orbax), metrics.jsonl, final/, DONE.json
      settings/<setting>/              one student setting (rosjax.experiment.settings): same files
      eval/<setting>.json              test metrics, attacks
      eval/<setting>.test.npz          test-split logits [N, C], labels, losses (the report's bootstrap)
      plots/*.png                      landscapes and sweep figures
      sweeps/<sweep>/<point>/          a nested WORKDIR per sweep point
      seeds/<seed>/                    a nested WORKDIR per extra seed of --seeds (rosjax.experiment.seeds)
      report.json, report.md

A stage is complete when its `DONE.json` exists; it is written atomically (temp file + rename)
as the stage's last act, so a crash leaves no marker and the rerun redoes (or resumes) it.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from rosjax import atomic
from rosjax import config as config_lib
from rosjax.errors import UserError


class Workdir:
    """Paths of an experiment's work directory; creates folders on demand."""

    def __init__(self, root: str | os.PathLike):
        self.root = self.resolve(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def resolve(root: str | os.PathLike) -> pathlib.Path:
        """The absolute path of a work directory, without creating it."""
        return pathlib.Path(root).expanduser().resolve()

    def path(self, *parts: str) -> pathlib.Path:
        """`root/parts...`, creating the parent folder."""
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def folder(self, *parts: str) -> pathlib.Path:
        """`root/parts...` as a folder, created if missing."""
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def teacher_dir(self, index: int, architecture: str) -> pathlib.Path:
        return self.folder("teachers", f"{index}-{architecture}")

    def setting_dir(self, setting: str) -> pathlib.Path:
        return self.folder("settings", setting)


class StageBusyError(UserError):
    """Another process is running the same stage in the same work directory."""


class StageClaim:
    """An exclusive claim on a stage's folder (an `flock` on `<folder>/.lock`), for concurrent jobs.

    Jobs of the README's one-job-per-teacher mode share a work directory; two jobs that would
    train the same teacher or setting at once would write one checkpoint folder from two
    processes. The second one is refused instead. The lock is released by `release()`, or by
    the operating system when the process ends (a killed job never leaves a stale lock).
    """

    def __init__(self, folder: pathlib.Path):
        import fcntl  # noqa: PLC0415 (POSIX only; imported where used)

        self._file = open(folder / ".lock", "a+")  # noqa: SIM115 (held for the stage's lifetime)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise StageBusyError(f"another job is running {folder} right now; wait for it to finish "
                                 "(its results will then be reused)") from None

    def release(self) -> None:
        self._file.close()  # closing the file drops the lock


@contextlib.contextmanager
def claim_unless_done(folder: pathlib.Path) -> Iterator[dict[str, Any] | None]:
    """The `with` block of a stage that runs at most once: yields the stage's DONE record when
    it has finished (nothing is claimed), else None while the block holds its `StageClaim`.

    The record is read twice: before claiming (a finished stage needs no lock) and after (the
    job that held the claim may have finished meanwhile). The claim is released when the block
    ends, also by an exception; StageBusyError if another job holds it.
    """
    if (record := done(folder)) is not None:
        yield record
        return
    claim = StageClaim(folder)
    try:
        yield done(folder)
    finally:
        claim.release()


def write_json(path: pathlib.Path, payload: Any) -> None:
    """Writes JSON atomically: readers see the old file or the new one, never half of one."""
    atomic.write_json(path, payload)  # unique temporary names: concurrent jobs write the same files


def read_json(path: pathlib.Path) -> Any:
    return json.loads(pathlib.Path(path).read_text())


def mark_done(folder: pathlib.Path, payload: dict[str, Any]) -> None:
    """Records that the stage owning `folder` finished, with its results."""
    write_json(folder / "DONE.json", payload)


def done(folder: pathlib.Path) -> dict[str, Any] | None:
    """The stage's results if it finished, else None."""
    marker = folder / "DONE.json"
    return read_json(marker) if marker.exists() else None


class WorkdirConflictError(UserError, ValueError):
    """The work directory belongs to a run with another configuration."""


# Fields that do not change any number a run produces: where files are, how much is logged,
# how often a resumable checkpoint is taken, how many decode workers and evaluation images per
# batch (evaluation runs in inference mode, one example independent of the next). A rerun may
# change them; every other field must match the recorded configuration. `settings` and `seeds`
# only say which runs to add (each seed's run is pinned by its own config.json); the report's
# bootstrap is recomputed from stored test predictions on every report and records its draws.
NOT_RESULT_FIELDS = frozenset({
    "data.data_dir", "data.manual_dir", "data.download", "data.num_workers", "data.eval_batch_size",
    "distill.cache_batch_size", "checkpoint_every_steps", "log_every_steps", "settings", "seeds", "logging.wandb",
    "evaluation.bootstrap_resamples", "evaluation.bootstrap_seed"})


def check_config(root: pathlib.Path, config: dict[str, Any], *, write: bool = True) -> None:
    """Records `config` in `root/config.json`, or refuses one that differs in a result field.

    A resumed run must use the configuration it started with; mixing two in one work
    directory would silently combine incompatible checkpoints and results. Fields of
    `NOT_RESULT_FIELDS` may differ (the recorded file is updated to the latest values), and a
    field added to rosjax after the run started counts as unchanged while it has its default.
    `write=False` only checks.
    """
    config = json.loads(json.dumps(config))  # tuples -> lists, as they are stored
    path = pathlib.Path(root) / "config.json"
    if path.exists():
        try:
            previous = read_json(path)
        except json.JSONDecodeError as err:
            raise WorkdirConflictError(f"{path} is damaged ({err.msg} at line {err.lineno}); restore it, or "
                                       "delete it to adopt this run's options") from None
        changed = sorted(k for k in _diff(previous, config) if k not in NOT_RESULT_FIELDS
                         and not (_absent(previous, k) and _get(config, k) == config_lib.field_default(k)))
        if changed:
            shown = ", ".join(f"{k} {_get(previous, k)!r} -> {_get(config, k)!r}" for k in changed[:6])
            raise WorkdirConflictError(f"{root} holds a run of another configuration ({shown}); "
                                       "use a new --workdir or the original options")
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, config)


def _absent(tree: dict, dotted: str) -> bool:
    """Whether a (newer) field is missing from a recorded configuration."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return not isinstance(tree, dict) or leaf not in tree


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the entries that differ between two nested dicts."""
    out = []
    for k in set(a) | set(b):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(prefix + k)
    return out
