"""Reading and writing PyTorch checkpoint files without PyTorch, and without running their code.

A PyTorch (>= 1.6) checkpoint is a zip archive: ``<name>/data.pkl`` (a pickle whose tensors refer
to storages through persistent ids) plus one raw little-endian blob per storage under
``<name>/data/<key>``. ``pickle.load`` would import and call whatever globals the file names, so we
unpickle with an allow-list: tensor rebuild functions, storage types, OrderedDict and the few plain
types that training checkpoints carry (argparse.Namespace, numpy scalars). Anything else is refused
with an error naming the global. torch.load(weights_only=True) does the same, but needs torch; the
converter must run where only JAX is installed (a TPU VM), hence this module.

Writing produces the same layout, loadable with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from convert.errors import ConvertError
from moma_jax import storage

# Storage class name -> numpy dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
  'FloatStorage': np.dtype(np.float32),
  'DoubleStorage': np.dtype(np.float64),
  'HalfStorage': np.dtype(np.float16),
  'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
  'LongStorage': np.dtype(np.int64),
  'IntStorage': np.dtype(np.int32),
  'ShortStorage': np.dtype(np.int16),
  'CharStorage': np.dtype(np.int8),
  'ByteStorage': np.dtype(np.uint8),
  'BoolStorage': np.dtype(np.bool_),
}
_DTYPE_STORAGES = {v: k for k, v in _STORAGE_DTYPES.items()}


class _StorageType:
  """Stand-in for torch.<X>Storage: only carries the dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class Namespace:
  """Stand-in for argparse.Namespace found in MAE training checkpoints (``args``)."""

  def __init__(self, **kwargs: Any):
    self.__dict__.update(kwargs)

  def __repr__(self) -> str:
    return f'Namespace({self.__dict__!r})'


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
  """torch._utils._rebuild_tensor(_v2): a strided view of a storage, returned as a copy."""
  for name, seq in (('size', size), ('stride', stride)):
    if not isinstance(seq, tuple) or not all(isinstance(s, int) and s >= 0 for s in seq):
      raise pickle.UnpicklingError(f'invalid tensor {name} {seq!r}')
  if not isinstance(storage, np.ndarray) or len(size) != len(stride):
    raise pickle.UnpicklingError('invalid tensor record')
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise pickle.UnpicklingError(f'invalid storage offset {storage_offset!r}')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if last >= storage.size:
    # A crafted record must not read outside its storage (as_strided would happily do so).
    raise pickle.UnpicklingError(
      f'tensor of size {size} stride {stride} offset {storage_offset} overruns its storage '
      f'of {storage.size} elements'
    )
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    storage[storage_offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
  )
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused) -> np.ndarray:
  return data


def _numpy_scalar(dtype, data=None):
  dtype = np.dtype(dtype)
  if dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise pickle.UnpicklingError(f'refusing numpy scalar of dtype {dtype}')
  return np.frombuffer(data, dtype)[0]


