"""TensorFlow, imported quietly: ``from moma_jax.data.tf_quiet import tf``.

TF 2.21 prints its oneDNN and CPU-feature notices through absl's C++ logging before any log level
applies (TF_CPP_MIN_LOG_LEVEL no longer reaches them): four lines on every command's stderr. The
first import runs with the process's stderr (file descriptor 2) pointed at /dev/null; an import
error still raises, and is reported after stderr is restored. Every TensorFlow user of the package
imports it from here, and the trainer's command line imports this module before clu (whose
TensorBoard writer imports TensorFlow too). Importing moma_jax.data alone does not load TensorFlow
(validate.py reads the embedded dataset's names before anything expensive).

Two start-up costs of TensorFlow that buy this package nothing are skipped (measured on 2 cores):
- Keras. TF 2.21 imports Keras 3 eagerly (to register its optimizers for SavedModel loading),
  2.5 s of every command's start-up (Keras imports scikit-learn). TF skips that import when
  TF_USE_LEGACY_KERAS is set and tf_keras is absent, so the variable is set for the import only
  and restored: ``tf.keras`` still resolves as usual when used (its loader reads the variable then).
- AutoGraph. The tf.data functions here use TF ops only (no Python control flow on tensors);
  :func:`graph_fn` marks them so, and tf.data traces them as written instead of converting
  their source first (1.5 s per input pipeline).
- Keras again, through clu. clu's TensorBoard writer imports tensorboard's hparams API, whose
  import defines a ``tf.keras`` callback class, and so loads Keras 3 and scikit-learn after all:
  3 s of every process that imports the trainer (a --dry_run: 8.6 s before, 6.2 s after).
  The trainer never writes hparams (the only use of that API in clu), so the module is registered
  with importlib's LazyLoader: it runs, Keras included, the first time one of its names is read.
"""

import importlib.util
import os
import sys


def _import_quietly():
  if 'tensorflow' not in sys.modules:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    keras = os.environ.get('TF_USE_LEGACY_KERAS')
    try:
      os.dup2(devnull, 2)
      if importlib.util.find_spec('tf_keras') is None:
        os.environ['TF_USE_LEGACY_KERAS'] = '1'
      import tensorflow  # noqa: F401
    finally:
      if keras is None:
        os.environ.pop('TF_USE_LEGACY_KERAS', None)
      else:
        os.environ['TF_USE_LEGACY_KERAS'] = keras
      os.dup2(saved, 2)
      os.close(saved)
      os.close(devnull)
  return sys.modules['tensorflow']


def _defer_hparams_api():
  name = 'tensorboard.plugins.hparams.api'
  if name in sys.modules or importlib.util.find_spec('tensorboard') is None:
    return
  spec = importlib.util.find_spec(name)
  if spec is None:  # another tensorboard layout: nothing to defer
    return
  spec.loader = importlib.util.LazyLoader(spec.loader)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)  # LazyLoader: nothing runs until an attribute is read
  sys.modules['tensorboard.plugins.hparams'].api = module


tf = _import_quietly()
_defer_hparams_api()


def graph_fn(fn):
  """``fn`` (a tf.data map function written in TF ops) traced without AutoGraph's conversion."""
  return tf.autograph.experimental.do_not_convert(fn)
