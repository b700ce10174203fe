"""Shared by the DINO / MOKD tests: multi-crop batches and a few sharded train steps."""

from __future__ import annotations

import jax
import numpy as np
import optax

from moma_jax import sharding, train
from moma_jax.data import device


def batch(n: int, seed: int, num_local: int = 2, size: int = 16, local: int = 8):
  """Two global crops of ``size`` px and ``num_local`` local crops of ``local`` px, uint8."""
  rng = np.random.RandomState(seed)
  out = {f'global{i}': rng.randint(0, 256, (n, size, size, 3)).astype(np.uint8) for i in (1, 2)}
  for i in range(num_local):
    out[f'local{i + 1}'] = rng.randint(0, 256, (n, local, local, 3)).astype(np.uint8)
  return out


def train_steps(objective, mesh_axes, devices, lr: float, steps: int = 2):
  """(losses, params, extra) after ``steps`` SGD steps on a mesh: SGD keeps updates proportional
  to the gradients, so comparing meshes compares gradients (Adam would amplify round-off)."""
  mesh = sharding.make_mesh(mesh_axes, devices)
  tx = optax.sgd(lr)
  state, ssh, _ = train.create_state(objective, tx, mesh, [('.*', 'fsdp')], jax.random.key(0))
  step = train.jit_train_step(objective, tx, lambda s: lr, mesh, ssh, sharding.replicated(mesh))
  bsh = device.batch_sharding(mesh, sharding.data_axes(mesh))
  losses = []
  for i in range(steps):
    state, m = step(state, {}, device.make_global(batch(16, i), bsh), jax.random.key(1))
    losses.append(float(m['loss']))
  return losses, sharding.to_host(state.params), sharding.to_host(state.extra)
