"""On-device batch augmentations for fine-tuning: normalisation, mixup / cutmix, random erasing.

These run inside the jitted train step on the global batch, with keys from the step's rng.
Mixup / cutmix follow timm's ``Mixup`` in 'batch' mode: one lambda per batch, the batch mixed with
its reverse (``x.flip(0)``); cutmix's lambda is corrected to the exact pasted area.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moma_jax.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, Normalization

Array = jax.Array


def normalize(images: Array, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=jnp.float32) -> Array:
  """uint8 [B, H, W, 3] -> float (x / 255 - mean) / std."""
  return Normalization(mean, std)(images, dtype)


def one_hot_smooth(labels: Array, num_classes: int, smoothing: float = 0.0) -> Array:
  """Integer labels [B] -> smoothed one-hot [B, C] (timm: off = s / C, on = 1 - s + s / C)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _cutmix_box(rng: Array, lam: Array, h: int, w: int) -> tuple[Array, Array, Array, Array]:
  """timm rand_bbox: a box of area ~(1 - lam) centred uniformly, clipped to the image."""
  ratio = jnp.sqrt(1.0 - lam)
  ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, h)
  cx = jax.random.randint(kx, (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  return y0, y1, x0, x1


def mixup_cutmix(
  rng: Array,
  images: Array,
  targets: Array,
  *,
  mixup_alpha: float = 0.8,
  cutmix_alpha: float = 1.0,
  switch_prob: float = 0.5,
  prob: float = 1.0,
) -> tuple[Array, Array]:
  """Mixes a batch with its reverse. images [B, H, W, C] float, targets [B, K] (rows sum to 1).

  With probability ``prob`` the batch is mixed; then cutmix (if both are on, with probability
  ``switch_prob``) or mixup. Returns (images, targets); target rows still sum to 1 and for cutmix
  the weight equals the pixel area kept from each image.
  """
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  b, h, w, _ = images.shape
  flipped, t_flipped = images[::-1], targets[::-1]
  use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or jax.random.uniform(k_switch) < switch_prob)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0

  y0, y1, x0, x1 = _cutmix_box(k_box, lam_cut, h, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
  cut_images = jnp.where(box, flipped, images)
  lam_cut_exact = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  mix_images = lam_mix * images + (1.0 - lam_mix) * flipped

  lam = jnp.where(use_cutmix, lam_cut_exact, lam_mix)
  out = jnp.where(use_cutmix, cut_images, mix_images)
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, lam, 1.0)
  out = jnp.where(apply, out, images)
  return out.astype(images.dtype), lam * targets + (1.0 - lam) * t_flipped


def random_erasing(
  rng: Array,
  images: Array,
  prob: float = 0.25,
  scale: tuple[float, float] = (0.02, 1 / 3),
  ratio: tuple[float, float] = (0.3, 3.3),
) -> Array:
  """timm RandomErasing(mode='pixel', count 1) on normalised images [B, H, W, C]: per example,
  with probability ``prob``, a random box is replaced by per-pixel standard normal noise."""
  b, h, w, c = images.shape
  k_p, k_area, k_ratio, k_y, k_x, k_noise = jax.random.split(rng, 6)
  area = jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1]) * h * w
  log_r = jax.random.uniform(k_ratio, (b,), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
  r = jnp.exp(log_r)
  eh = jnp.clip(jnp.round(jnp.sqrt(area * r)), 1, h).astype(jnp.int32)
  ew = jnp.clip(jnp.round(jnp.sqrt(area / r)), 1, w).astype(jnp.int32)
  y0 = (jax.random.uniform(k_y, (b,)) * (h - eh + 1)).astype(jnp.int32)
  x0 = (jax.random.uniform(k_x, (b,)) * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  box = (
    (rows >= y0[:, None, None])
    & (rows < (y0 + eh)[:, None, None])
    & (cols >= x0[:, None, None])
    & (cols < (x0 + ew)[:, None, None])
  )
  box &= (jax.random.uniform(k_p, (b,)) < prob)[:, None, None]
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.where(box[..., None], noise, images)
