"""Host input pipelines: an endless, resumable training stream and a once-through evaluation pass.

Training stream (per process): epoch e is this host's records shuffled with a seed derived from
(seed, e); epochs are chained; element i of the stream (counted from the start of training) gets
its augmentation seed from (seed, process, i). The stream is therefore a pure function of
(seed, i): ``start_index`` resumes it exactly, skipping records (cheap: before decoding) rather than
replaying the augmentation. Unreadable images are dropped, counted (``skipped``) and logged; they
never stop a run.

Evaluation pass: every example of this host's part exactly once, in order, padded with
``mask == False`` examples to the same number of batches on every host.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from moma_jax.data import augment
from moma_jax.data.augment import ViewSpec
from moma_jax.data.sources import HostSplit

AUTOTUNE = tf.data.AUTOTUNE


def _example_seed(seed: int, process_index: int, index: tf.Tensor) -> tf.Tensor:
  base = tf.constant([seed, process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, index)


def _options(threads: int | None) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = True
  if threads:
    opts.threading.private_threadpool_size = threads
  return opts


class _Counting:
  """Iterates numpy batches; counts examples dropped as unreadable from gaps in their indices."""

  def __init__(self, ds: tf.data.Dataset, next_index: int, what: str):
    self._it = ds.as_numpy_iterator()
    self.next_index = next_index  # stream position after the last example returned
    self.skipped = 0
    self._what = what

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    index = batch.pop('index')
    valid = index[index >= 0]  # padding carries index -1
    if valid.size:
      gaps = int(valid[-1] - self.next_index + 1 - valid.size)
      if gaps:
        self.skipped += gaps
        logging.warning(
          '%s: skipped %d unreadable image(s) (total %d)', self._what, gaps, self.skipped
        )
      self.next_index = int(valid[-1]) + 1
    return batch


def train_iterator(
  source: HostSplit,
  views: dict[str, ViewSpec],
  *,
  batch_size: int,
  seed: int,
  start_index: int = 0,
  shuffle_buffer: int = 10_000,
  process_index: int = 0,
  threads: int | None = None,
) -> _Counting:
  """Endless stream of {view: uint8 [b, S, S, 3], 'label': int32 [b]} for this host.

  Args:
    source: this host's records (``sources.open_split``).
    views: the views to make of every example (``ViewSpec`` per name).
    batch_size: per-host batch.
    seed: run seed; the whole stream is a function of it.
    start_index: stream position to start at (``iterator.next_index`` of a previous run).
  """
  n = source.num_examples
  if n == 0:
    raise ValueError(f'{source.name}: this host has no examples')
  start_epoch, offset = divmod(start_index, n)
  records = source.dataset

  def epoch(e):
    return records.shuffle(
      min(shuffle_buffer, n), seed=e * 1_000_003 + seed, reshuffle_each_iteration=False
    )

  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
  ds = ds.enumerate(start=start_index)

  def make(index, ex):
    out = augment.make_views(ex['image'], _example_seed(seed, process_index, index), views)
    return {**out, 'label': tf.cast(ex['label'], tf.int32), 'index': index}

  ds = ds.map(make, num_parallel_calls=AUTOTUNE).ignore_errors()
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  return _Counting(ds.with_options(_options(threads)), start_index, source.name)


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

  ds = source.dataset.enumerate().map(make, num_parallel_calls=AUTOTUNE).ignore_errors()
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
