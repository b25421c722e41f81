"""Experiment-level kill stress: SIGKILL a tiny `python -m experiments.lesion` run at moments in
every stage - mid-save (a teacher's, a student's, a sweep point's temporary Orbax
folder exists), mid-epoch, mid-cache-build, mid-evaluation, mid-report - rerun the same
command each time, and check that the run that finally ends has exactly the report of a run
that was never interrupted (but for the wall-clock fields).

One workdir takes the kills one after another (each restart is killed at the next moment),
so the whole pipeline is paid for twice (straight run, killed chain) rather than once per
moment; the history printed on failure (moment, seconds after start, what was on disk) names
the sequence. The random parts of the moments come from np.random.default_rng(SEED).

The configuration is tests/test_experiment.py's TINY, cut to two teachers, the two settings
the sweeps compare, and one sweep point that trains (weights=none), with cached teacher
outputs (so a cache build happens) and a checkpoint after every step.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = 0
RUN_TIMEOUT_S = 900

# tests/test_experiment.py's TINY, smaller (see the module docstring).
KILL_CONFIG = {
    "teachers.architectures": "tiny_cnn,tiny_cnn", "teachers.single_teacher": "tiny_cnn",
    "distill.student": "tiny_cnn", "optim.epochs": "3", "distill.warmup_epochs": "1",
    "settings": "baseline_iii,ros_kd",
    "sweeps.overlaps": "0.4", "sweeps.students": "tiny_cnn", "sweeps.normalizations": "none,sum1",
    "distill.teacher_outputs": "cached", "distill.cache_batch_size": "8",
    "checkpoint_every_steps": "1",
}

# --- comparing reports ------------------------------------------------------------------------

# Keys whose values are wall-clock measurements: they differ between any two runs.
_TIMING_KEY = re.compile(r"(^|_)(s|sec|secs|seconds|time|timestamp)$|wall_clock|per_s|started|finished")


def without_timing(value: Any) -> Any:
    """`value` with every wall-clock entry (`wall_clock_s`, `epoch_seconds`, `images_per_s`,
    `*_s`, timestamps) dropped, recursively; the rest of a run is deterministic."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not _TIMING_KEY.search(str(k))}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where `a` and `b` differ, with both values (exact comparison)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in (differences(a[k], b[k], f"{path}.{k}") if k in a and k in b
                          else [f"{path}.{k}: only in {'first' if k in a else 'second'}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


def leftovers(workdir: pathlib.Path) -> list[str]:
    """Temporary files and folders a finished run should not leave behind."""
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")
                  if p.name.endswith(".tmp") or ".orbax-checkpoint-tmp" in p.name)


def test_comparison_flags_a_changed_metric_and_ignores_timing():
    report = {"settings": {"ros_kd": {"wall_clock_s": 3.5, "test": {"f1_macro": 0.25, "loss": 2.0}}},
              "teachers": [{"wall_clock_s": 1.0, "best_step": 3, "epoch_seconds": 0.4, "images_per_s": 9.0}]}
    slower = json.loads(json.dumps(report))
    slower["settings"]["ros_kd"]["wall_clock_s"] = 99.0
    slower["teachers"][0].update(wall_clock_s=7.0, epoch_seconds=2.0, images_per_s=1.0)
    assert without_timing(slower) == without_timing(report)
    assert without_timing(report)["teachers"] == [{"best_step": 3}]

    changed = json.loads(json.dumps(report))
    changed["settings"]["ros_kd"]["test"]["f1_macro"] = 0.25 + 1e-12  # exact: no tolerance
    assert without_timing(changed) != without_timing(report)
    assert differences(without_timing(report), without_timing(changed)) == [
        f".settings.ros_kd.test.f1_macro: 0.25 != {0.25 + 1e-12!r}"]
    changed["teachers"][0]["best_step"] = 6
    del changed["settings"]["ros_kd"]["test"]["loss"]
    assert len(differences(without_timing(report), without_timing(changed))) == 3
    assert differences([1, 2], [1, 2, 3]) == [": [1, 2] != [1, 2, 3]"]
    assert differences({"a": 1}, {"a": 1.0}) == [".a: 1 != 1.0"]


def test_leftovers_finds_temporary_files(tmp_path):
    (tmp_path / "settings" / "ros_kd" / "ckpt" / "7.orbax-checkpoint-tmp-3").mkdir(parents=True)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / ".rosjax.json.x1y2.tmp").write_text("{")
    (tmp_path / "eval" / "rosjax.json").write_text("{}")
    assert leftovers(tmp_path) == ["eval/.rosjax.json.x1y2.tmp", "settings/ros_kd/ckpt/7.orbax-checkpoint-tmp-3"]


# --- kill moments -----------------------------------------------------------------------------


