"""MoCo v3 pre-training: base encoder + 3-layer projector + 2-layer predictor, a momentum encoder
(+ projector) updated by EMA with a cosine momentum schedule, symmetric InfoNCE over the global
batch, two asymmetric BYOL-style views, optionally a frozen random patch embedding.

Global-batch semantics come from jit over global arrays: the InfoNCE logits are [B, B] over the
whole batch and BatchNorm statistics are taken over the whole batch, whatever the sharding (XLA
inserts the collectives); the tests check 8 devices against 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from moma_jax import ema, flops
from moma_jax.models.heads import MlpHead
from moma_jax.models.pretrained import IMAGENET, Normalization
from moma_jax.models.vit import ViT, pool_tokens
from moma_jax.objectives import Objective

Array = jax.Array


def infonce(q: Array, k: Array, temperature: float) -> Array:
  """MoCo v3's contrastive loss: CE over q k^T / T with positives on the diagonal, times 2T."""
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True).clip(1e-12)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True).clip(1e-12)
  logits = (q @ k.T) / temperature
  labels = jnp.arange(q.shape[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() * (2 * temperature)


@dataclasses.dataclass(frozen=True)
class MocoV3(Objective):
  encoder: ViT
  projector: MlpHead  # 3 layers, 4096 hidden, 256 out, last BN without affine
  predictor: MlpHead  # 2 layers, 4096 hidden, 256 out, no last BN
  total_steps: int
  temperature: float = 0.2
  base_momentum: float = 0.99
  freeze_patch_embed: bool = True
  input_norm: Normalization = IMAGENET

  torch_format = 'mocov3'

  @property
  def frozen_pattern(self) -> str:
    frozen = ['encoder/pos_embed$']
    if self.freeze_patch_embed:  # MoCo v3's stop-gradient on the random patch projection
      frozen.append('encoder/patch_embed/')
    return '^(' + '|'.join(frozen) + ')'

  def required_views(self) -> set[str]:
    return {'view1', 'view2'}

  def init(self, rng: Array, start: Any | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    k_enc, k_proj, k_pred = jax.random.split(rng, 3)
    e = self.encoder
    enc = e.init(k_enc, jnp.zeros((1, e.image_size, e.image_size, e.channels)))['params']
    if start is not None:
      enc = start
    proj = self.projector.init(k_proj, jnp.zeros((2, e.width)))
    pred = self.predictor.init(k_pred, jnp.zeros((2, self.projector.out_dim)))
    params = {'encoder': enc, 'projector': proj['params'], 'predictor': pred['params']}
    extra = {
      'projector_bn': proj['batch_stats'],
      'predictor_bn': pred['batch_stats'],
      # The momentum branch starts as a copy of the base branch (MoCo v3).
      'momentum': {'encoder': enc, 'projector': proj['params']},
      'momentum_projector_bn': proj['batch_stats'],
      'step': jnp.zeros((), jnp.int32),
    }
    return params, extra

  def _project(self, params, bn, x, head: MlpHead):
    out, new = head.apply(
      {'params': params, 'batch_stats': bn}, x, train=True, mutable=['batch_stats']
    )
    return out, new['batch_stats']

  def loss(self, params, extra, frozen, batch, rng):
    m = ema.cosine_momentum(extra['step'], self.total_steps, self.base_momentum)
    momentum = ema.ema_update(
      extra['momentum'], {'encoder': params['encoder'], 'projector': params['projector']}, m
    )
    new = dict(extra, momentum=momentum, step=extra['step'] + 1)
    qs, ks = [], []
    for view in ('view1', 'view2'):
      x = self.input_norm(batch[view])
      feats, _ = self.encoder.apply({'params': params['encoder']}, x)
      z, new['projector_bn'] = self._project(
        params['projector'], new['projector_bn'], feats[:, 0], self.projector
      )
      q, new['predictor_bn'] = self._project(
        params['predictor'], new['predictor_bn'], z, self.predictor
      )
      k_feats, _ = self.encoder.apply({'params': momentum['encoder']}, x)
      k, new['momentum_projector_bn'] = self._project(
        momentum['projector'], new['momentum_projector_bn'], k_feats[:, 0], self.projector
      )
      qs.append(q)
      ks.append(jax.lax.stop_gradient(k))
    loss = infonce(qs[0], ks[1], self.temperature) + infonce(qs[1], ks[0], self.temperature)
    return loss, ({'loss': loss, 'momentum': m}, new)

  def features(self, params, extra, frozen, images: Array, pool: str = 'cls') -> Array:
    tokens, _ = self.encoder.apply({'params': params['encoder']}, self.input_norm(images))
    return pool_tokens(tokens, pool).astype(jnp.float32)

  def export(self, params, extra):
    w = self.encoder.width
    return {
      'encoder': (self.encoder, {'params': params['encoder']}, None),
      'projector': (
        self.projector,
        {'params': params['projector'], 'batch_stats': extra['projector_bn']},
        w,
      ),
      'predictor': (
        self.predictor,
        {'params': params['predictor'], 'batch_stats': extra['predictor_bn']},
        self.projector.out_dim,
      ),
      'momentum_encoder': (self.encoder, {'params': extra['momentum']['encoder']}, None),
      'momentum_projector': (
        self.projector,
        {'params': extra['momentum']['projector'], 'batch_stats': extra['momentum_projector_bn']},
        w,
      ),
    }

  def flops_per_example(self) -> float:
    e = self.encoder
    f = flops.vit_flops(e)
    # per view: base encoder + projector + predictor fwd + bwd (3x), momentum encoder +
    # projector fwd (1x). The 4096-wide heads are ~1% of a ViT-B's FLOPs, more for small encoders.
    proj, pred = (
      _mlp_flops(self.projector, e.width),
      _mlp_flops(self.predictor, self.projector.out_dim),
    )
    return 2 * (3 * (f + proj + pred) + f + proj)


def _mlp_flops(head, in_dim: int) -> float:
  """Forward FLOPs of an MlpHead (its Linear layers) on one example."""
  dims = [in_dim] + [head.hidden_dim] * (head.num_layers - 1) + [head.out_dim]
  return 2.0 * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
