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