def _tmp_checkpoint(workdir: pathlib.Path, stage_glob: str) -> bool:
    """A temporary (unfinished) Orbax folder exists in a ckpt/ or best/ folder of `stage_glob`."""
    return any(workdir.glob(f"{stage_glob}/ckpt/*orbax-checkpoint-tmp*")) or any(
        workdir.glob(f"{stage_glob}/best/*orbax-checkpoint-tmp*"))


def _lines(path: pathlib.Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def _gains_a_line(pattern: str) -> Callable:
    """Trigger factory: fires once a file matching `pattern` has more lines than at the restart."""
    def arm(workdir: pathlib.Path):
        before = {p: _lines(p) for p in workdir.glob(pattern)}
        return lambda: any(_lines(p) > before.get(p, 0) for p in workdir.glob(pattern))
    return arm


def _exists(*patterns: str) -> Callable:
    return lambda workdir: lambda: any(any(workdir.glob(p)) for p in patterns)


def _tmp_in(stage_glob: str) -> Callable:
    return lambda workdir: lambda: _tmp_checkpoint(workdir, stage_glob)


def _cache_partly_built() -> Callable:
    """Fires once the teacher cache records some finished batches (the build is under way)."""
    def done(workdir: pathlib.Path) -> bool:
        try:
            return json.loads((workdir / "teacher_cache" / "progress.json").read_text())["done"] > 0
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False
    return lambda workdir: lambda: done(workdir)


# (name, trigger, extra delay range in seconds after the trigger fires), in pipeline order. A
# trigger is armed when the restart begins (so "gains a line" means a new line of this run).
MOMENTS = (
    ("teacher mid-save", _tmp_in("teachers/*"), (0.0, 0.0)),
    ("teacher mid-epoch", _gains_a_line("teachers/1-*/metrics.jsonl"), (0.0, 0.4)),
    ("mid-cache-build", _cache_partly_built(), (0.0, 0.05)),
    ("student mid-save", _tmp_in("settings/*"), (0.0, 0.0)),
    ("student mid-step", _gains_a_line("settings/ros_kd/metrics.jsonl"), (0.0, 0.6)),
    ("mid-evaluation", _exists("eval/*.json"), (0.0, 1.5)),
    ("sweep point mid-save", _tmp_in("sweeps/*/*/settings/*"), (0.0, 0.0)),
    ("mid-report", _exists("eval/sweeps.json"), (0.0, 0.0)),
)
# Moments whose window is a few milliseconds: a miss (the stage ended first) is noted, not failed.
BEST_EFFORT = {"mid-report"}


def _snapshot(workdir: pathlib.Path) -> dict[str, Any]:
    """What was on disk when a run was killed (for the failure message)."""
    progress = workdir / "teacher_cache" / "progress.json"
    try:
        cache = json.loads(progress.read_text()) if progress.exists() else None
    except json.JSONDecodeError:
        cache = "unreadable"
    return {"done": sorted(str(p.parent.relative_to(workdir)) for p in workdir.rglob("DONE.json")),
            "eval": sorted(p.name for p in workdir.glob("eval/*.json")), "cache": cache,
            "tmp": leftovers(workdir), "report": (workdir / "report.json").exists()}


class Runs:
    """Starts `python -m experiments.lesion` on a work directory, killed or to completion."""

    def __init__(self, base: pathlib.Path, data_dir: pathlib.Path, xla_cache: pathlib.Path):
        self.base = base
        self.data_dir = data_dir
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "ROSJAX_COMPILATION_CACHE": str(xla_cache)}
        self.count = 0

    def command(self, workdir: pathlib.Path, stage: str = "all") -> list[str]:
        overrides = {**KILL_CONFIG, "data.data_dir": str(self.data_dir)}
        return [sys.executable, "-m", "experiments.lesion", "--smoke", "--workdir", str(workdir),
                "--stage", stage, *(f"--{k}={v}" for k, v in overrides.items())]

    def start(self, workdir: pathlib.Path, stage: str = "all") -> tuple[subprocess.Popen, pathlib.Path]:
        self.count += 1
        log = self.base / f"{workdir.name}-{self.count:02d}.log"
        with log.open("w") as out:  # a file, not a pipe: nobody reads the output while we poll
            proc = subprocess.Popen(self.command(workdir, stage), cwd=REPO, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log

    def complete(self, workdir: pathlib.Path, stage: str = "all") -> tuple[int, str]:
        proc, log = self.start(workdir, stage)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        return code, log.read_text()

    def kill_at(self, workdir: pathlib.Path, trigger, delay_s: float) -> dict[str, Any]:
        """Starts a run, SIGKILLs its process group `delay_s` after `trigger` fires (polled every
        5 ms); returns what happened. A run that ends first is let be."""
        fired = trigger(workdir)  # armed before the run starts
        proc, log = self.start(workdir)
        started, deadline = time.monotonic(), time.monotonic() + RUN_TIMEOUT_S
        event = {}
        while proc.poll() is None and time.monotonic() < deadline:
            if not event and fired():
                event = {"fired_at_s": round(time.monotonic() - started, 2)}
                kill_time = time.monotonic() + delay_s
            if event and time.monotonic() >= kill_time:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {**event, "killed_at_s": round(time.monotonic() - started, 2), "exit": proc.returncode,
                        "on_disk": _snapshot(workdir), "log": log.name}
            time.sleep(0.005)
        if proc.poll() is None:  # timed out without the trigger
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return {**event, "killed_at_s": None, "exit": proc.returncode, "on_disk": _snapshot(workdir),
                "log": log.name, "log_tail": log.read_text()[-2000:]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill-experiment")
    runner = Runs(base, data_dir=base / "tfds", xla_cache=base / "xla")
    code, log = runner.complete(base / "prepare", stage="data")  # the dataset, once, shared
    assert code == 0, log[-3000:]
    return runner


@pytest.fixture(scope="module")
def reference(runs):
    workdir = runs.base / "straight"
    started = time.perf_counter()
    code, log = runs.complete(workdir)
    assert code == 0, log[-3000:]
    print(f"straight run: {time.perf_counter() - started:.0f} s")
    assert not leftovers(workdir)
    report = json.loads((workdir / "report.json").read_text())
    # The configuration exercises every stage the kills aim at.
    assert report["settings"]["ros_kd"]["teacher_outputs"] == "cached"
    assert set(report["sweeps"]["weights"]["points"]) == {"none", "sum1"}
    assert (workdir / "teacher_cache" / "progress.json").exists()
    return report


@pytest.mark.slow
def test_killed_at_every_stage_resumes_to_the_straight_runs_report(runs, reference):
    rng = np.random.default_rng(SEED)
    workdir = runs.base / "killed"
    history = []
    started = time.perf_counter()
    for name, trigger, (low, high) in MOMENTS:
        delay = float(rng.uniform(low, high)) if high > low else low
        outcome = runs.kill_at(workdir, trigger, delay)
        history.append({"moment": name, "delay_s": round(delay, 3), **outcome})
        note = json.dumps(history, indent=1, default=str)
        if outcome["killed_at_s"] is None:
            # The run got to its end before the moment came (or hung): it must have succeeded.
            assert outcome["exit"] == 0, note
            break
        assert outcome["exit"] == -signal.SIGKILL, note

    code, log = runs.complete(workdir)
    history.append({"moment": "final run", "exit": code})
    note = json.dumps(history, indent=1, default=str)
    print(f"killed chain: {time.perf_counter() - started:.0f} s\n{note}")
    assert code == 0, f"{note}\n{log[-3000:]}"

    problems = []
    resumed = json.loads((workdir / "report.json").read_text())
    if diff := differences(without_timing(reference), without_timing(resumed)):
        problems.append("the resumed report differs from the straight run's:\n  " + "\n  ".join(diff[:40]))
    if left := leftovers(workdir):
        problems.append(f"temporary files left behind: {left}")
    # No run raised (not even a background thread of a killed one), and a kill never left a
    # checkpoint that restores as damaged (no restart had to fall back to an older step).
    logs = {h["log"]: (runs.base / h["log"]).read_text() for h in history if "log" in h} | {"final": log}
    problems += [f"{name}: {line}" for name, text in logs.items() for line in text.splitlines()
                 if "Traceback" in line or "damaged" in line]
    # Every moment but the millisecond-wide ones was hit while its stage was running.
    hit = {h["moment"] for h in history if h.get("killed_at_s") is not None
           and not (h["moment"] == "mid-report" and h["on_disk"]["report"])}
    print("moments hit:", sorted(hit), "missed:", [m for m, _, _ in MOMENTS if m not in hit])
    if missed := [m for m, _, _ in MOMENTS if m not in hit and m not in BEST_EFFORT]:
        problems.append(f"moments missed: {missed}")
    # A mid-save kill left an unfinished checkpoint for the restart to clean up.
    if not any(h["on_disk"]["tmp"] for h in history if "mid-save" in h["moment"] and "on_disk" in h):
        problems.append("no mid-save kill caught a temporary checkpoint folder")
    cache = next((h["on_disk"]["cache"] for h in history if h["moment"] == "mid-cache-build"), None)
    if isinstance(cache, dict) and cache["done"] >= cache["total"]:
        problems.append(f"the mid-cache-build kill came after the cache was complete: {cache}")
    assert not problems, "\n".join(problems) + f"\n{note}"
