"""RC-MAE: MAE plus a mean teacher (an EMA of the whole MAE, encoder and decoder) fed the same
mask; loss = pixel reconstruction + MSE between the student's and the teacher's predictions on
the masked patches. The EMA is the same code as MoCo v3's momentum encoder (moma_jax/ema.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moma_jax import ema
from moma_jax.objectives.mae import Mae, masked_mean


@dataclasses.dataclass(frozen=True)
class RcMae(Mae):
  momentum: float = 0.996
  momentum_schedule: str = 'constant'  # or 'cosine' (momentum -> 1 over total_steps)
  total_steps: int = 1
  consistency_weight: float = 1.0

  def init(self, rng, start=None):
    params, extra = super().init(rng, start)
    return params, {'ema': params, 'step': jnp.zeros((), jnp.int32)}

  def loss(self, params, extra, frozen, batch, rng):
    if self.momentum_schedule == 'cosine':
      m = ema.cosine_momentum(extra['step'], self.total_steps, self.momentum)
    else:
      m = jnp.asarray(self.momentum)
    teacher = ema.ema_update(extra['ema'], params, m)
    images, keep, pred, _, pixel = self.masked_reconstruction(params, batch, rng)
    t_pred, _, _ = self.reconstruct(teacher, images, keep)
    consistency = masked_mean(jnp.square(pred - jax.lax.stop_gradient(t_pred)).mean(-1), keep)
    loss = pixel + self.consistency_weight * consistency
    metrics = {'loss': loss, 'loss/pixel': pixel, 'loss/consistency': consistency, 'momentum': m}
    return loss, (metrics, {'ema': teacher, 'step': extra['step'] + 1})

  def flops_per_example(self) -> float:
    return super().flops_per_example() * 4 / 3  # + one teacher forward
