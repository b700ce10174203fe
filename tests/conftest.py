"""Test setup: 8 fake CPU devices (set before JAX is imported), float32 matmuls, and one persistent
XLA compilation cache per test run."""

import os
import re
import sys
import tempfile

# LLVM -O1 instead of -O3 for XLA's CPU code: compiles the tests' many small programs 2-6x faster
# (a sharded init: 38 s -> 6 s) while running steps about as fast; the numbers are the same (no
# fast-math either way). Subprocesses of the tests that set their own XLA_FLAGS add it themselves
# (runlocal_helpers.FAST_COMPILE).
os.environ.setdefault(
  'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The same runlocal programs are compiled by dozens of tests and their subprocesses (which inherit
# this environment): one compilation cache for the run, shared by the xdist workers. Only speed
# depends on it; a fresh directory per run (xdist's run id). Every program is cached, however
# quick to compile: a runlocal process compiles ~40 small ones (evaluators, eager ops), and a
# repeated 2-step run with its final evaluation took 42 s caching those over 0.5 s, 32 s caching all.
_run = os.environ.get('PYTEST_XDIST_TESTRUNUID', str(os.getpid()))
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), f'moma_jax_xla_cache_{_run}')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The embedded datasets' disk cache (moma_jax/data/embedded.py: 2.5 s of drawing per process), also
# per run: the suite draws them once and writes nothing to the home directory.
os.environ.setdefault(
  'MOMA_JAX_CACHE', os.path.join(tempfile.gettempdir(), f'moma_jax_data_cache_{_run}')
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


# The slowest tests first (as last measured, slowest first), so that pytest-xdist hands them out
# before the many short ones and no worker is left running a long test alone at the end. Only the
# order changes (the README module stays one xdist_group, which xdist schedules first).
_SLOW_FIRST = (
  'test_notebook.py::test_notebook_runs_top_to_bottom',
  'test_train.py::test_main_runlocal_end_to_end',
  'test_mokd.py::test_mokd_8_devices_equal_1',
  'test_reliability.py::test_fault_injection_kills_and_resumes_bit_identical',
  'test_eval.py::test_finetune_runlocal_learns',
  'test_remote_storage.py::test_train_preempt_resume_export_on_gcs',
  'test_family.py::test_mocov3_global_batch_semantics_8_devices_equal_1',
  'test_plan.py::test_shipped_full_configs_fsdp_and_two_slices_compile_and_fit',
  'test_reliability.py::test_full_disk_during_a_save_keeps_the_previous_checkpoint',
  'test_moma.py::test_two_processes_match_one',
  'test_moma.py::test_sharded_steps_match_single_device',
  'test_mokd.py::test_full_mokd_loss_matches_torch_official_formula',
  'test_eval.py::test_linear_probe_learns_and_leaves_the_encoder_untouched',
  'test_family.py::test_runlocal_learns',
  'test_dino.py::test_dino_8_devices_equal_1',
  'test_mokd.py::test_losses_touch_only_their_own_model',
  'test_train.py::test_each_setting_reduces_the_loss',
)


def pytest_collection_modifyitems(config, items):
  def rank(item):
    name = item.nodeid.split('/')[-1].split('[')[0]
    return _SLOW_FIRST.index(name) if name in _SLOW_FIRST else len(_SLOW_FIRST)

  items.sort(key=rank)  # stable: the rest keep their order


# xdist_group is silently ignored with pytest >= 9 and pytest-xdist 3.8: xdist marks a grouped test
# by appending '@group' to item._nodeid, which pytest 9 no longer reads (nodeids come from
# item._id), so --dist loadgroup spread the README module over both workers and each built its
# sandbox and ran the converter commands. Until xdist catches up, the scheduler also groups the
# tests of a module that carries a module-level `pytestmark = pytest.mark.xdist_group('name')`.
_GROUP_MARK = re.compile(
  r"""^pytestmark = pytest\.mark\.xdist_group\((?:name=)?['"](\w+)['"]\)""", re.M
)


def pytest_xdist_make_scheduler(config, log):
  if config.getvalue('dist') != 'loadgroup':
    return None
  from xdist.scheduler import LoadGroupScheduling

  groups: dict[str, str | None] = {}

  class ModuleGroupScheduling(LoadGroupScheduling):
    def _split_scope(self, nodeid):
      scope = super()._split_scope(nodeid)
      if scope != nodeid:  # xdist found its '@group' suffix
        return scope
      path = nodeid.split('::')[0]
      if path not in groups:
        try:
          m = _GROUP_MARK.search(open(config.rootpath / path).read())
        except OSError:
          m = None
        groups[path] = m and m.group(1)
      return groups[path] or nodeid

  return ModuleGroupScheduling(config, log)
