"""Device meshes: topology-aware order, the same shapes as a plain reshape on CPU, clear errors,
and slices laid along the data axis."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from moma_jax import sharding


@pytest.mark.parametrize(
  'axes,shape',
  [
    ({'data': -1, 'fsdp': 1}, (8, 1)),
    ({'data': -1}, (8,)),
    ({'data': 1, 'fsdp': -1}, (1, 8)),
    ({'data': 2, 'fsdp': 4}, (2, 4)),
    ({'data': 2, 'fsdp': -1}, (2, 4)),
  ],
)
def test_mesh_on_8_cpu_devices_is_the_row_major_grid(axes, shape):
  mesh = sharding.make_mesh(axes)
  assert mesh.axis_names == tuple(axes) and mesh.devices.shape == shape
  assert mesh.axis_types == (AxisType.Auto,) * len(shape)
  # CPU devices have no topology: the order is jax.devices() reshaped, as before.
  np.testing.assert_array_equal(
    np.vectorize(lambda d: d.id)(mesh.devices), np.arange(8).reshape(shape)
  )


def test_mesh_over_a_subset_of_devices():
  mesh = sharding.make_mesh({'data': -1}, jax.devices()[2:4])
  assert [d.id for d in mesh.devices.flat] == [2, 3]


@pytest.mark.parametrize(
  'axes,message',
  [
    ({'data': -1, 'fsdp': -1}, 'at most one axis may be -1'),
    ({'data': 3, 'fsdp': -1}, 'does not divide 8 devices'),
    ({'data': 2, 'fsdp': 2}, 'needs 4 devices, have 8'),
    ({'data': 0, 'fsdp': -1}, 'sizes must be positive'),
  ],
)
def test_bad_sizes_are_one_line_errors(axes, message):
  with pytest.raises(ValueError, match=message) as e:
    sharding.make_mesh(axes)
  assert '\n' not in str(e.value)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """Stands in for a TPU chip of a multi-slice job: what mesh_utils reads from a device."""

  id: int
  slice_index: int
  process_index: int = 0
  platform: str = 'cpu'  # mesh_utils then lays each slice out as given
  device_kind: str = 'fake'


def test_slices_are_laid_along_the_data_axis():
  devices = [FakeDevice(i, i // 4) for i in range(8)]  # 2 slices of 4 chips
  grid = sharding.device_grid([4, 2], ['data', 'fsdp'], devices)
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  # Each slice holds whole rows of the data axis: fsdp collectives never leave a slice.
  np.testing.assert_array_equal(slices, [[0, 0], [0, 0], [1, 1], [1, 1]])
  # With data of size 1 the slices go over the next axis that they divide.
  grid = sharding.device_grid([1, 8], ['data', 'fsdp'], devices)
  np.testing.assert_array_equal(np.vectorize(lambda d: d.slice_index)(grid), [[0] * 4 + [1] * 4])
  many = [FakeDevice(i, i) for i in range(4)]  # 4 slices of 1 chip
  with pytest.raises(ValueError, match='no axis is divisible by the 4 slices'):
    sharding.device_grid([2, 2], ['data', 'fsdp'], many)
