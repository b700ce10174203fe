"""Linear probe on frozen features, on device: multinomial logistic regression, full batch.

The model is scikit-learn's ``LogisticRegression(C=c)`` on standardised features (the outside
reference tests/test_linear_probe.py checks it against, and what MAE's linear probe does with its
BatchNorm without affine before the linear head):

  z = (x - mean) / sqrt(var + eps)           train-split mean / variance per dimension, eps 1e-6
  minimise  1/n sum_i CE(z_i W + b, y_i)  +  1/(2 c n) ||W||^2     (n valid train rows; b free)

fitted with L-BFGS (``optax.lbfgs``, zoom line search) from W = 0, b = 0 until the gradient norm
is below ``tol`` or after ``max_iter`` iterations: deterministic, jitted. L-BFGS runs
on V = L^T W, where L L^T = Z^T Z / n + 1e-3 I (a Cholesky factor of the standardised features'
Gram matrix): the same minimum, but about as curved in every direction, which takes the fit from
hundreds of iterations to tens (encoder features of the embedded data, 5748 x 128 or 256 dims:
12-14 iterations instead of 110-240, an earlier measurement; a random projection of digits to 128
dims: 34 instead of 189; the raw pixels of digits, 3072 dims, are the slow case: 241 iterations,
12 s on 2 CPU cores, at tol 1e-5; 136 iterations, 8 s, at the evaluator's tol 1e-4, with the
same top-1). The Gram matrix
costs N D^2 on the devices, its factor and inverse D^3 by LAPACK on the host (D x D is small:
37 MB for D = 3072; a replicated device program would repeat the work on every device), and
L^-T is then split by rows over the devices like the features.

Features stay where they are: global arrays [N, D] sharded along N (the k-NN memory bank's rows,
see :mod:`moma_jax.evaluators.knn`); W, b are replicated and XLA sums the per-device parts of the
loss and its gradient. The standardisation is folded into the weights (z W + b = x (W / s) + b -
(mean / s) W), so no standardised copy of the features is kept (one is made, transiently, for the
Gram matrix), and rows with ``valid`` False (padding; their features must be finite) count
neither in the statistics, nor in the loss, nor in the accuracy.
``row_scale`` [N] multiplies each row first: the bank keeps unit-normalised rows and their norms,
so x = features * row_scale recovers the raw features.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

EPS = 1e-6  # added to the variance (MAE's BatchNorm1d(affine=False, eps=1e-6))
PRECONDITION_DELTA = 1e-3  # added to the preconditioner's Gram matrix (whose diagonal is ~1)


class Probe(NamedTuple):
  """A fitted probe: logits = ((x - mean) / scale) @ w + b."""

  w: jax.Array  # [D, C]
  b: jax.Array  # [C]
  mean: jax.Array  # [D]
  scale: jax.Array  # [D]
  iterations: jax.Array  # [] int32: L-BFGS iterations run
  grad_norm: jax.Array  # [] float32: at the end


def _rows(features, row_scale):
  x = features.astype(jnp.float32)
  return x if row_scale is None else x * row_scale[:, None]


def _logits(w, b, mean, scale, features, row_scale, precision):
  """((x - mean) / scale) @ w + b without forming x - mean or x / scale."""
  w = w / scale[:, None]
  b = b - jnp.dot(mean, w, precision=precision)
  out = jnp.dot(features.astype(jnp.float32), w, precision=precision)
  if row_scale is not None:
    out = out * row_scale[:, None]
  return out + b


@functools.partial(jax.jit, static_argnames=('gram', 'precision'))
def _statistics(features, valid, row_scale, *, gram: bool, precision):
  """(valid rows n, mean [D], scale [D], Gram matrix of the standardised rows / n [D, D] or None)."""
  n = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
  x = _rows(features, row_scale)
  mean = jnp.sum(jnp.where(valid[:, None], x, 0.0), axis=0) / n
  var = jnp.sum(jnp.where(valid[:, None], jnp.square(x - mean), 0.0), axis=0) / n
  scale = jnp.sqrt(var + EPS)
  if not gram:
    return n, mean, scale, None
  z = jnp.where(valid[:, None], (x - mean) / scale, 0.0)
  return n, mean, scale, jnp.dot(z.T, z, precision=precision) / n


def _preconditioner(gram: jax.Array) -> np.ndarray:
  """L^-T [D, D] (float32) with L L^T = gram + delta I, by LAPACK on the host: the matrix is
  small, and a replicated device program would repeat the work on every device. float32 (float64
  if that fails): a rough factor only slows the fit down, it does not change its minimum."""
  import scipy.linalg

  if gram.sharding.is_fully_replicated:  # any copy
    g = np.asarray(gram.addressable_data(0), np.float64)
  else:
    g = np.asarray(multihost_utils.process_allgather(gram, tiled=True), np.float64)
  g = g + PRECONDITION_DELTA * np.eye(len(g))
  for dtype in (np.float32, np.float64):
    (potrf,) = scipy.linalg.get_lapack_funcs(('potrf',), dtype=dtype)
    chol, info = potrf(g.astype(dtype), lower=True)
    if not info:
      eye = np.eye(len(g), dtype=dtype)
      inv_t = scipy.linalg.solve_triangular(chol, eye, lower=True, trans='T')
      if np.all(np.isfinite(inv_t)):
        return inv_t.astype(np.float32)
  raise np.linalg.LinAlgError("linear probe: no Cholesky factor of the features' Gram matrix")


def _put_rows(x: np.ndarray, like: jax.Array) -> jax.Array:
  """x [D, C'] on ``like``'s devices, rows split as ``like``'s when they divide (each device then
  multiplies its rows only), else replicated."""
  sharding = like.sharding
  if not isinstance(sharding, NamedSharding):
    return jax.device_put(x, sharding)
  rows = sharding.spec[0] if len(sharding.spec) else None
  shards = like.shape[0] // sharding.shard_shape(like.shape)[0]
  if len(x) % shards:
    rows = None
  return jax.device_put(x, NamedSharding(sharding.mesh, PartitionSpec(rows, None)))


@functools.partial(
  jax.jit, static_argnames=('num_classes', 'max_iter', 'tol', 'memory_size', 'precision')
)
def _lbfgs(
  features, labels, valid, row_scale, n, mean, scale, precond, l2, *, num_classes, max_iter, tol,
  memory_size, precision,
):  # fmt: skip
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

  def weights(params):
    if precond is None:
      return params['v']
    return jnp.dot(precond, params['v'], precision=precision)

  def loss(params):
    w = weights(params)
    logits = _logits(w, params['b'], mean, scale, features, row_scale, precision)
    ce = jax.nn.logsumexp(logits, axis=1) - jnp.sum(logits * onehot, axis=1)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / n + 0.5 * l2 * jnp.sum(jnp.square(w))

  params = {
    'v': jnp.zeros((features.shape[1], num_classes), jnp.float32),
    'b': jnp.zeros((num_classes,), jnp.float32),
  }
  opt = optax.lbfgs(memory_size=memory_size)
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def going(carry):
    _, state = carry
    count = otu.tree_get(state, 'count')
    gnorm = otu.tree_norm(otu.tree_get(state, 'grad'))
    return (count == 0) | ((count < max_iter) & (gnorm >= tol))

  params, state = jax.lax.while_loop(going, step, (params, opt.init(params)))
  return Probe(
    weights(params), params['b'], mean, scale,
    otu.tree_get(state, 'count').astype(jnp.int32),
    otu.tree_norm(otu.tree_get(state, 'grad')),
  )  # fmt: skip


def fit(
  features: jax.Array,
  labels: jax.Array,
  valid: jax.Array,
  row_scale: jax.Array | None = None,
  *,
  num_classes: int,
  c: float = 1.0,
  max_iter: int = 500,
  tol: float = 1e-5,
  memory_size: int = 10,
  precondition: bool = True,
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> Probe:
  """Fits the probe on features [N, D] (times ``row_scale`` [N]), labels [N], valid [N].

  ``c``: scikit-learn's inverse L2 strength (the same objective as ``LogisticRegression(C=c)``).
  ``tol``: on the norm of the gradient with respect to (V, b) (W, b without ``precondition``).
  ``precondition`` applies only with more valid rows than feature dimensions.
  Two jitted programs (statistics; L-BFGS) and, with ``precondition``, the D x D factorisation
  on the host in between.
  """
  # The labels of the valid rows, once on the host: they give both decisions below.
  valid_labels = _to_host(labels)[_to_host(valid)]
  if len(valid_labels) == 0:
    raise ValueError('linear probe: no valid train rows')
  # Preconditioning costs D^2 per class and evaluation against the data's N D: only worth it
  # with more valid rows than dimensions (a small bank of wide features, e.g. 24 ViT-B rows,
  # spent minutes reading a 1536 x 1536 matrix at every L-BFGS evaluation).
  precondition = precondition and len(valid_labels) > features.shape[1]
  n, mean, scale, gram = _statistics(
    features, valid, row_scale, gram=precondition, precision=precision
  )
  precond = _put_rows(_preconditioner(gram), features) if precondition else None
  # Only the classes present in the train rows get weights, as in scikit-learn (a class never
  # seen can never be predicted): the others get logit -inf. Besides matching the reference, this
  # keeps a probe on a small bank of a 1000-class dataset from fitting 1000 columns.
  present = np.unique(valid_labels)
  lut = np.zeros(num_classes, np.int32)
  lut[present] = np.arange(len(present), dtype=np.int32)
  probe = _lbfgs(
    features, _remap(labels, lut), valid, row_scale, n, mean, scale, precond, 1.0 / (c * n),
    num_classes=len(present), max_iter=max_iter, tol=tol, memory_size=memory_size,
    precision=precision,
  )  # fmt: skip
  if len(present) == num_classes:
    return probe
  w = jnp.zeros((probe.w.shape[0], num_classes), probe.w.dtype).at[:, present].set(probe.w)
  b = jnp.full((num_classes,), -jnp.inf, probe.b.dtype).at[present].set(probe.b)
  return probe._replace(w=w, b=b)


@jax.jit
def _remap(labels: jax.Array, lut: np.ndarray) -> jax.Array:
  return jnp.asarray(lut)[labels]


def _to_host(x: jax.Array) -> np.ndarray:
  """A global array on every process, as NumPy ([N] labels / mask: small next to features)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.partial(jax.jit, static_argnames=('precision',))
def predict(
  probe: Probe,
  features: jax.Array,
  row_scale: jax.Array | None = None,
  *,
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """Logits [N, C] of features [N, D] (times ``row_scale`` [N]), sharded as the features."""
  return _logits(probe.w, probe.b, probe.mean, probe.scale, features, row_scale, precision)


@jax.jit
def count_correct(probe: Probe, features, labels, valid, row_scale=None) -> jax.Array:
  """[correct, valid rows] (int32) of the probe's argmax on features [N, D]."""
  hit = (jnp.argmax(predict(probe, features, row_scale), axis=1) == labels) & valid
  return jnp.stack([jnp.sum(hit, dtype=jnp.int32), jnp.sum(valid, dtype=jnp.int32)])
