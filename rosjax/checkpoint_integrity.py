"""Checkpoint integrity on disk: checksum manifests, damaged folders, unfinished saves.

Plain files only (no Orbax: `rosjax.checkpoint` is the one module that talks to it, and it
calls these):

* `write_manifest(folder)` writes `<folder>/rosjax_manifest.json`, the size and sha256 of every
  file of a finished checkpoint or saved-variables folder;
* `check_folder(folder)` says whether a folder is intact (matches its manifest), unverified
  (has none: the process died between the save and the manifest) or damaged, and why;
* `move_aside(folders, root)` moves damaged step folders to `<root>/damaged/`, so a resumed run
  can write those steps again, and keeps them for inspection;
* `remove_tmp_folders(directory)` deletes the temporary folders of saves that never finished;
* `all_finite(tree)`: an unverified folder counts as damaged when it restores NaN or Inf.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

MANIFEST_FILE = "rosjax_manifest.json"
DAMAGED_DIR = "damaged"           # <workdir>/damaged/: step folders that failed their check
ORBAX_TMP = ".orbax-checkpoint-tmp"  # the name part of Orbax's folders of unfinished saves
_MANIFEST_FORMAT = 1

INTACT, UNVERIFIED, DAMAGED = "intact", "unverified", "damaged"


def _files_of(folder: pathlib.Path) -> list[pathlib.Path]:
    """Every file under `folder` (sorted), except the manifest and its temporary copy."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(MANIFEST_FILE))


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> None:
    """Writes `<folder>/rosjax_manifest.json`: size and sha256 of every file under `folder`.

    Call it only on a finished checkpoint folder. The write is atomic (temporary file + rename).
    """
    folder = pathlib.Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files_of(folder)}
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": _MANIFEST_FORMAT, "files": files}, indent=0))
    os.replace(tmp, folder / MANIFEST_FILE)


def write_manifest_if_present(folder: pathlib.Path) -> None:
    """`write_manifest` for a save that may have failed or been deleted meanwhile (logged, not raised)."""
    try:
        if folder.is_dir():
            write_manifest(folder)
    except OSError as e:  # e.g. the step was deleted by the preservation policy meanwhile
        log.warning("could not write the checksum manifest of %s: %s", folder, e)


def check_folder(folder: str | os.PathLike) -> tuple[str, str | None]:
    """('intact', None), ('unverified', why) or ('damaged', why) for a checkpoint folder.

    Intact: every file listed in the manifest is there with its size and sha256. Unverified:
    there is no manifest. Files that are not in the manifest are not checked.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return DAMAGED, "the folder is missing"
    manifest = folder / MANIFEST_FILE
    if not manifest.exists():
        return UNVERIFIED, "it has no checksum manifest"
    try:
        files = json.loads(manifest.read_text())["files"]
        listed = [(name, int(entry["size"]), str(entry["sha256"]))
                  for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return DAMAGED, f"its manifest {MANIFEST_FILE} is unreadable ({e})"
    for name, size, sha in listed:
        path = folder / name
        if not path.is_file():
            return DAMAGED, f"{name} is missing"
        if path.stat().st_size != size:
            return DAMAGED, f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _sha256(path) != sha:
            return DAMAGED, f"{name} does not match its sha256 checksum"
    return INTACT, None


def move_aside(folders: list[pathlib.Path], root: pathlib.Path) -> None:
    """Moves damaged step folders to `<root>/damaged/<manager>-<step>` (a free name: `.1`, `.2`, ...)."""
    target_dir = root / DAMAGED_DIR
    target_dir.mkdir(exist_ok=True)
    for folder in folders:
        target, n = target_dir / f"{folder.parent.name}-{folder.name}", 1
        while target.exists():
            target, n = target_dir / f"{folder.parent.name}-{folder.name}.{n}", n + 1
        if folder.exists():
            os.replace(folder, target)
            log.warning("moved the damaged checkpoint %s to %s (delete it when no longer needed)", folder, target)


def remove_tmp_folders(directory: pathlib.Path) -> None:
    """Removes the temporary folders of unfinished saves in `directory` (synchronously)."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if ORBAX_TMP in path.name:
            log.info("removing the unfinished checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():  # ignore_errors hides real failures: try once more, loudly
                shutil.rmtree(path)


@jax.jit
def _finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
    """Whether every float in `tree` is finite (one compiled reduction over all leaves)."""
    leaves = [x for x in jax.tree.leaves(tree)
              if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jnp.inexact)]
    return not leaves or bool(_finite(leaves))
