"""experiments.time_budget: the per-thread sums of JAX's and Orbax's recorded durations."""
from __future__ import annotations

import threading

import pytest
from jax import monitoring

from experiments import time_budget

TRACE, COMPILE = "/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration"


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_sums_per_thread_while_installed_only():
    monitoring.record_event_duration_secs(TRACE, 100.0)  # before: not counted
    with time_budget.DurationLog() as log:
        monitoring.record_event_duration_secs(TRACE, 0.25)
        monitoring.record_event_duration_secs(TRACE, 0.5)
        monitoring.record_event_duration_secs("/jax/some/other/event", 7.0)  # not a phase
        worker = threading.Thread(target=monitoring.record_event_duration_secs, args=(COMPILE, 1.5))
        worker.start()
        worker.join()
    monitoring.record_event_duration_secs(COMPILE, 100.0)  # after: not counted

    table = log.table(wall_s=10.0)
    assert _row(table, "tracing to jaxpr") == ["0.8", "s", "2x", "0.0", "s", "0x"]  # 0.25 + 0.5 on main
    assert _row(table, "XLA compiling") == ["0.0", "s", "0x", "1.5", "s", "1x"]     # the worker's
    # The rest is the wall-clock less the main thread's phases only: 10 - 0.75.
    assert _row(table, "running, input, Python (the rest)") == ["9.2", "s"]
    assert _row(table, "wall-clock") == ["10.0", "s"]


@pytest.mark.parametrize("argv", [[], ["--smoke"], ["no_such_experiment", "--smoke"]])
def test_bad_command_line_exits_2(argv, capsys):
    assert time_budget.main(argv) == 2
    assert "experiments" in capsys.readouterr().err
