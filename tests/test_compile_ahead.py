"""CompileAhead: a second thread runs jobs from the last one while the caller runs them from the first.

The jobs here record who ran them; the real jobs compile XLA programs into the persistent
cache (tests/conftest.py turns it on), which these tests need not do.
"""
import threading
import time

import jax

from rosjax.experiment.training import CompileAhead


def test_the_second_thread_takes_jobs_from_the_end_and_none_runs_twice():
    ran, lock = [], threading.Lock()
    release = threading.Event()

    def job(key):
        def run():
            if key == 4:
                release.wait(5)  # the last job is slow, like DenseNet-121
            with lock:
                ran.append((key, threading.current_thread().name))
        return run

    ahead = CompileAhead([(k, job(k)) for k in range(5)], "test-compiler")
    assert jax.config.jax_compilation_cache_dir  # conftest's cache: the thread starts
    time.sleep(0.1)
    for k in range(4):  # the caller's turn, first to last; job 4 is the thread's
        ahead.wait(k)
        job(k)()
    release.set()
    ahead.wait(4)  # blocks until the thread has finished job 4
    ahead.close()
    by_thread = {k: name for k, name in ran}
    assert by_thread[4] == "test-compiler"
    assert sorted(k for k, _ in ran) == [0, 1, 2, 3, 4]  # each exactly once
    assert all(by_thread[k] == threading.main_thread().name for k in range(4))


def test_a_failing_job_is_left_to_the_caller():
    def fail():
        raise RuntimeError("no such file")

    ahead = CompileAhead([("only", fail)], "test-compiler")
    ahead.wait("only")  # returns: the failure is the run's to report, not the compiler's
    ahead.close()
