"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

The temporary file gets a unique name in the target's folder, so concurrent writers of one
file (jobs sharing a work directory) never collide; `os.replace` then swaps it in.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (the folder must exist)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, payload: Any, **dumps_options: Any) -> None:
    """Writes `payload` as indented, key-sorted JSON to `path` atomically."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, **dumps_options))
