"""Heads that sit on a ViT encoder: MAE's decoder and MoCo v3's BatchNorm MLPs.

Parameter names mirror the PyTorch names (``decoder_blocks.0.attn.qkv`` is
``decoder_blocks_0/attn/qkv``; Sequential index ``3`` is ``layers_3``), so the converter maps them
mechanically.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma_jax.models import posemb
from moma_jax.models.vit import LN_EPS, Block

Array = jax.Array


class MaeDecoder(nn.Module):
  """MAE's decoder: fills masked positions with a mask token and predicts their pixels.

  Attributes:
    num_patches: N, patches per image (a square grid).
    patch_pixels: p * p * C, pixels predicted per patch.
    width, depth, num_heads: decoder transformer (MAE: 512, 8, 16).
  """

  num_patches: int
  patch_pixels: int
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encoded: Array, visible_idx: Array) -> Array:
    """encoded [B, 1 + n, D] (CLS first), visible_idx [B, n] -> predictions [B, N, patch_pixels]."""
    b, n = visible_idx.shape
    grid = int(round(self.num_patches**0.5))
    x = nn.Dense(self.width, dtype=self.dtype, name='decoder_embed')(encoded)
    mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.width))
    pos_embed = self.param(
      'decoder_pos_embed',
      lambda *_: jnp.asarray(posemb.sincos_2d_mae(self.width, grid, cls_token=True))[None],
    )
    # Un-shuffle: every position starts as the mask token; visible ones get their encoding back.
    full = jnp.broadcast_to(mask_token.astype(x.dtype), (b, self.num_patches, self.width))
    full = full.at[jnp.arange(b)[:, None], visible_idx].set(x[:, 1:])
    x = jnp.concatenate([x[:, :1], full], axis=1) + pos_embed.astype(x.dtype)
    for i in range(self.depth):
      x = Block(
        self.num_heads, self.mlp_ratio * self.width, dtype=self.dtype, name=f'decoder_blocks_{i}'
      )(x)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='decoder_norm')(x)
    x = nn.Dense(self.patch_pixels, dtype=self.dtype, name='decoder_pred')(x)
    return x[:, 1:]


class MlpHead(nn.Module):
  """MoCo v3's projector / predictor: (Linear -> BN -> ReLU) x (L - 1) -> Linear [-> BN].

  Linear layers have no bias; the last BatchNorm (``last_bn``) has no affine parameters. Layer
  indices follow the PyTorch nn.Sequential, where each ReLU takes an index too.

  Attributes:
    bn_axis_name: mesh / vmap axis over which BatchNorm statistics are averaged (SyncBN).
  """

  num_layers: int
  hidden_dim: int
  out_dim: int
  last_bn: bool = True
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x [B, D] -> [B, out_dim]. ``train`` uses batch statistics and updates the running ones."""
    idx = 0
    for layer in range(self.num_layers):
      last = layer == self.num_layers - 1
      x = nn.Dense(
        self.out_dim if last else self.hidden_dim,
        use_bias=False,
        dtype=self.dtype,
        name=f'layers_{idx}',
      )(x)
      idx += 1
      if not last or self.last_bn:
        x = nn.BatchNorm(
          use_running_average=not train,
          momentum=0.9,  # PyTorch momentum 0.1
          epsilon=1e-5,
          use_scale=not last,
          use_bias=not last,
          axis_name=self.bn_axis_name,
          dtype=self.dtype,
          name=f'layers_{idx}',
        )(x)
        idx += 1
      if not last:
        x = nn.relu(x)
        idx += 1
    return x
