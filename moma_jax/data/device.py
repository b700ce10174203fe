"""From host-local numpy batches to global, sharded jax.Arrays; device prefetch.

The same code runs on one CPU, one GPU and a multi-host TPU pod: each process contributes its
local slice and ``jax.make_array_from_process_local_data`` assembles the global array sharded
over the mesh's data axes.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def check_batch_size(global_batch: int, mesh: Mesh, data_axes: tuple[str, ...]) -> int:
  """Validates the global batch for this mesh; returns the per-process batch.

  Raises ValueError (one line) when the batch cannot be split evenly over the data-parallel
  devices or the processes.
  """
  shards = int(np.prod([mesh.shape[a] for a in data_axes]))
  if global_batch <= 0 or global_batch % shards:
    raise ValueError(
      f'batch_size {global_batch} is not divisible by the {shards} data-parallel devices '
      f'(mesh axes {data_axes}); use a multiple of {shards}'
    )
  processes = len({d.process_index for d in mesh.devices.flat})  # a plan's hosts, not ours
  if global_batch % processes:
    raise ValueError(f'batch_size {global_batch} is not divisible by the {processes} processes')
  return global_batch // processes


def batch_sharding(mesh: Mesh, data_axes: tuple[str, ...]) -> NamedSharding:
  """Leading (batch) dimension split over ``data_axes``, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(data_axes))


def make_global(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """{name: [b_local, ...]} on each process -> {name: global [b_local * processes, ...] array}."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def prefetch_to_device(
  items: Iterable[Any], sharding: NamedSharding, size: int = 2
) -> Iterator[Any]:
  """Keeps ``size`` batches in flight: transfers are asynchronous, so the next batch's copy
  overlaps the current step. (flax.jax_utils.prefetch_to_device is pmap-only, hence this.)

  items: host batches, or (host batch, tag) pairs whose tag passes through untouched (the
  trainer tags each batch with the input stream's position after it).
  """
  queue: collections.deque = collections.deque()
  for item in items:
    if isinstance(item, tuple):
      batch, tag = item
      queue.append((make_global(batch, sharding), tag))
    else:
      queue.append(make_global(item, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
