"""MAE-style random masking with jax.random: which patches each example keeps visible."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """MAE's rounding: int(N * (1 - ratio)); 90% of 196 keeps 19 patches."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
  return max(1, int(num_patches * (1 - mask_ratio)))


def random_keep_idx(key: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> jax.Array:
  """[B, n_keep] int32 indices of the visible patches: per example, the first n_keep entries of a
  random permutation (argsort of uniform noise, as MAE). Each example gets its own permutation;
  every patch is equally likely to be kept."""
  noise = jax.random.uniform(key, (batch, num_patches))
  keep = num_visible(num_patches, mask_ratio)
  return jnp.argsort(noise, axis=1)[:, :keep].astype(jnp.int32)


def visible_mask(keep_idx: jax.Array, num_patches: int) -> jax.Array:
  """bool [B, N]: True at the patches in ``keep_idx`` [B, n_keep] (the visible ones)."""
  b = keep_idx.shape[0]
  return jnp.zeros((b, num_patches), bool).at[jnp.arange(b)[:, None], keep_idx].set(True)
