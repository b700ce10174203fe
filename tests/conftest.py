"""Test setup: 8 fake CPU devices (set before JAX is imported), float32 matmuls, and one persistent
XLA compilation cache per test run."""

import os
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The same runlocal programs are compiled by dozens of tests and their subprocesses (which inherit
# this environment): one compilation cache for the run, shared by the xdist workers, saves ~10 s
# per repeat. Only speed depends on it; a fresh directory per run (xdist's run id).
_run = os.environ.get('PYTEST_XDIST_TESTRUNUID', str(os.getpid()))
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), f'moma_jax_xla_cache_{_run}')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
