"""Image summaries for TensorBoard: what the model is given and, for MAE-type objectives, what it
makes of it. Objectives with a ``visualize`` method name their panels; the trainer lays the panels
of each example side by side (``side_by_side``) and writes them every ``image_every`` steps, always
for the same examples and the same mask, so the reconstruction can be watched improving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moma_jax.masking import visible_mask
from moma_jax.models.vit import patchify, unpatchify

Array = jax.Array
HIDDEN = 0.5  # grey, as in MAE's own visualisations, for the patches a student never sees


def to_unit(images: Array) -> Array:
  """uint8 [B, H, W, 3] -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def masked(images: Array, keep_idx: Array, patch_size: int) -> Array:
  """[B, H, W, 3] in [0, 1] with the patches not in ``keep_idx`` grey: what the student sees."""
  grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
  patches = patchify(images, patch_size)
  visible = visible_mask(keep_idx, patches.shape[1])[..., None]
  return unpatchify(jnp.where(visible, patches, HIDDEN), patch_size, grid, images.shape[-1])


def reconstruction(
  pred: Array,
  normalised: Array,
  keep_idx: Array,
  patch_size: int,
  norm_pix: bool,
  mean: tuple[float, ...],
  std: tuple[float, ...],
) -> Array:
  """MAE predictions [B, N, p*p*C] -> images in [0, 1], visible patches pasted from the input.

  With norm_pix the decoder predicts each patch standardised by its own mean and variance; those
  statistics are taken from the input patch (as MAE's visualisation does) to get pixels back.
  ``normalised`` is the encoder's input, [B, H, W, C] normalised with (mean, std).
  """
  target = patchify(normalised.astype(jnp.float32), patch_size)
  if norm_pix:
    mu = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    pred = pred * jnp.sqrt(var + 1e-6) + mu
  visible = visible_mask(keep_idx, target.shape[1])[..., None]
  patches = jnp.where(visible, target, pred)
  grid = (normalised.shape[1] // patch_size, normalised.shape[2] // patch_size)
  x = unpatchify(patches, patch_size, grid, normalised.shape[-1])
  return jnp.clip(x * jnp.asarray(std) + jnp.asarray(mean), 0.0, 1.0)


def side_by_side(panels: dict[str, Array], gap: int = 2) -> Array:
  """{name: [B, H, W, 3] in [0, 1]} -> [B, H, k * W + (k - 1) * gap, 3], panels left to right,
  separated by white columns."""
  parts = []
  for i, x in enumerate(panels.values()):
    if i:
      parts.append(jnp.ones((*x.shape[:2], gap, x.shape[-1]), x.dtype))
    parts.append(x.astype(jnp.float32))
  return jnp.concatenate(parts, axis=2)
