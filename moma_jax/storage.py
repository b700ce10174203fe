"""Where files live: one path type for local disks and object stores (gs://, s3://, ...).

Every file the project reads or writes (workdirs, checkpoints, config.json, metrics, exports,
converted checkpoints, PyTorch files, the converter's --src / --dst) goes through
``etils.epath``, the path library orbax itself uses: local paths use the OS, ``gs://`` uses
TensorFlow's GCS client (or gcsfs with ``EPATH_USE_TF=false``, which is how the tests point it
at a GCS emulator). Never ``os.path.abspath`` a URI: it turns ``gs://b/x`` into ``$PWD/gs:/b/x``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for a URI such as gs://bucket/dir (anything with a scheme), False for a local path."""
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """An absolute path: local paths made absolute against the working directory, URIs untouched."""
  p = os.fspath(path)
  return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def write_text_atomic(path: PathLike, text: str) -> None:
  """Writes ``text`` so that a reader never sees half a file: on local disks through a temporary
  sibling and a rename; on object stores directly (an object appears whole when its upload ends,
  and a "rename" there is a copy)."""
  dst = epath.Path(path)
  if is_remote(path):
    dst.write_text(text)
    return
  tmp = dst.parent / f'.{dst.name}.tmp-{uuid.uuid4().hex[:8]}'
  tmp.write_text(text)
  try:
    tmp.replace(dst)
  finally:
    if tmp.exists():
      tmp.unlink()


@contextlib.contextmanager
def local_output(path: PathLike) -> Iterator[str]:
  """Yields a local file name to write ``path``'s content to; on success the content appears at
  ``path`` whole (a rename on local disks, one upload on object stores), and never on failure.
  For writers that need a real local file (zipfile seeks, safetensors writes by name)."""
  dst = os.fspath(path)
  if is_remote(dst):
    with tempfile.TemporaryDirectory() as tmp_dir:
      tmp = os.path.join(tmp_dir, os.path.basename(dst))
      yield tmp
      with open(tmp, 'rb') as src, epath.Path(dst).open('wb') as out:
        shutil.copyfileobj(src, out, 1 << 24)
    return
  tmp = f'{dst}.tmp-{os.getpid()}'
  try:
    yield tmp
    umask = os.umask(0)  # some writers (safetensors) create 0600 files: give the usual mode
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
