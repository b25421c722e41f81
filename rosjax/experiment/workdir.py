"""The work directory of one experiment, and the completion markers that make stages resumable.

Layout (documented in the README):

    WORKDIR/
      config.json                      the resolved ExperimentConfig
      data/split.json                  split and teacher-subset indices, sizes, group overlap
      teachers/<i>-<arch>/             one teacher: ckpt/ (Orbax), metrics.jsonl, final/, DONE.json
      settings/<setting>/              one student setting (baseline_i, ..., rosjax): same files
      eval/<setting>.json              test metrics, attacks
      plots/*.png                      landscapes and sweep figures
      sweeps/<sweep>/<point>/          a nested WORKDIR per sweep point
      report.json, report.md

A stage is complete when its `DONE.json` exists; it is written atomically (temp file + rename)
as the stage's last act, so a crash leaves no marker and the rerun redoes (or resumes) it.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any


class Workdir:
    """Paths of an experiment's work directory; creates folders on demand."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

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


def write_json(path: pathlib.Path, payload: Any) -> None:
    """Writes JSON atomically: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: pathlib.Path) -> Any:
    return json.loads(pathlib.Path(path).read_text())


def mark_done(folder: pathlib.Path, payload: dict[str, Any]) -> None:
    """Records that the stage owning `folder` finished, with its results."""
    write_json(folder / "DONE.json", payload)


def done(folder: pathlib.Path) -> dict[str, Any] | None:
    """The stage's results if it finished, else None."""
    marker = folder / "DONE.json"
    return read_json(marker) if marker.exists() else None


class WorkdirConflictError(ValueError):
    """The work directory belongs to a run with another configuration."""


def check_config(wd: Workdir, config: dict[str, Any]) -> None:
    """Records `config` in `wd/config.json`, or refuses a different one already recorded there.

    A resumed run must use the configuration it started with; mixing two in one work
    directory would silently combine incompatible checkpoints and results.
    """
    config = json.loads(json.dumps(config))  # tuples -> lists, as they are stored
    path = wd.path("config.json")
    if not path.exists():
        write_json(path, config)
        return
    previous = read_json(path)
    if previous != config:
        changed = ", ".join(sorted(_diff(previous, config)))
        raise WorkdirConflictError(f"{wd.root} holds a run of another configuration (changed: {changed}); "
                         "use a new --workdir or the original options")


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the entries that differ between two nested dicts."""
    out = []
    for k in set(a) | set(b):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(prefix + k)
    return out
