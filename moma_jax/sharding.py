"""Device meshes and parameter shardings from config data.

Mesh: an ordered mapping of axis name -> size, one size may be -1 ("the rest"), e.g.
``{'data': -1, 'fsdp': 1}`` (pure data parallelism) or ``{'data': 1, 'fsdp': -1}`` (FSDP over all
devices). The batch is split over every mesh axis listed in ``DATA_AXES``.

Parameter rules: a list of (regex over the 'a/b/c' parameter path, rule); the first match wins.
Rules: 'replicate', or 'fsdp' (split the largest dimension divisible by the 'fsdp' axis size over
'fsdp'; replicate when none is), as in big_vision's fsdp strategy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moma_jax.optim import tree_paths

DATA_AXES = ('data', 'fsdp')


def make_mesh(axes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh over ``devices`` (default: all). Raises a one-line ValueError on bad sizes."""
  devices = list(jax.devices() if devices is None else devices)
  names = list(axes)
  sizes = [int(axes[n]) for n in names]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(axes)}: at most one axis may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh {dict(axes)} does not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f'mesh {dict(zip(names, sizes, strict=True))} needs {np.prod(sizes)} devices, have {len(devices)}'
    )
  grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, tuple(names))


def data_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def _spec(shape: tuple[int, ...], rule: str, mesh: Mesh) -> PartitionSpec:
  if rule == 'replicate' or 'fsdp' not in mesh.axis_names or mesh.shape['fsdp'] == 1:
    return PartitionSpec()
  if rule != 'fsdp':
    raise ValueError(f"unknown sharding rule {rule!r}; use 'replicate' or 'fsdp'")
  n = mesh.shape['fsdp']
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % n == 0 and shape[dim] >= n:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return PartitionSpec(*spec)
  return PartitionSpec()


def infer_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]]) -> Any:
  """Tree of NamedShardings for ``tree`` (arrays or ShapeDtypeStructs) from the rules."""
  compiled = [(re.compile(r), rule) for r, rule in rules]

  def one(path: str, x) -> NamedSharding:
    for pattern, rule in compiled:
      if pattern.search(path):
        return NamedSharding(mesh, _spec(tuple(x.shape), rule, mesh))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, tree_paths(tree), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_host(tree: Any) -> Any:
  """Full numpy values of (possibly multi-host sharded) arrays, on every process."""
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)