def _numpy_dtype(name, align=False, copy=False):
  dtype = np.dtype(name)
  if dtype.hasobject:
    raise pickle.UnpicklingError('refusing an object dtype')
  return dtype


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  ('argparse', 'Namespace'): Namespace,
  ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
  ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
  ('numpy', 'dtype'): _numpy_dtype,
  **{('torch', name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _SafeUnpickler(pickle.Unpickler):
  def __init__(self, file: BinaryIO, read_storage):
    super().__init__(file)
    self._read_storage = read_storage

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise ConvertError(
        f'refusing to load: the checkpoint asks for the global {module}.{name}, which is not '
        'on the allow-list of tensor types (a checkpoint has no reason to name it; the file may '
        'be malicious)'
      ) from None

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
      raise pickle.UnpicklingError(f'invalid storage record {pid!r}')
    return self._read_storage(str(key), storage_type.dtype, numel)


def load(path: str | os.PathLike) -> Any:
  """Loads a PyTorch zip checkpoint; tensors come back as numpy arrays (bfloat16 via ml_dtypes).

  Raises ConvertError (one line) for a missing, truncated, corrupt, legacy-format or malicious file.
  """
  path = storage.Path(path)
  if not path.is_file():
    raise ConvertError(f'no such checkpoint file: {path}')
  f = path.open('rb')  # seekable on local disks and object stores alike: zipfile reads members
  try:
    zf = zipfile.ZipFile(f)
  except (zipfile.BadZipFile, OSError) as e:
    f.seek(0)
    head = f.read(2)
    f.close()
    if head == b'\x80\x02':
      raise ConvertError(
        f'{path} is a legacy (pre-1.6) PyTorch file; re-save it with a recent torch: '
        'torch.save(torch.load(f), f2)'
      ) from None
    raise ConvertError(
      f'{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}'
    ) from None
  with f, zf:
    pkl_names = [n for n in zf.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pkl_names) != 1:
      raise ConvertError(f'{path} is a zip file but not a PyTorch checkpoint (no <name>/data.pkl)')
    prefix = pkl_names[0][: -len('data.pkl')]
    storages: dict[str, np.ndarray] = {}

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      if key not in storages:
        raw = zf.read(f'{prefix}data/{key}')
        if len(raw) < numel * dtype.itemsize:
          raise pickle.UnpicklingError(f'storage {key} holds {len(raw)} bytes, needs more')
        storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
      return storages[key]

    try:
      with zf.open(pkl_names[0]) as f:
        return _SafeUnpickler(io.BytesIO(f.read()), read_storage).load()
    except ConvertError:
      raise
    except Exception as e:  # noqa: BLE001 -- any failure of a crafted/corrupt file is bad input
      msg = str(e).splitlines()[0] if str(e) else ''
      raise ConvertError(
        f'{path} is a corrupt PyTorch checkpoint ({type(e).__name__}: {msg})'
      ) from None


# --- writing -------------------------------------------------------------------------------------
# Hand-written pickle opcodes, because the standard pickler can only name torch's globals when
# torch is importable, and the exporter must work without torch.


class _Writer:
  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[np.ndarray] = []

  def op(self, b: bytes):
    self.out.write(b)

  def glob(self, module: str, name: str):
    self.op(pickle.GLOBAL + f'{module}\n{name}\n'.encode())

  def save(self, obj: Any):
    if isinstance(obj, np.ndarray):
      self.tensor(obj)
    elif isinstance(obj, np.generic):
      self.save(obj.item())
    elif obj is None:
      self.op(pickle.NONE)
    elif isinstance(obj, bool):
      self.op(pickle.NEWTRUE if obj else pickle.NEWFALSE)
    elif isinstance(obj, int):
      if -(2**31) <= obj < 2**31:
        self.op(pickle.BININT + struct.pack('<i', obj))
      else:
        data = pickle.encode_long(obj)
        self.op(pickle.LONG1 + bytes([len(data)]) + data)
    elif isinstance(obj, float):
      self.op(pickle.BINFLOAT + struct.pack('>d', obj))
    elif isinstance(obj, str):
      data = obj.encode('utf-8')
      self.op(pickle.BINUNICODE + struct.pack('<I', len(data)) + data)
    elif isinstance(obj, (tuple, list)):
      self.op(pickle.EMPTY_LIST if isinstance(obj, list) else pickle.MARK)
      if isinstance(obj, list):
        self.op(pickle.MARK)
      for x in obj:
        self.save(x)
      self.op(pickle.APPENDS if isinstance(obj, list) else pickle.TUPLE)
    elif isinstance(obj, dict):
      if isinstance(obj, collections.OrderedDict):
        self.glob('collections', 'OrderedDict')
        self.op(pickle.EMPTY_TUPLE + pickle.REDUCE)
      else:
        self.op(pickle.EMPTY_DICT)
      self.op(pickle.MARK)
      for k, v in obj.items():
        self.save(k)
        self.save(v)
      self.op(pickle.SETITEMS)
    else:
      raise TypeError(f'cannot write {type(obj).__name__} into a PyTorch checkpoint')

  def tensor(self, a: np.ndarray):
    if a.dtype not in _DTYPE_STORAGES:
      raise TypeError(f'no PyTorch storage type for dtype {a.dtype}')
    if not a.flags.c_contiguous:
      a = a.copy(order='C')  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    key = str(len(self.storages))
    self.storages.append(a)
    strides = tuple(s // a.itemsize for s in a.strides)
    self.glob('torch._utils', '_rebuild_tensor_v2')
    self.op(pickle.MARK + pickle.MARK)
    self.save('storage')
    self.glob('torch', _DTYPE_STORAGES[a.dtype])
    self.save(key)
    self.save('cpu')
    self.save(int(a.size))
    self.op(pickle.TUPLE + pickle.BINPERSID)
    self.save(0)
    self.save(tuple(int(s) for s in a.shape))
    self.save(strides)
    self.save(False)
    self.save(collections.OrderedDict())
    self.op(pickle.TUPLE + pickle.REDUCE)


def save(obj: Any, path: str | os.PathLike) -> None:
  """Writes ``obj`` (nested dicts / lists of numpy arrays and plain values) as a PyTorch zip file.

  numpy arrays become torch tensors. The file is written to a temporary name and renamed, so an
  existing file is never left half-written.
  """
  path = os.fspath(path)
  w = _Writer()
  w.op(pickle.PROTO + b'\x02')
  w.save(obj)
  w.op(pickle.STOP)
  name = 'archive'
  with storage.local_output(path) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as zf:

    def put(member: str, data) -> None:
      # A fixed timestamp: the same tensors always give the same bytes (reproducible sha256).
      zf.writestr(zipfile.ZipInfo(f'{name}/{member}', date_time=(1980, 1, 1, 0, 0, 0)), data)

    put('data.pkl', w.out.getvalue())
    put('byteorder', 'little')
    for key, a in enumerate(w.storages):
      put(f'data/{key}', a.astype(a.dtype.newbyteorder('<'), copy=False).tobytes())
    put('version', '3\n')
