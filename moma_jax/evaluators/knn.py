"""k-NN classification on frozen features (DINO's protocol): cosine similarity, the k = 20 nearest
training examples vote for their class with weight exp(similarity / T), T = 0.07; and, on the same
features, a linear probe (multinomial logistic regression on standardised features, fitted on
device: :mod:`moma_jax.evaluators.linear`).

Everything stays on the devices, sharded, so the memory bank scales with the number of devices:

* the memory bank (train-split features, unit-normalised, with labels and a validity mask) is a
  global ``jax.Array`` [N_bank, D] split along N over the mesh's data axes; each eval batch's
  features are written into each device's own rows (no transfer, no gather to the host);
* each eval batch is a chunk of queries: the chunk is all-gathered (Q x D), every device scores it
  against its own bank rows block by block, keeping a running top-k (``jax.lax.top_k`` over the
  best k so far and the new block), and the per-device top-k's are all-gathered and merged;
* padding (examples with mask False from the eval iterator, and the unused rows of the bank) has
  similarity -inf: it is never a neighbour;
* the linear probe is fitted on the bank's rows (unit-normalised rows times their kept norms: the
  raw features) and scored on the eval split's features, kept in a second bank of the same layout
  as the batches go by; padding rows count in neither.

Memory per device, in float32 words, with S data-parallel devices, a bank of N rows of width D,
Q queries per eval batch, bank blocks of B rows (``bank_block``), C classes:
  bank          N / S * (D + 3)               (features, label, validity, norm; N / S rounded up
                                               to whole eval batches and blocks)
  one step      Q * D + Q * (B + k) * 2       (gathered queries; block similarities + running
                                               top-k with their labels)
  merge, votes  2 * Q * k * S + Q * C
  linear probe  N_eval / S * (D + 3)          (the eval split's features, kept for the probe)
                + D * D (Gram matrix) + D * D / S (its inverse factor) + a transient [N / S, D]
                and a few [N / S, C] during the fit
ImageNet-1k with ViT-B CLS features (N = 1.28M, D = 768) on 8 devices: 0.49 GB of bank per device
(twice that for 'cls+mean'), plus ~140 MB per step for Q = 1024, B = 16384 -- where the host
version held 3.9 GB of features on every host and a 5 GB similarity chunk.

``knn_predict`` is the plain NumPy version (all features on the host), kept as the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moma_jax.data import device, pipeline, sources
from moma_jax.data.augment import ViewSpec
from moma_jax.data.embedded import NAMES as EMBEDDED
from moma_jax.data.mixing import normalize
from moma_jax.evaluators import linear as linear_probe
from moma_jax.models.pretrained import IMAGENET_MEAN, IMAGENET_STD
from moma_jax.models.vit import POOLS, ViT, pool_tokens

FeaturesFn = Callable[[Any, jax.Array], jax.Array]


# --- the NumPy reference ---------------------------------------------------------------------------


def knn_predict(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  *,
  num_classes: int,
  k: int = 20,
  temperature: float = 0.07,
  chunk: int = 1024,
) -> np.ndarray:
  """Class scores [N_test, C] from temperature-weighted votes of the k nearest (cosine) neighbours.

  All features on the host, in NumPy: the reference for :func:`knn_scores`, and enough for small
  data (the small-scale replication).
  """

  def unit(x):
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  train, test = unit(train_features), unit(test_features)
  k = min(k, len(train))
  scores = np.zeros((len(test), num_classes), np.float32)
  for start in range(0, len(test), chunk):
    sim = test[start : start + chunk] @ train.T
    nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    nn_sim = np.take_along_axis(sim, nn_idx, axis=1)
    weights = np.exp(nn_sim / temperature)
    votes = train_labels[nn_idx]
    rows = np.arange(len(nn_idx))[:, None]
    np.add.at(scores[start : start + chunk], (np.broadcast_to(rows, votes.shape), votes), weights)
  return scores


# --- feature functions -----------------------------------------------------------------------------


def encoder_features(
  model: ViT,
  *,
  pool: str = 'cls',
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
) -> FeaturesFn:
  """(variables, uint8 images [B, H, W, 3]) -> float32 features of ``model`` on the full image.

  Images are normalised with ``mean`` / ``std`` (the model's own input statistics). An encoder
  gives its final-norm tokens pooled by ``pool`` (see :func:`pool_tokens`): [B, D], or [B, 2D] for
  'cls+mean'. A global-pooling classifier (``pool='gap'``) gives its pre-logits [B, D] whatever
  ``pool`` says.
  """
  if pool not in POOLS:
    raise ValueError(f'features must be one of {", ".join(POOLS)}, not {pool!r}')
  mean, std = tuple(mean), tuple(std)

  def fn(variables, images):
    _, aux = model.apply(variables, normalize(images, mean, std))
    feats = aux['pre_logits'] if model.pool == 'gap' else pool_tokens(aux['encoded'], pool)
    return feats.astype(jnp.float32)

  return fn


def cls_features(
  model: ViT, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> FeaturesFn:
  """``encoder_features(model, pool='cls', mean=mean, std=std)``: the CLS token [B, D] (or a
  global-pooling classifier's pre-logits)."""
  return encoder_features(model, pool='cls', mean=mean, std=std)


def pixel_features(max_side: int = 32) -> FeaturesFn:
  """(ignored, uint8 images [B, H, W, 3]) -> raw pixels [B, h * w * 3] float32, the raw-pixel
  baseline; images larger than ``max_side`` are first area-resized to ``max_side`` (224 px
  ImageNet would otherwise need 150k floats per bank row)."""

  def fn(_, images):
    x = images.astype(jnp.float32)
    b, h, w, c = x.shape
    if max(h, w) > max_side:
      s = max_side / max(h, w)
      shape = (b, max(1, round(h * s)), max(1, round(w * s)), c)
      x = jax.image.resize(x, shape, 'linear', antialias=True)
    return x.reshape(b, -1)

  return fn


# --- the sharded memory bank -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryBank:
  """Unit-normalised features of the train split, sharded over ``data_axes`` along N.

  Rows are in no particular order (each device holds the examples of its batch shards); padding
  rows have ``valid`` False. ``norms`` are the rows' norms before normalisation (clamped at
  1e-12, as the normalisation is): ``features * norms[:, None]`` are the raw features, for the
  linear probe.
  """

  features: jax.Array  # [N, D] float32
  labels: jax.Array  # [N] int32
  valid: jax.Array  # [N] bool
  mesh: Mesh
  data_axes: tuple[str, ...]
  block: int  # rows per device scored per step; divides N / shards
  num_examples: int  # valid rows
  norms: jax.Array | None = None  # [N] float32

  @property
  def shards(self) -> int:
    return _num_shards(self.mesh, self.data_axes)


def _num_shards(mesh: Mesh, data_axes: tuple[str, ...]) -> int:
  return int(np.prod([mesh.shape[a] for a in data_axes]))


def _norm(x: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=-1), 1e-12)


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / _norm(x)[..., None]


class _BankWriter:
  """Allocates a bank of ``num_batches`` global batches of ``batch_size`` rows (plus padding to a
  whole number of blocks) and writes each batch's shards into their own devices' rows."""

  def __init__(
    self, mesh: Mesh, data_axes: tuple[str, ...], batch_size: int, num_batches: int, block: int
  ):
    self.mesh, self.data_axes = mesh, data_axes
    shards = _num_shards(mesh, data_axes)
    if batch_size % shards:
      raise ValueError(f'batch of {batch_size} does not split over {shards} devices')
    self.local_batch = batch_size // shards
    rows = max(1, num_batches) * self.local_batch
    self.block = min(block, rows)
    self.local_rows = math.ceil(rows / self.block) * self.block
    self.capacity = num_batches
    self.sharding = NamedSharding(mesh, PartitionSpec(data_axes))
    self.bank = None
    self.batches = 0
    self.count = jnp.zeros((), jnp.int32)

  def _allocate(self, dim: int) -> None:
    n = self.local_rows * _num_shards(self.mesh, self.data_axes)
    shapes = ((n, dim), (n,), (n,), (n,))
    dtypes = (jnp.float32, jnp.int32, jnp.bool_, jnp.float32)
    shardings = (NamedSharding(self.mesh, PartitionSpec(self.data_axes, None)),) + (
      self.sharding,
    ) * 3
    zeros = jax.jit(
      lambda: tuple(jnp.zeros(s, d) for s, d in zip(shapes, dtypes, strict=True)),
      out_shardings=shardings,
    )
    self.bank = zeros()
    spec, row = PartitionSpec(self.data_axes, None), PartitionSpec(self.data_axes)

    def write(bank, feats, labels, mask, offset):
      f, y, v, r = bank
      f = jax.lax.dynamic_update_slice_in_dim(f, _unit(feats), offset, 0)
      y = jax.lax.dynamic_update_slice_in_dim(y, labels.astype(jnp.int32), offset, 0)
      v = jax.lax.dynamic_update_slice_in_dim(v, mask.astype(jnp.bool_), offset, 0)
      r = jax.lax.dynamic_update_slice_in_dim(r, _norm(feats), offset, 0)
      return f, y, v, r

    sharded = jax.shard_map(
      write,
      mesh=self.mesh,
      in_specs=((spec, row, row, row), spec, row, row, PartitionSpec()),
      out_specs=(spec, row, row, row),
    )
    self._write = jax.jit(sharded, donate_argnums=(0,))

  def add(self, feats: jax.Array, labels: jax.Array, mask: jax.Array) -> None:
    """feats [B, D], labels [B], mask [B]: global arrays sharded over the data axes."""
    if self.batches >= self.capacity:
      raise ValueError(f'memory bank is full ({self.capacity} batches)')
    if self.bank is None:
      self._allocate(feats.shape[-1])
    offset = jnp.asarray(self.batches * self.local_batch, jnp.int32)
    self.bank = self._write(self.bank, feats, labels, mask, offset)
    self.count = self.count + jnp.sum(mask, dtype=jnp.int32)
    self.batches += 1

  def finish(self) -> MemoryBank:
    f, y, v, r = self.bank
    return MemoryBank(f, y, v, self.mesh, self.data_axes, self.block, int(self.count), r)


def _num_batches(source: sources.HostSplit, per_host: int) -> int:
  """Global batches of ``per_host`` examples per host that cover a split (every host, each once)."""
  return max(1, math.ceil(math.ceil(source.total_examples / jax.process_count()) / per_host))


def extract_bank(
  features_fn: FeaturesFn,
  params: Any,
  source: sources.HostSplit,
  view: ViewSpec,
  *,
  batch_size: int,
  mesh: Mesh,
  data_axes: tuple[str, ...],
  max_examples: int | None = None,
  bank_block: int = 16384,
) -> MemoryBank:
  """The memory bank of a split: features [N, D] of every example (all hosts, each once), kept on
  the devices. ``max_examples`` stops after the batch that reaches it. ``features_fn`` should be
  jitted (or cheap): it is called once per batch."""
  per_host = device.check_batch_size(batch_size, mesh, data_axes)
  sharding = device.batch_sharding(mesh, data_axes)
  num_batches = _num_batches(source, per_host)
  if max_examples:
    num_batches = min(num_batches, math.ceil(max_examples / batch_size))
  it = pipeline.eval_iterator(
    source, {'image': view}, batch_size=per_host, process_count=jax.process_count()
  )
  writer = _BankWriter(mesh, data_axes, batch_size, num_batches, bank_block)
  for batch in it:
    g = device.make_global(batch, sharding)
    writer.add(features_fn(params, g['image']), g['label'], g['mask'])
    if writer.batches == num_batches:
      break
  return writer.finish()


def bank_from_arrays(
  features: np.ndarray,
  labels: np.ndarray,
  *,
  mesh: Mesh,
  data_axes: tuple[str, ...],
  valid: np.ndarray | None = None,
  batch_size: int | None = None,
  bank_block: int = 16384,
) -> MemoryBank:
  """A memory bank from host arrays features [N, D], labels [N] (the same on every process).

  Rows with ``valid`` False never are neighbours. Written in global batches of ``batch_size``
  (default: N rounded up to the data-parallel devices), the last one padded.
  """
  shards = _num_shards(mesh, data_axes)
  n = len(labels)
  valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
  batch_size = batch_size or math.ceil(n / shards) * shards
  num_batches = max(1, math.ceil(n / batch_size))
  sharding = device.batch_sharding(mesh, data_axes)
  writer = _BankWriter(mesh, data_axes, batch_size, num_batches, bank_block)
  pad = num_batches * batch_size - n
  features = np.concatenate([features, np.zeros((pad, features.shape[1]), features.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
  valid = np.concatenate([valid, np.zeros(pad, bool)])
  for i in range(num_batches):
    s = slice(i * batch_size, (i + 1) * batch_size)
    writer.add(*(jax.device_put(a[s], sharding) for a in (features, labels, valid)))
  return writer.finish()


def cosine_to_mean(bank: MemoryBank) -> float:
  """How much of its features an encoder gives every image alike: the mean over the bank of
  cos(f_i, mean_j f_j), on the raw (not unit) features. Near 1, every image maps to nearly the
  same direction and k-NN / a distillation target carry only a small image-specific remainder.
  On digits every ViT, trained or random, is at ~0.99 (docs/results.md, the 56 px pilot): there
  it tells nothing of quality, which k-NN does."""
  assert bank.norms is not None, 'a bank written by _BankWriter keeps its norms'
  w = bank.valid.astype(jnp.float32)
  mean = jnp.sum(bank.features * (bank.norms * w)[:, None], axis=0) / jnp.maximum(w.sum(), 1.0)
  return float(jnp.sum((bank.features @ _unit(mean)) * w) / jnp.maximum(w.sum(), 1.0))


# --- queries against the bank ----------------------------------------------------------------------


@functools.cache
def _scores_fn(
  mesh: Mesh,
  data_axes: tuple[str, ...],
  block: int,
  num_classes: int,
  k: int,
  temperature: float,
  precision: jax.lax.Precision,
):
  spec, row = PartitionSpec(data_axes, None), PartitionSpec(data_axes)

  def local(queries, feats, labels, valid):
    q_local = queries.shape[0]
    q = jax.lax.all_gather(_unit(queries), data_axes, axis=0, tiled=True)  # [Q, D]: every query
    nq, dim = q.shape
    blocks = feats.shape[0] // block
    xs = (
      feats.reshape(blocks, block, dim),
      labels.reshape(blocks, block),
      valid.reshape(blocks, block),
    )

    def step(best, xs):
      best_sim, best_label = best  # [Q, k] each: the running top-k
      f, y, v = xs
      sim = jnp.dot(q, f.T, precision=precision)  # [Q, block]
      sim = jnp.where(v[None], sim, -jnp.inf)
      sim = jnp.concatenate([best_sim, sim], axis=1)
      lab = jnp.concatenate([best_label, jnp.broadcast_to(y[None], (nq, block))], axis=1)
      top, idx = jax.lax.top_k(sim, k)
      return (top, jnp.take_along_axis(lab, idx, axis=1)), None

    init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.zeros((nq, k), jnp.int32))
    init = jax.lax.pcast(init, data_axes, to='varying')  # the carry differs per device
    (sim, lab), _ = jax.lax.scan(step, init, xs)
    # Merge the devices' top-k's: [Q, S * k] -> [Q, k].
    sim = jax.lax.all_gather(sim, data_axes, axis=1, tiled=True)
    lab = jax.lax.all_gather(lab, data_axes, axis=1, tiled=True)
    sim, idx = jax.lax.top_k(sim, k)
    lab = jnp.take_along_axis(lab, idx, axis=1)
    weights = jnp.exp(sim / temperature)  # exp(-inf) = 0: fewer than k real neighbours
    scores = jnp.zeros((nq, num_classes), jnp.float32)
    scores = scores.at[jnp.arange(nq)[:, None], lab].add(weights)
    start = jax.lax.axis_index(data_axes) * q_local  # this device's queries
    return jax.lax.dynamic_slice_in_dim(scores, start, q_local, axis=0)

  sharded = jax.shard_map(
    local, mesh=mesh, in_specs=(spec, spec, row, row), out_specs=PartitionSpec(data_axes, None)
  )
  return jax.jit(sharded)


def knn_scores(
  bank: MemoryBank,
  queries: jax.Array,
  *,
  num_classes: int,
  k: int = 20,
  temperature: float = 0.07,
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """Class scores [Q, C] (float32) of queries [Q, D] against the bank: the sum over the k most
  cosine-similar bank rows of exp(similarity / temperature), per class (same as
  :func:`knn_predict`).

  ``queries``: a global array (e.g. one eval batch of features) sharded over the bank's data axes
  (or any array: it is resharded); Q must be a multiple of their devices. The scores come back
  with the same sharding. ``precision`` of the similarity matmul: HIGHEST (float32) by default,
  since exp(s / 0.07) turns an error of 1e-3 in s into 1.4% in a vote.
  """
  if queries.shape[0] % bank.shards:
    raise ValueError(f'{queries.shape[0]} queries do not split over {bank.shards} devices')
  if queries.shape[1] != bank.features.shape[1]:
    raise ValueError(f'queries have width {queries.shape[1]}, the bank {bank.features.shape[1]}')
  fn = _scores_fn(
    bank.mesh, bank.data_axes, bank.block, num_classes, k, float(temperature), precision
  )
  queries = jax.device_put(queries, NamedSharding(bank.mesh, PartitionSpec(bank.data_axes, None)))
  return fn(queries, bank.features, bank.labels, bank.valid)


LINEAR_TOL = 1e-4  # the probe's stop on the gradient norm: scikit-learn's default tol


def linear_probe_top1(
  train: MemoryBank,
  test: MemoryBank,
  *,
  num_classes: int,
  c: float = 1.0,
  max_iter: int = 500,
  tol: float = LINEAR_TOL,
) -> float:
  """Top-1 on the ``test`` bank's valid rows of a linear probe fitted on the ``train`` bank's
  (:func:`moma_jax.evaluators.linear.fit`: logistic regression on the raw features, standardised
  with the train mean / std; scikit-learn's ``C = c``)."""
  probe = linear_probe.fit(
    train.features, train.labels, train.valid, train.norms, num_classes=num_classes, c=c,
    max_iter=max_iter, tol=tol,
  )  # fmt: skip
  counts = linear_probe.count_correct(probe, test.features, test.labels, test.valid, test.norms)
  correct, total = (int(x) for x in np.asarray(counts))
  return correct / max(total, 1)


@jax.jit
def _count_correct(scores: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  hit = (jnp.argmax(scores, axis=1) == labels) & mask
  return jnp.stack([jnp.sum(hit, dtype=jnp.int32), jnp.sum(mask, dtype=jnp.int32)])


class KnnEvaluator:
  """Periodic k-NN top-1 of an encoder: train-split features as the memory bank, eval split queried;
  with ``linear``, also the top-1 of a linear probe on the same features (logistic regression with
  scikit-learn's ``C = linear_c``, at most ``linear_max_iter`` L-BFGS iterations, stopping once the
  gradient norm is below ``linear_tol`` (``LINEAR_TOL``, scikit-learn's default tol); see
  :mod:`moma_jax.evaluators.linear`).

  Memory per device: see the module docstring (the bank is split over the data-parallel devices;
  each eval batch of ``batch_size`` queries is scored in blocks of ``bank_block`` bank rows).
  """

  def __init__(
    self,
    *,
    dataset: str,
    train_split: str,
    eval_split: str,
    image_size: int,
    batch_size: int,
    mesh: Mesh,
    data_axes: tuple[str, ...],
    data_dir: str | None = None,
    k: int = 20,
    temperature: float = 0.07,
    max_train_examples: int | None = None,
    resize_ratio: float = 256 / 224,
    bank_block: int = 16384,
    linear: bool = True,
    linear_c: float = 1.0,
    linear_max_iter: int = 500,
    linear_tol: float = LINEAR_TOL,
    spread: bool = False,
  ):
    self.spread = spread
    self.train = sources.open_split(dataset, train_split, data_dir=data_dir)
    self.test = sources.open_split(dataset, eval_split, data_dir=data_dir)
    self.view = ViewSpec(size=image_size, crop='center', resize_ratio=resize_ratio)
    self.batch_size, self.mesh, self.data_axes = batch_size, mesh, data_axes
    self.k, self.temperature = k, temperature
    self.max_train = max_train_examples
    self.bank_block = bank_block
    self.linear, self.linear_c, self.linear_max_iter = linear, linear_c, linear_max_iter
    self.linear_tol = linear_tol

  @property
  def num_classes(self) -> int:
    return self.train.num_classes

  def run(
    self, features_fn: FeaturesFn, params: Any, prefix: str = 'knn'
  ) -> Iterator[tuple[str, float]]:
    """features_fn(params, uint8 images [B, H, W, 3]) -> [B, D]; ``params`` any pytree.

    Yields (f'{prefix}/top1', k-NN accuracy over every example of the eval split), then, with
    ``linear``, (f'{prefix}/linear', the linear probe's), and with ``spread``
    (f'{prefix}/cos_to_mean', cosine_to_mean of the train split's features).
    """
    fn = jax.jit(features_fn)
    bank = extract_bank(
      fn, params, self.train, self.view, batch_size=self.batch_size, mesh=self.mesh,
      data_axes=self.data_axes, max_examples=self.max_train, bank_block=self.bank_block,
    )  # fmt: skip
    per_host = device.check_batch_size(self.batch_size, self.mesh, self.data_axes)
    sharding = device.batch_sharding(self.mesh, self.data_axes)
    it = pipeline.eval_iterator(
      self.test, {'image': self.view}, batch_size=per_host, process_count=jax.process_count()
    )
    if self.linear:  # the eval split's features, kept on device for the probe
      test_bank = _BankWriter(
        self.mesh, self.data_axes, self.batch_size, _num_batches(self.test, per_host), 1 << 30
      )
    counts = jnp.zeros(2, jnp.int32)  # (correct, examples), summed on device
    for batch in it:
      g = device.make_global(batch, sharding)
      feats = fn(params, g['image'])
      scores = knn_scores(
        bank, feats, num_classes=self.num_classes, k=self.k, temperature=self.temperature
      )
      counts = counts + _count_correct(scores, g['label'], g['mask'])
      if self.linear:
        test_bank.add(feats, g['label'], g['mask'])
    correct, total = (int(c) for c in np.asarray(counts))
    yield f'{prefix}/top1', correct / max(total, 1)
    if self.linear:
      top1 = linear_probe_top1(
        bank, test_bank.finish(), num_classes=self.num_classes, c=self.linear_c,
        max_iter=self.linear_max_iter, tol=self.linear_tol,
      )  # fmt: skip
      yield f'{prefix}/linear', top1
    if self.spread:
      yield f'{prefix}/cos_to_mean', cosine_to_mean(bank)


# --- the standalone command ------------------------------------------------------------------------


def default_splits(dataset: str, data_dir: str | None = None) -> tuple[str, str, float]:
  """(train split, eval split, resize ratio) for a dataset name: the embedded digits / digits_m
  train/test at 1.0; an image folder's val / validation / test sub-folder; a tfds dataset's
  'validation' split if it has one, else 'test' (both at the usual 256/224 resize before the
  center crop)."""
  if dataset in EMBEDDED:
    return 'train', 'test', 1.0
  if dataset.startswith('folder:'):
    root = dataset[len('folder:') :]
    for split in ('val', 'validation', 'test'):
      if os.path.isdir(os.path.join(root, split)):
        return 'train', split, 256 / 224
    return 'train', 'validation', 256 / 224
  try:
    import tensorflow_datasets as tfds

    splits = tfds.builder(dataset, data_dir=data_dir).info.splits
  except Exception:  # unknown or unprepared: open_split then says what is wrong
    splits = {}
  return (
    'train',
    ('test' if 'validation' not in splits and 'test' in splits else 'validation'),
    256 / 224,
  )


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog='python -m moma_jax.evaluators.knn',
    description='k-NN top-1 (k=20, T=0.07, cosine; DINO protocol) and linear-probe top-1 '
    '(logistic regression on standardised features) of an encoder checkpoint, next to the '
    'raw-pixel and chance baselines',
  )
  p.add_argument(
    '--checkpoint', required=True, help='converted directory, or a PyTorch .pth / .pth.tar'
  )
  p.add_argument(
    '--dataset', default='imagenet2012', help='digits, digits_m, folder:/path or a tfds name'
  )
  p.add_argument('--data_dir', default=None)
  p.add_argument('--train_split', default=None, help="default: 'train'")
  p.add_argument(
    '--eval_split', default=None, help="default: the dataset's validation or test split"
  )
  p.add_argument('--features', default='cls+mean', choices=POOLS, help='token pooling (encoders)')
  p.add_argument('--batch_size', type=int, default=256)
  p.add_argument('--k', type=int, default=20)
  p.add_argument('--temperature', type=float, default=0.07)
  p.add_argument('--max_train', type=int, default=0, help='cap on the memory bank (0: all)')
  p.add_argument(
    '--resize_ratio',
    type=float,
    default=None,
    help='default: 1 for digits / digits_m, else 256/224',
  )
  p.add_argument('--linear', action=argparse.BooleanOptionalAction, default=True,
                 help='also a linear probe on the same features')  # fmt: skip
  p.add_argument('--baselines', action=argparse.BooleanOptionalAction, default=True,
                 help='also report raw pixels (k-NN, linear probe) and chance')  # fmt: skip
  p.add_argument('--random_init', type=int, default=None, metavar='SEED',
                 help='also the same architecture randomly initialised with this seed')  # fmt: skip
  p.add_argument('--spread', action='store_true',
                 help="also the train features' mean cosine to their mean (near 1: every image "
                      'alike)')  # fmt: skip
  return p


def main(argv: list[str] | None = None) -> int:
  """python -m moma_jax.evaluators.knn --checkpoint CKPT --dataset NAME [...]; exit 2 with a
  one-line error on bad input."""
  from moma_jax import builders, sharding

  a = _parser().parse_args(argv)
  try:
    train_split, eval_split, ratio = default_splits(a.dataset, a.data_dir)
    train_split, eval_split = a.train_split or train_split, a.eval_split or eval_split
    ratio = a.resize_ratio if a.resize_ratio is not None else ratio
    loaded = builders.load_checkpoint(a.checkpoint)
    model = loaded.model.clone(num_classes=0)  # the head (if any) is dropped from params below
    mean = tuple(loaded.metadata.get('mean', IMAGENET_MEAN))
    std = tuple(loaded.metadata.get('std', IMAGENET_STD))
    features = encoder_features(model, pool=a.features, mean=mean, std=std)
    mesh = sharding.make_mesh({'data': -1})
    device.check_batch_size(a.batch_size, mesh, ('data',))
    ev = KnnEvaluator(
      dataset=a.dataset, train_split=train_split, eval_split=eval_split,
      image_size=model.image_size, batch_size=a.batch_size, mesh=mesh, data_axes=('data',),
      data_dir=a.data_dir, k=a.k, temperature=a.temperature,
      max_train_examples=a.max_train or None, resize_ratio=ratio, linear=a.linear,
      spread=a.spread,
    )  # fmt: skip
  except (OSError, ValueError, KeyError) as e:  # DataError, CheckpointMismatchError are ValueErrors
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'error: {msg}', file=sys.stderr)
    return 2

  def cells(result: dict[str, float], prefix: str = 'knn') -> str:
    out = f'knn/top1: {100 * result[f"{prefix}/top1"]:.2f}%'
    if a.linear:
      out += f'  linear/top1: {100 * result[f"{prefix}/linear"]:.2f}%'
    if a.spread:
      out += f'  cosine to the mean: {result[f"{prefix}/cos_to_mean"]:.4f}'
    return out

  params = {'params': {k: v for k, v in loaded.params['params'].items() if k != 'head'}}
  line = cells(dict(ev.run(features, params)))
  if a.random_init is not None:  # the same architecture at random init: the floor to beat
    size = model.image_size
    init = model.init(jax.random.key(a.random_init), jnp.zeros((1, size, size, 3), jnp.float32))
    line += f'  random init (seed {a.random_init}): {cells(dict(ev.run(features, init)))}'
  if a.baselines:
    pixels = dict(ev.run(pixel_features(), None))
    line += f'  raw pixels: {100 * pixels["knn/top1"]:.2f}%'
    if a.linear:
      line += f' (linear {100 * pixels["knn/linear"]:.2f}%)'
    line += f'  chance: {100 / ev.num_classes:.2f}%'
  pool = 'pre-logits' if model.pool == 'gap' else a.features
  print(
    f'{line}  ({a.dataset} {train_split} -> {eval_split}, {ev.test.total_examples} queries, '
    f'k={a.k}, T={a.temperature}, {pool} features)'
  )
  return 0


def run() -> None:
  """Console-script entry point (moma-knn)."""
  from moma_jax import hardware

  hardware.quiet_libtpu()  # before JAX starts: no libtpu start-up errors on a machine without TPU
  sys.exit(main())


if __name__ == '__main__':
  run()
