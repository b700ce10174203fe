"""k-NN classification on frozen features (DINO's protocol): cosine similarity, k nearest
training examples, votes weighted by exp(similarity / T)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from moma_jax.data import device, pipeline, sources
from moma_jax.data.augment import ViewSpec
from moma_jax.data.mixing import normalize
from moma_jax.models.vit import ViT


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
  """Class scores [N_test, C] from temperature-weighted votes of the k nearest (cosine) neighbours."""

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


def extract_features(
  features_fn: Callable[[Any, jax.Array], jax.Array],
  params: Any,
  source: sources.HostSplit,
  view: ViewSpec,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh,
  data_axes: tuple[str, ...],
  max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Features [N, D] and labels [N] of every example of a split (all hosts), each counted once."""
  per_host = device.check_batch_size(batch_size, mesh, data_axes)
  sharding = device.batch_sharding(mesh, data_axes)
  it = pipeline.eval_iterator(
    source, {'image': view}, batch_size=per_host, process_count=jax.process_count()
  )
  fn = jax.jit(features_fn)
  feats, labels = [], []
  seen = 0
  for batch in it:
    g = device.make_global(batch, sharding)
    f = fn(params, g['image'])
    f, y, m = multihost_utils.process_allgather((f, g['label'], g['mask']), tiled=True)
    feats.append(np.asarray(f)[m])
    labels.append(np.asarray(y)[m])
    seen += int(m.sum())
    if max_examples and seen >= max_examples:
      break
  return np.concatenate(feats), np.concatenate(labels)


def cls_features(model: ViT) -> Callable[[Any, jax.Array], jax.Array]:
  """(variables, uint8 images) -> the CLS token of ``model`` on the full image, [B, D] float32;
  for a global-pooling classifier, its pre-logits."""

  def fn(variables, images):
    out, aux = model.apply(variables, normalize(images))
    feats = aux['pre_logits'] if model.pool == 'gap' else aux['encoded'][:, 0]
    return feats.astype(jnp.float32)

  return fn


class KnnEvaluator:
  """Periodic k-NN top-1 of an encoder: train-split features as the memory bank, eval split queried."""

  def __init__(
    self,
    *,
    dataset: str,
    train_split: str,
    eval_split: str,
    image_size: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    data_axes: tuple[str, ...],
    data_dir: str | None = None,
    k: int = 20,
    temperature: float = 0.07,
    max_train_examples: int | None = None,
    resize_ratio: float = 256 / 224,
  ):
    self.train = sources.open_split(dataset, train_split, data_dir=data_dir)
    self.test = sources.open_split(dataset, eval_split, data_dir=data_dir)
    self.view = ViewSpec(size=image_size, crop='center', resize_ratio=resize_ratio)
    self.kw = dict(batch_size=batch_size, mesh=mesh, data_axes=data_axes)
    self.k, self.temperature = k, temperature
    self.max_train = max_train_examples

  def run(
    self, features_fn: Callable[[Any, jax.Array], jax.Array], params: Any, prefix: str = 'knn'
  ) -> Iterator[tuple[str, float]]:
    """features_fn(params, uint8 images [B, H, W, 3]) -> [B, D]; ``params`` any pytree."""
    tr_f, tr_y = extract_features(
      features_fn, params, self.train, self.view, max_examples=self.max_train, **self.kw
    )
    te_f, te_y = extract_features(features_fn, params, self.test, self.view, **self.kw)
    scores = knn_predict(
      tr_f, tr_y, te_f, num_classes=self.train.num_classes, k=self.k, temperature=self.temperature
    )
    yield f'{prefix}/top1', float((scores.argmax(1) == te_y).mean())


def main(argv: list[str] | None = None) -> int:
  """Standalone: python -m moma_jax.evaluators.knn --checkpoint DIR --dataset NAME [...]."""
  import argparse

  from moma_jax import sharding
  from moma_jax.models.pretrained import load_pretrained

  p = argparse.ArgumentParser(description='k-NN top-1 of an encoder checkpoint (CLS features)')
  p.add_argument('--checkpoint', required=True, help='converted or exported checkpoint directory')
  p.add_argument('--dataset', default='imagenet2012', help='digits_m, folder:/path or a tfds name')
  p.add_argument('--data_dir', default=None)
  p.add_argument('--train_split', default='train')
  p.add_argument('--eval_split', default='validation')
  p.add_argument('--batch_size', type=int, default=256)
  p.add_argument('--k', type=int, default=20)
  p.add_argument('--temperature', type=float, default=0.07)
  p.add_argument('--max_train', type=int, default=0, help='cap on the memory bank (0: all)')
  p.add_argument('--resize_ratio', type=float, default=256 / 224)
  a = p.parse_args(argv)
  loaded = load_pretrained(a.checkpoint)
  model = loaded.model.clone(num_classes=0)  # the head (if any) is dropped from params below
  mesh = sharding.make_mesh({'data': -1})
  ev = KnnEvaluator(
    dataset=a.dataset, train_split=a.train_split, eval_split=a.eval_split,
    image_size=model.image_size, batch_size=a.batch_size, mesh=mesh, data_axes=('data',),
    data_dir=a.data_dir, k=a.k, temperature=a.temperature, max_train_examples=a.max_train or None,
    resize_ratio=a.resize_ratio,
  )  # fmt: skip

  params = {'params': {k: v for k, v in loaded.params['params'].items() if k != 'head'}}
  for name, value in ev.run(cls_features(model), params):
    print(f'{name}: {100 * value:.2f}%')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
