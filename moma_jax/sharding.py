"""Device meshes and parameter shardings from config data.

Mesh: an ordered mapping of axis name -> size, one size may be -1 ("the rest"), e.g.
``{'data': -1, 'fsdp': 1}`` (pure data parallelism) or ``{'data': 1, 'fsdp': -1}`` (FSDP over all
devices). The batch is split over every mesh axis listed in ``DATA_AXES``.

The device order follows the physical links (``jax.experimental.mesh_utils``), so the last
(most communicating) axis maps onto the closest chips and slices meet only over the data axis.

Parameter rules: a list of (regex over the 'a/b/c' parameter path, rule); the first match wins.
Rules: 'replicate', or 'fsdp' (split the largest dimension divisible by the 'fsdp' axis size over
'fsdp'; replicate when none is), as in big_vision's fsdp strategy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moma_jax.optim import tree_paths

DATA_AXES = ('data', 'fsdp')


def make_mesh(axes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh over ``devices`` (default: all) that follows the physical topology.

  Device order comes from ``mesh_utils.create_device_mesh`` (TPU: rings / tori along the
  physical links; GPU: XLA's global numbering); across TPU slices, from
  ``create_hybrid_device_mesh`` with the slices laid along the first data axis (see
  :func:`device_grid`). Axes are ``AxisType.Auto`` (sharding propagated by the compiler).
  Raises a one-line ValueError on bad sizes.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(axes, len(devices))
  grid = device_grid(sizes, tuple(axes), devices)
  return Mesh(grid, tuple(axes), axis_types=(AxisType.Auto,) * len(sizes))


def mesh_sizes(axes: dict[str, int], num_devices: int) -> list[int]:
  """The axis sizes of ``axes`` on ``num_devices`` devices, with the one -1 resolved."""
  names = list(axes)
  sizes = [int(axes[n]) for n in names]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(axes)}: at most one axis may be -1')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh {dict(axes)}: sizes must be positive (or -1 for the rest)')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {dict(axes)} does not divide {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f'mesh {dict(zip(names, sizes, strict=True))} needs {np.prod(sizes)} devices, have {num_devices}'
    )
  return sizes


def device_grid(sizes: Sequence[int], names: Sequence[str], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as an array of shape ``sizes`` for ``jax.sharding.Mesh``.

  One slice (or a platform without slices: CPU, GPU): ``create_device_mesh``. Several TPU slices
  (devices carrying distinct ``slice_index``): the slices are split over the first data axis
  (``DATA_AXES`` order, then any axis) whose size they divide, since data parallelism needs the
  least bandwidth and goes over DCN; the rest of the mesh lies within each slice.
  """
  sizes = [int(s) for s in sizes]
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  if len(slices) > 1:
    n = len(slices)
    order = [names.index(a) for a in DATA_AXES if a in names] + list(range(len(names)))
    axis = next((i for i in order if sizes[i] % n == 0), None)
    if axis is None:
      raise ValueError(
        f'mesh {dict(zip(names, sizes, strict=True))}: no axis is divisible by the {n} slices; '
        "make the 'data' axis a multiple of the number of slices"
      )
    dcn = [1] * len(sizes)
    dcn[axis] = n
    ici = list(sizes)
    ici[axis] //= n
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  try:
    return mesh_utils.create_device_mesh(sizes, devices)
  except (ValueError, NotImplementedError, AssertionError):
    pass
  try:  # shapes that only fit the torus by splitting a physical axis
    return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    # e.g. a subset of a slice's chips that is no sub-torus: correct, only slower collectives.
    logging.warning('mesh %s does not follow the physical topology (%s)', sizes, e)
    return np.asarray(devices, dtype=object).reshape(sizes)


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
