"""The optimizer's parameter groups (frozen / held / own schedule / the rest) against a NumPy AdamW."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from moma_jax import optim


def _numpy_adamw(p, grads, lrs, b1=0.9, b2=0.95, eps=1e-8, wd=0.05):
  """AdamW as the MAE / PyTorch papers write it, one parameter, ``lrs[t]`` at step t."""
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * p
    p = p - lr * update
  return p


def _warmup_cosine(step, peak, warmup, total):
  if step < warmup:
    return peak * step / warmup
  return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _at(tree, path):
  return functools.reduce(lambda node, key: node[key], path, tree)


def test_parameter_groups_hold_scale_and_freeze():
  peak, hold, warmup, total = 1e-2, 3, 2, 10
  rng = np.random.RandomState(0)
  params = {
    'student': {
      'w': rng.randn(4, 3).astype(np.float32),
      'pos_embed': np.ones((1, 5, 3), np.float32),
    },
    'projectors': {'t': {'kernel': rng.randn(3, 2).astype(np.float32)}},
    'other': {'kernel': rng.randn(2, 2).astype(np.float32)},
  }
  grads = [
    jax.tree.map(lambda x: rng.randn(*x.shape).astype(np.float32), params) for _ in range(total)
  ]
  schedule = optim.warmup_cosine(peak, warmup, total)
  groups = [
    (r'^student/', optim.held_schedule(peak, hold, warmup, total)),
    (r'^projectors/', optim.held_schedule(10 * peak, 0, warmup, total)),
  ]
  tx = optim.adamw(schedule, frozen=r'^student/pos_embed$', groups=groups)
  state = tx.init(params)
  p = jax.tree.map(jnp.asarray, params)
  trajectory = []
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    trajectory.append(np.asarray(p['student']['w']))

  # The encoder does not move during the hold (weight decay included)...
  for w in trajectory[:hold]:
    np.testing.assert_array_equal(w, params['student']['w'])
  # ...then runs a warm-up + cosine of its own over the remaining steps, its Adam moments
  # accumulated from step 0; the projector runs at 10x the lr, the rest on the global schedule;
  # the frozen parameter never moves.
  lrs_held = [0.0] * hold + [
    _warmup_cosine(t, peak, warmup, total - hold) for t in range(total - hold)
  ]
  lrs_train = [_warmup_cosine(t, peak, warmup, total) for t in range(total)]
  for path, lrs in (
    (('student', 'w'), lrs_held),
    (('projectors', 't', 'kernel'), [10 * lr for lr in lrs_train]),
    (('other', 'kernel'), lrs_train),
  ):
    expected = _numpy_adamw(_at(params, path), [_at(g, path) for g in grads], lrs)
    np.testing.assert_allclose(_at(p, path), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(p['student']['pos_embed'], params['student']['pos_embed'])


def test_frozen_parameters_get_no_gradient_and_no_gradient_work():
  """stop_frozen_gradients (the train step's, from objective.frozen_pattern): a frozen table read
  through a gather (a ViT's pos_embed at the visible tokens) gets an exactly zero gradient, the
  other parameters the gradient they had, and the compiled gradient has no scatter left (the
  cotangents of the frozen table are not computed at all)."""
  rng = np.random.RandomState(0)
  params = {
    'student': {'pos_embed': jnp.asarray(rng.randn(1, 16, 8), jnp.float32),
                'w': jnp.asarray(rng.randn(8, 4), jnp.float32)},
  }  # fmt: skip
  idx = jnp.asarray(rng.randint(0, 16, (6, 3)))

  def loss(p):
    pos = jnp.broadcast_to(p['student']['pos_embed'], (6, 16, 8))
    visible = jnp.take_along_axis(pos, idx[..., None], axis=1)  # [6, 3, 8]
    return jnp.sum(jnp.tanh(visible @ p['student']['w']))

  frozen = r'^student/pos_embed$'
  held = lambda p: loss(optim.stop_frozen_gradients(p, frozen))  # noqa: E731
  plain, stopped = jax.grad(loss)(params), jax.grad(held)(params)
  assert np.abs(np.asarray(plain['student']['pos_embed'])).max() > 0  # it would get one
  np.testing.assert_array_equal(stopped['student']['pos_embed'], 0.0)
  np.testing.assert_array_equal(stopped['student']['w'], plain['student']['w'])
  assert 'scatter' in jax.jit(jax.grad(loss)).lower(params).as_text()
  assert 'scatter' not in jax.jit(jax.grad(held)).lower(params).as_text()
  assert optim.stop_frozen_gradients(params, None) is params
