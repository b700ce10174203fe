"""TensorFlow, imported quietly: ``from moma_jax.data.tf_quiet import tf``.

TF 2.21 prints its oneDNN and CPU-feature notices through absl's C++ logging before any log level
applies (TF_CPP_MIN_LOG_LEVEL no longer reaches them): four lines on every command's stderr. The
first import runs with the process's stderr (file descriptor 2) pointed at /dev/null; an import
error still raises, and is reported after stderr is restored. Every TensorFlow user of the package
imports it from here, and the trainer's command line imports this module before clu (whose
TensorBoard writer imports TensorFlow too). Importing moma_jax.data alone does not load TensorFlow
(validate.py reads the embedded dataset's names before anything expensive).
"""

import os
import sys


def _import_quietly():
  if 'tensorflow' not in sys.modules:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
      os.dup2(devnull, 2)
      import tensorflow  # noqa: F401
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      os.close(devnull)
  return sys.modules['tensorflow']


tf = _import_quietly()
