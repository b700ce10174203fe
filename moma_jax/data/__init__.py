"""Input pipelines (tf.data, tfds, image folders, the embedded digits) and augmentations.

Every TensorFlow user of the package lives here, so TensorFlow is first imported here, quietly:
TF 2.21 prints its oneDNN and CPU-feature notices through absl's C++ logging before any log level
applies (TF_CPP_MIN_LOG_LEVEL no longer reaches them), four lines on every command's stderr. The
import runs once with the process's stderr (file descriptor 2) pointed at /dev/null; an import
error still raises, and is reported after stderr is restored.
"""

import os
import sys


def _import_tensorflow_quietly() -> None:
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # noqa: F401
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


_import_tensorflow_quietly()
