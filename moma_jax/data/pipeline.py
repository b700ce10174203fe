"""Host input pipelines: an endless, resumable training stream and a once-through evaluation pass.

Training stream (per process): a true global shuffle. Epoch e is a random permutation of the
*whole* split (``tf.random.experimental.index_shuffle`` with a key from (seed, e): computed per
index, nothing materialised); process p of P reads positions p, p + P, p + 2P, ... of it, so the
processes' parts of an epoch are disjoint and cover the split (each reads n_p = total // P per
epoch; the at most P - 1 positions left over hold other examples each epoch). Stream element i
(counted from the start of training) is therefore example perm_e(p + P * (i mod n_p)) with
e = i div n_p, read through the source's random access (``HostSplit.lookup``), and gets its
augmentation seed from (seed, process, i). The stream is a pure function of (seed, i), and
``start_index`` resumes it in O(1): no record before it is read. Unreadable images are dropped,
counted (``skipped``) and logged; a few never stop a run, but ``MAX_UNREADABLE_IN_A_ROW``
consecutive ones stop it with a DataError naming the first (a folder of broken files would
otherwise be read forever, every epoch, yielding nothing).

Why tf.data rather than grain (which requirements.txt therefore no longer lists): the
augmentations are TensorFlow graph code (augment.py), so a tf.data map runs read, decode and
augmentation in one C++ thread pool without the GIL; grain would call them per example from
Python threads or processes. What grain's MapDataset would add (a global per-epoch permutation by
index_shuffle, random access, per-host sharding) is the few lines below; its ArrayRecord reader
is the ``array_record`` package that tfds itself depends on and that ``sources`` uses.

Evaluation pass: every example of this host's part exactly once, in order, padded with
``mask == False`` examples to the same number of batches on every host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from moma_jax.data import augment, sources
from moma_jax.data.augment import ViewSpec
from moma_jax.data.photometric import AUG_SEED
from moma_jax.data.sources import HostSplit
from moma_jax.data.tf_quiet import graph_fn, tf

AUTOTUNE = tf.data.AUTOTUNE
MAX_UNREADABLE_IN_A_ROW = 100  # consecutive unreadable training examples that stop the run
_SEED_PAD = 498247692  # the word index_shuffle puts before a [2] seed


def _example_seed(seed: int, process_index: int, index: tf.Tensor) -> tf.Tensor:
  base = tf.constant([seed, process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, index)


def record_index(
  positions: tf.Tensor, *, seed: int, total: int, process_index: int, process_count: int
) -> tf.Tensor:
  """Indices into the whole split (int64 [k]) of this process's stream elements ``positions``.

  Epoch e = position div (total // process_count) is the permutation of [0, total) keyed by the
  stateless seed (seed, -1 - e) (example seeds are (seed, process >= 0) folded with the position);
  this process takes its positions process_index, process_index + process_count, ...
  """
  per_host = total // process_count
  epoch, offset = positions // per_host, positions % per_host
  slots = offset * process_count + process_index
  # The raw op: tf.random.experimental.index_shuffle pads a [k, 2] seed on the wrong axis (TF
  # 2.21). The pad word is the wrapper's, so each element equals
  # index_shuffle(slot, [seed, -1 - epoch], total - 1).
  fill = lambda value: tf.fill(tf.shape(slots), tf.constant(value, tf.int64))  # noqa: E731
  keys = tf.stack([fill(_SEED_PAD), fill(seed), -1 - epoch], axis=-1)
  return tf.raw_ops.RandomIndexShuffle(index=slots, seed=keys, max_index=fill(total - 1), rounds=4)


def _options(threads: int | None) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = True
  if threads:
    opts.threading.private_threadpool_size = threads
  return opts


class _Counting:
  """Iterates numpy batches; counts examples dropped as unreadable from gaps in their indices.

  With ``describe`` (stream position -> what it reads), a gap of ``MAX_UNREADABLE_IN_A_ROW`` or
  more consecutive positions raises a DataError naming the first of them.
  """

  def __init__(
    self,
    ds: tf.data.Dataset,
    next_index: int,
    what: str,
    describe: Callable[[int], str] | None = None,
  ):
    self._it = ds.as_numpy_iterator()
    self.next_index = next_index  # stream position after the last example returned
    self.skipped = 0
    self._what = what
    self._describe = describe

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    index = batch.pop('index')
    valid = index[index >= 0]  # padding carries index -1
    if self._describe is not None and valid.size:
      runs = np.diff(np.concatenate([[self.next_index - 1], valid])) - 1
      worst = int(np.argmax(runs))
      if runs[worst] >= MAX_UNREADABLE_IN_A_ROW:
        first = int(valid[worst] - runs[worst])
        raise _unreadable(self._what, int(runs[worst]), self._describe(first))
    if valid.size:
      gaps = int(valid[-1] - self.next_index + 1 - valid.size)
      if gaps:
        self.skipped += gaps
        logging.warning(
          '%s: skipped %d unreadable image(s) (total %d)', self._what, gaps, self.skipped
        )
      self.next_index = int(valid[-1]) + 1
    return batch


def _unreadable(what: str, count: int, first: str) -> sources.DataError:
  return sources.DataError(
    f'{what}: {count} training images in a row could not be read or decoded, the first '
    f'{first}; fix or remove the broken files (or check the data path and its permissions)'
  )


def train_iterator(
  source: HostSplit,
  views: dict[str, ViewSpec],
  *,
  batch_size: int,
  seed: int,
  start_index: int = 0,
  process_index: int | None = None,
  threads: int | None = None,
  device_photometric: bool = False,
) -> _Counting:
  """Endless stream of {view: uint8 [b, S, S, 3], 'label': int32 [b]} for this host.

  Args:
    source: the split (``sources.open_split``), which must allow random access.
    views: the views to make of every example (``ViewSpec`` per name).
    batch_size: per-host batch.
    seed: run seed; the whole stream is a function of it.
    start_index: stream position to start at (``iterator.next_index`` of a previous run).
    process_index: this process (defaults to the source's; only a check).
    threads: size of the private tf.data thread pool (None: tf.data's default).
    device_photometric: leave the views' photometric augmentation (colour jitter, grayscale,
      blur, solarise) to the train step (moma_jax/data/photometric.py): each example then also
      carries its augmentation seed, uint32 [2] under ``photometric.AUG_SEED``.
  """
  lookup, load = source.random_access()
  if process_index is None:
    process_index = source.process_index
  if process_index != source.process_index:
    raise ValueError(
      f'process_index {process_index} differs from the one {source.name} was opened with '
      f'({source.process_index})'
    )
  if source.total_examples // source.process_count == 0:
    raise ValueError(f'{source.name}: fewer examples than the {source.process_count} processes')
  locate = dict(
    seed=seed, total=source.total_examples, process_index=process_index,
    process_count=source.process_count,
  )  # fmt: skip

  def fetch(positions):  # a block of stream positions -> their stored records
    return positions, lookup(record_index(positions, **locate))

  def make(index, record):
    ex = load(record)
    example_seed = _example_seed(seed, process_index, index)
    out = augment.make_views(ex['image'], example_seed, views, not device_photometric)
    if device_photometric:
      words = tf.random.stateless_uniform([2], example_seed, None, None, tf.int32)
      out[AUG_SEED] = tf.bitcast(words, tf.uint32)
    return {**out, 'label': tf.cast(ex['label'], tf.int32), 'index': index}

  def stream(start: int, stop: int = 2**62) -> tf.data.Dataset:
    ds = tf.data.Dataset.range(start, stop).batch(sources.LOOKUP_BLOCK)
    ds = ds.map(graph_fn(fetch), num_parallel_calls=AUTOTUNE).unbatch()
    # An unreadable image (or a failed block read) drops its example(s); _Counting counts them.
    return ds.map(graph_fn(make), num_parallel_calls=AUTOTUNE).ignore_errors()

  def describe(position: int) -> str:
    i = int(record_index(tf.constant([position], tf.int64), **locate)[0])
    return source.describe(i)

  # Nothing readable at the start: stop now (the endless stream would never yield a batch).
  probe = stream(start_index, start_index + MAX_UNREADABLE_IN_A_ROW).take(1)
  if not list(probe.with_options(_options(threads))):
    raise _unreadable(source.name, MAX_UNREADABLE_IN_A_ROW, describe(start_index))
  ds = stream(start_index).batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  return _Counting(ds.with_options(_options(threads)), start_index, source.name, describe)


def batch_spec(
  views: dict[str, ViewSpec], batch_size: int, device_photometric: bool = False
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of the batches :func:`train_iterator` yields with these arguments:
  what a plan (moma_jax/plan.py) compiles the step for without reading any data."""
  spec = {name: ((batch_size, v.size, v.size, 3), np.dtype(np.uint8)) for name, v in views.items()}
  spec['label'] = ((batch_size,), np.dtype(np.int32))
  if device_photometric:
    spec[AUG_SEED] = ((batch_size, 2), np.dtype(np.uint32))
  return spec


def eval_iterator(
  source: HostSplit,
  views: dict[str, ViewSpec],
  *,
  batch_size: int,
  process_count: int = 1,
  threads: int | None = None,
) -> _Counting:
  """One pass: {view: uint8, 'label': int32, 'mask': bool} batches; mask False on padding.

  Every host yields ceil(ceil(total / process_count) / batch_size) batches, so multi-host
  evaluation steps stay in lockstep.
  """
  per_host = math.ceil(source.total_examples / process_count)
  num_batches = max(1, math.ceil(per_host / batch_size))

  def make(index, ex):
    out = augment.make_views(ex['image'], tf.constant([0, 0], tf.int64), views)
    return {**out, 'label': tf.cast(ex['label'], tf.int32), 'mask': True, 'index': index}

  ds = source.dataset.enumerate().map(graph_fn(make), num_parallel_calls=AUTOTUNE)
  ds = ds.ignore_errors()
  pad = {
    **{k: tf.zeros([v.size, v.size, 3], tf.uint8) for k, v in views.items()},
    'label': tf.constant(0, tf.int32),
    'mask': False,
    'index': tf.constant(-1, tf.int64),
  }
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * batch_size).batch(batch_size).prefetch(AUTOTUNE)
  return _Counting(ds.with_options(_options(threads)), 0, source.name)


def views_from_config(cfg: Any) -> dict[str, ViewSpec]:
  """{name: ViewSpec} from a config mapping of view name -> options."""
  return {name: ViewSpec.from_config(v) for name, v in dict(cfg).items()}
