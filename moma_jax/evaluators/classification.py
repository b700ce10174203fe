"""Top-1 / top-5 accuracy over a full evaluation split: every example counted exactly once
(padding carries mask == False and is excluded; counts are summed on device across hosts)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from moma_jax.data import device, pipeline, sources
from moma_jax.data.augment import ViewSpec


class ClassificationEvaluator:
  def __init__(
    self,
    *,
    dataset: str,
    split: str,
    image_size: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    data_axes: tuple[str, ...],
    data_dir: str | None = None,
    resize_ratio: float = 256 / 224,
  ):
    self.source = sources.open_split(dataset, split, data_dir=data_dir)
    self.view = ViewSpec(size=image_size, crop='center', resize_ratio=resize_ratio)
    self.per_host = device.check_batch_size(batch_size, mesh, data_axes)
    self.sharding = device.batch_sharding(mesh, data_axes)
    self._compiled: dict[Callable, Callable] = {}

  def _counts_fn(self, predict_fn):
    """Jitted (args, batch) -> [top-1 hits, top-5 hits, examples]; built once per predict_fn so
    periodic evaluations reuse the compiled function."""
    if predict_fn not in self._compiled:

      @jax.jit
      def counts(args, batch):
        logits = predict_fn(args, batch['image'])
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        hit5 = (top5 == batch['label'][:, None]).any(-1)
        hit1 = top5[:, 0] == batch['label']
        m = batch['mask']
        return jnp.stack([(hit1 & m).sum(), (hit5 & m).sum(), m.sum()])

      self._compiled[predict_fn] = counts
    return self._compiled[predict_fn]

  def run(
    self, predict_fn: Callable[[Any, jax.Array], jax.Array], args: Any, prefix: str = 'eval'
  ) -> Iterator[tuple[str, float]]:
    """predict_fn(args, uint8 images [B, H, W, 3]) -> logits [B, C]."""
    counts = self._counts_fn(predict_fn)
    it = pipeline.eval_iterator(
      self.source, {'image': self.view}, batch_size=self.per_host,
      process_count=jax.process_count(),
    )  # fmt: skip
    total = jnp.zeros(3, jnp.int32)
    for batch in it:
      total = total + counts(args, device.make_global(batch, self.sharding))
    top1, top5, n = (int(x) for x in jax.device_get(total))
    yield f'{prefix}/top1', top1 / max(n, 1)
    yield f'{prefix}/top5', top5 / max(n, 1)
    yield f'{prefix}/num_examples', float(n)
