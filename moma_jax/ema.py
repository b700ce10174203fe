"""Exponential moving averages of parameters: MoCo v3's momentum encoder and RC-MAE's mean
teacher share this one piece of code."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def ema_update(ema: Any, params: Any, momentum: jax.Array | float) -> Any:
  """ema <- momentum * ema + (1 - momentum) * params, leaf by leaf (no gradient flows)."""
  params = jax.lax.stop_gradient(params)
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p.astype(e.dtype), ema, params)


def cosine_momentum(
  step: jax.Array, total_steps: int, base: float, final: float = 1.0
) -> jax.Array:
  """MoCo v3's schedule: base at step 0 rising to ``final`` at ``total_steps`` along a half cosine:
  m = final - (final - base) * (1 + cos(pi * step / total)) / 2."""
  t = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
  return final - (final - base) * 0.5 * (1.0 + jnp.cos(math.pi * t))
