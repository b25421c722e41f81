"""rosjax.atomic: a writer killed mid-write leaves a temporary file that the next run removes,
while a live writer's temporary file (a concurrent job) is left alone."""
import os
import pathlib
import signal
import subprocess
import sys
import time

from rosjax import atomic

# Writes target.json with os.replace held back, so the kill lands between the write and the swap.
_STUCK_WRITER = """
import os, sys, time
from rosjax import atomic
os.replace = lambda *a: time.sleep(600)
atomic.write_json(sys.argv[1], {"step": 1})
"""


def _temporaries(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_writer_killed_mid_write_leaves_an_orphan_that_is_removed(tmp_path):
    target = tmp_path / "sub" / "target.json"
    target.parent.mkdir()
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    writer = subprocess.Popen([sys.executable, "-c", _STUCK_WRITER, str(target)], env=env)
    deadline = time.monotonic() + 60
    while not _temporaries(target.parent) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphan = _temporaries(target.parent)
    assert len(orphan) == 1 and orphan[0].startswith(".target.json.") and str(writer.pid) in orphan[0]

    # While its writer lives the file is another job's write in progress: kept.
    assert atomic.remove_orphans(tmp_path) == []
    assert _temporaries(target.parent) == orphan

    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert [p.name for p in atomic.remove_orphans(tmp_path)] == orphan
    assert _temporaries(target.parent) == [] and not target.exists()


def test_files_of_other_hosts_and_other_names_are_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    kept = [f".a.json.otherhost-{pid}.x1y2.tmp",  # a shared file system: another host's writer
            "notes.tmp",                           # not a name this module writes
            ".b.json.tmp"]
    for name in kept:
        (tmp_path / name).write_text("x")
    host = atomic._host()  # noqa: SLF001 - the name the writer records
    (tmp_path / f".c.json.{host}-{pid}.q9.tmp").write_text("x")
    assert [p.name for p in atomic.remove_orphans(tmp_path)] == [f".c.json.{host}-{pid}.q9.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_write_swaps_in_the_whole_file_and_leaves_no_temporary(tmp_path):
    atomic.write_json(tmp_path / "t.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "t.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}'
    assert _temporaries(tmp_path) == []
