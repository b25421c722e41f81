"""Where an experiment's wall-clock goes: XLA tracing, lowering, compiling and cache reads,
Orbax checkpoint writes and reads, and the rest (running the programs, input, Python).

    python -m experiments.time_budget lesion --smoke --workdir work/smoke-timed
    python -m experiments.time_budget nih_cxr --smoke --workdir work/nih-smoke-timed

The first argument names the experiment module (`experiments.<name>`); every other argument is
that experiment's own command line. The run is the experiment's, unchanged: this module only
listens to the durations JAX and Orbax already record (`jax.monitoring`), and sums them per
thread. The main thread's sums are what the run waits for; the compile-ahead threads'
(`rosjax.experiment.training.CompileAhead`) run beside it and cost wall-clock only through
the cores they take, so they are shown apart. What the main thread's sums leave of the
wall-clock is the programs running, the input pipeline and Python.
"""
from __future__ import annotations

import collections
import importlib
import sys
import threading
import time

from jax import monitoring

from rosjax.experiment import cli

# (row label, jax.monitoring event) in the order of a program's life; each event is recorded
# once per occurrence in the thread that waited for it, and none contains another.
PHASES = (
    ("tracing to jaxpr", "/jax/core/compile/jaxpr_trace_duration"),
    ("lowering to MLIR", "/jax/core/compile/jaxpr_to_mlir_module_duration"),
    ("XLA compiling", "/jax/core/compile/backend_compile_duration"),
    ("persistent-cache reads", "/jax/compilation_cache/cache_retrieval_time_sec"),
    ("checkpoint writes (blocking part)", "/jax/orbax/write/blocking_duration_secs"),
    ("checkpoint reads", "/jax/orbax/read/total_duration_secs"),
)
_PHASE_EVENTS = frozenset(event for _, event in PHASES)


class DurationLog:
    """Sums the durations of `PHASES`' events per (thread role, event) while installed.

    Thread role: "main" for the main thread, "beside" for every other thread. Use as a context
    manager; outside it nothing is recorded (the listener is unregistered on exit).
    """

    def __init__(self):
        self.totals: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.counts: dict[tuple[str, str], int] = collections.defaultdict(int)
        self._lock = threading.Lock()

    def _listen(self, event: str, seconds: float, **_kwargs) -> None:
        if event not in _PHASE_EVENTS:
            return
        role = "main" if threading.current_thread() is threading.main_thread() else "beside"
        with self._lock:
            self.totals[role, event] += seconds
            self.counts[role, event] += 1

    def __enter__(self) -> DurationLog:
        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        monitoring.unregister_event_duration_listener(self._listen)

    def table(self, wall_s: float) -> str:
        """The per-phase table: seconds and counts on the main thread and beside it, then the
        main thread's remainder of `wall_s`."""
        lines = [f"{'':36s} {'main thread':>14s} {'other threads':>16s}"]
        for label, event in PHASES:
            cells = [f"{self.totals[role, event]:7.1f} s {self.counts[role, event]:4d}x" for role in ("main", "beside")]
            lines.append(f"{label:36s} {cells[0]:>14s} {cells[1]:>16s}")
        accounted = sum(self.totals["main", event] for _, event in PHASES)
        lines.append(f"{'running, input, Python (the rest)':36s} {wall_s - accounted:7.1f} s")
        lines.append(f"{'wall-clock':36s} {wall_s:7.1f} s")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: python -m experiments.time_budget EXPERIMENT [its options], e.g. lesion --smoke",
              file=sys.stderr)
        return 2
    try:
        experiment = importlib.import_module(f"experiments.{argv[0]}")
    except ModuleNotFoundError as err:
        if err.name != f"experiments.{argv[0]}":  # the module exists; something it imports is missing
            raise
        print(f"error: no experiment module experiments.{argv[0]} (try lesion or nih_cxr)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with DurationLog() as log:
        status = cli.main(experiment.get_config, argv[1:])
    print(log.table(time.perf_counter() - start))
    return status


if __name__ == "__main__":
    sys.exit(main())
