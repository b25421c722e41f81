"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

The temporary file gets a unique name in the target's folder, so concurrent writers of one
file (jobs sharing a work directory) never collide; `os.replace` then swaps it in. The name
also records the writer (`.<name>.<host>-<pid>.<random>.tmp`), so that a run started after a
kill can remove the temporary files of writers that died mid-write (`remove_orphans`) without
touching those of a concurrent job that is still writing.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import tempfile
from typing import Any

_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def _host() -> str:
    """This machine's name, reduced to the characters a temporary file's name may hold."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (the folder must exist)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host()}-{os.getpid()}.",
                               suffix=".tmp")
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_orphans(root: str | os.PathLike) -> list[pathlib.Path]:
    """Deletes the temporary files under `root` that a writer on this host left when it was
    killed mid-write (its process is gone); returns them.

    Those of live processes, and of other hosts (a shared file system), are left alone: they
    may belong to a concurrent job that is still writing.
    """
    host, removed = _host(), []
    for path in pathlib.Path(root).rglob(".*.tmp"):
        match = _TEMP_NAME.match(path.name)
        if match and match["host"] == host and not _alive(int(match["pid"])) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
