"""Test-session setup: 4 fake CPU devices and a persistent compilation cache.

Both must happen before JAX initialises its backends, which is why they live here (pytest
imports conftest.py before any test module).
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  str(pathlib.Path.home() / ".cache" / "rosjax-test-jit"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The slowest test files, slowest first: collected first, so xdist starts one on each worker
# (setup.cfg: --dist loadfile --no-loadscope-reorder) instead of leaving them to the end.
SLOWEST_FIRST = ("test_readme_commands.py", "test_readme_nih_command.py", "test_kill_stress.py",
                 "test_kill_experiment.py")


def pytest_collection_modifyitems(items):
    """Runs the slowest files first (a stable sort: every other test keeps its order)."""
    def rank(item):
        name = pathlib.Path(str(item.fspath)).name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)
    items.sort(key=rank)
