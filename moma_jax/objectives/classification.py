"""Supervised classification: end-to-end fine-tuning and linear probing of a ViT encoder.

Fine-tuning (MAE recipe by default): the whole ViT with a new head (trunc-normal std 2e-5),
global-average pooling + fc_norm or CLS, drop path, mixup / cutmix with label smoothing and random
erasing on device, layer-wise lr decay (in the optimizer).

Linear probe (MAE / MoCo v3 recipe): the encoder is frozen (a ``frozen`` input, no gradient,
bit-identical after training); the head is BatchNorm without affine (eps 1e-6) + Linear on the CLS
token (or the mean of patch tokens), trained with LARS or SGD.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moma_jax import flops
from moma_jax.data import mixing
from moma_jax.models.pretrained import IMAGENET, Normalization
from moma_jax.models.vit import ViT, pool_tokens
from moma_jax.objectives import Objective

Array = jax.Array


class ProbeHead(nn.Module):
  """BatchNorm1d(affine=False, eps=1e-6) + Linear, as MAE's linear probe."""

  num_classes: int

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = nn.BatchNorm(
      use_running_average=not train, use_scale=False, use_bias=False, epsilon=1e-6, momentum=0.9,
      name='bn',
    )(x)  # fmt: skip
    return nn.Dense(
      self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01), name='head'
    )(x)


def merge_pretrained(init: Any, pretrained: Any, skip: tuple[str, ...]) -> tuple[Any, list[str]]:
  """Takes every parameter from ``pretrained`` except the top-level names in ``skip``.

  Strict: an encoder parameter missing from ``pretrained`` or of another shape is an error listing
  all of them; ``skip`` is the explicit list of what is deliberately not loaded (new head, ...).
  Returns (params, names kept from the fresh init).
  """
  problems, fresh = [], []
  out = {}
  for k, v in init.items():
    if k in skip:
      out[k] = v
      fresh.append(k)
    elif k not in pretrained:
      problems.append(f'{k} missing')
    else:
      a, b = jax.tree.map(jnp.shape, v), jax.tree.map(jnp.shape, pretrained[k])
      if a != b:
        problems.append(f'{k}: checkpoint {b} vs model {a}')
      out[k] = pretrained[k]
  extra = sorted(set(pretrained) - set(init) - set(skip) - {'norm'})
  if extra:
    problems.append(f'unexpected {extra}')
  if problems:
    raise ValueError('pre-trained encoder does not fit the classifier: ' + '; '.join(problems))
  return out, fresh


@dataclasses.dataclass(frozen=True)
class Classification(Objective):
  model: ViT  # with num_classes and pool set
  linear_probe: bool = False
  label_smoothing: float = 0.1
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  mix_prob: float = 1.0
  switch_prob: float = 0.5
  erase_prob: float = 0.25
  input_norm: Normalization = IMAGENET  # the encoder's input statistics (from its checkpoint)

  def __post_init__(self):
    if not self.model.num_classes:
      raise ValueError('the classification model needs num_classes > 0')

  @property
  def encoder(self) -> ViT:
    """The ViT without head, as the probe's frozen feature extractor."""
    return self.model.clone(num_classes=0, pool='cls')

  @property
  def frozen_pattern(self) -> str | None:
    return None if self.linear_probe else r'^model/pos_embed$'

  def required_views(self) -> set[str]:
    return {'image'}

  def init(
    self, rng: Array, pretrained: Any | None = None
  ) -> tuple[dict[str, Any], dict[str, Any]]:
    m = self.model
    x = jnp.zeros((1, m.image_size, m.image_size, m.channels))
    if self.linear_probe:
      v = ProbeHead(m.num_classes).init(rng, jnp.zeros((2, m.width)))
      return {'probe': v['params']}, {'probe': v['batch_stats']}
    params = m.init(rng, x)['params']
    if pretrained is not None:
      skip = ('head', 'fc_norm') if m.pool == 'gap' else ('head',)
      params, _ = merge_pretrained(params, pretrained, skip)
    return {'model': params}, {}

  def _pool(self, tokens: Array) -> Array:
    if self.model.pool == 'gap':
      return tokens[:, 1:].mean(axis=1)
    return tokens[:, 0]

  def logits(self, params, extra, frozen, images: Array, *, train: bool, rng=None):
    """images: float normalised. Returns (logits [B, C], new extra)."""
    if self.linear_probe:
      tokens, _ = self.encoder.apply(frozen['encoder'], images)
      feats = jax.lax.stop_gradient(self._pool(tokens).astype(jnp.float32))
      logits, new = ProbeHead(self.model.num_classes).apply(
        {'params': params['probe'], 'batch_stats': extra['probe']}, feats, train=train,
        mutable=['batch_stats'],
      )  # fmt: skip
      return logits, {'probe': new['batch_stats']}
    rngs = {'dropout': rng} if rng is not None else {}
    logits, _ = self.model.apply({'params': params['model']}, images, train=train, rngs=rngs)
    return logits, extra

  def loss(self, params, extra, frozen, batch, rng):
    k_mix, k_erase, k_drop = jax.random.split(rng, 3)
    images = self.input_norm(batch['image'])
    targets = mixing.one_hot_smooth(batch['label'], self.model.num_classes, self.label_smoothing)
    if not self.linear_probe:
      if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
        images, targets = mixing.mixup_cutmix(
          k_mix, images, targets, mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
          switch_prob=self.switch_prob, prob=self.mix_prob,
        )  # fmt: skip
      if self.erase_prob > 0:
        images = mixing.random_erasing(k_erase, images, self.erase_prob)
    logits, new_extra = self.logits(params, extra, frozen, images, train=True, rng=k_drop)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    acc = (logits.argmax(-1) == targets.argmax(-1)).mean()
    return loss, ({'loss': loss, 'train_accuracy': acc}, new_extra)

  def predict(self, params, extra, frozen, images: Array) -> Array:
    """uint8 images -> logits (evaluation mode)."""
    logits, _ = self.logits(params, extra, frozen, self.input_norm(images), train=False)
    return logits

  def features(self, params, extra, frozen, images: Array, pool: str = 'cls') -> Array:
    """Features for k-NN: the probed encoder's tokens pooled by ``pool``, or the fine-tuned
    model's pre-logits."""
    x = self.input_norm(images)
    if self.linear_probe:
      tokens, _ = self.encoder.apply(frozen['encoder'], x)
      return pool_tokens(tokens, pool).astype(jnp.float32)
    _, aux = self.model.apply({'params': params['model']}, x)
    return aux['pre_logits'].astype(jnp.float32)

  def export(self, params: dict[str, Any], extra: dict) -> dict[str, tuple[Any, Any, None]]:
    """The fine-tuned ViT (with its head); a linear probe exports nothing (its encoder is given)."""
    return {} if self.linear_probe else {'encoder': (self.model, {'params': params['model']}, None)}

  def flops_per_example(self) -> float:
    m = self.model
    f = flops.vit_flops(m)
    return f + 2 * m.width * m.num_classes * 3 if self.linear_probe else 3 * f
