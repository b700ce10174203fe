"""Heads that sit on an encoder: MAE's decoder, MoCo v3's BatchNorm MLPs, DINO's projection head
and MOKD's cross-attention search head (TransHead).

Parameter names mirror the PyTorch names (``decoder_blocks.0.attn.qkv`` is
``decoder_blocks_0/attn/qkv``; Sequential index ``3`` is ``layers_3``), so the converter maps them
mechanically.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


# --- DINO and MOKD heads ---------------------------------------------------------------------------


def dino_interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] 1-D bicubic resampling as DINO's ``interpolate_pos_encoding`` calls it:
  ``F.interpolate(scale_factor=(n_out + 0.1) / n_in, mode='bicubic')`` (align_corners=False,
  a = -0.75, edge taps clamped). The +0.1 changes the sampling positions slightly compared with a
  plain size-based resize (posemb.resample_grid), so DINO's numbers need this one."""
  scale = n_in / (n_out + 0.1)  # PyTorch uses 1 / scale_factor when a scale factor is given
  x = (np.arange(n_out) + 0.5) * scale - 0.5
  x0 = np.floor(x)
  w = posemb._cubic_weights(x - x0)
  m = np.zeros((n_out, n_in))
  for k, off in enumerate((-1, 0, 1, 2)):
    idx = np.clip(x0.astype(int) + off, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, k])
  return m


def resample_pos_grid(pos: Array, side: int) -> Array:
  """[1, g*g, D] learned grid of position embeddings -> [1, side*side, D] (DINO's bicubic, see
  :func:`dino_interpolation_matrix`); differentiable, identity when side == g."""
  g = int(round(pos.shape[1] ** 0.5))
  if g * g != pos.shape[1]:
    raise ValueError(f'{pos.shape[1]} position embeddings are not a square grid')
  if side == g:
    return pos
  m = jnp.asarray(dino_interpolation_matrix(g, side), pos.dtype)
  grid = pos.reshape(g, g, -1)
  out = jnp.einsum('ri,ijd,cj->rcd', m, grid, m, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(1, side * side, -1)


def _torch_linear_init(key, shape, dtype=jnp.float32):
  """PyTorch nn.Linear's default weight init, U(-1/sqrt(in), 1/sqrt(in)), for (out, in)."""
  bound = 1.0 / np.sqrt(shape[1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class WeightNormLinear(nn.Module):
  """``nn.utils.weight_norm(nn.Linear(in, out, bias=False))``: W = g * v / ||v|| (row norms).

  Parameters keep PyTorch's names and layouts, ``weight_g`` (out, 1) and ``weight_v`` (out, in),
  so they convert unchanged. ``weight_g`` starts at 1 (DINO); DINO's ``norm_last_layer`` freezes
  it (the objective's frozen pattern), which keeps every prototype unit-norm.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    g = self.param('weight_g', nn.initializers.ones, (self.features, 1))
    v = self.param('weight_v', _torch_linear_init, (self.features, x.shape[-1]))
    w = g * v / jnp.linalg.norm(v, axis=1, keepdims=True)
    return jnp.dot(x.astype(self.dtype), w.T.astype(self.dtype))


_TRUNC_02 = nn.initializers.truncated_normal(0.02)


class DinoHead(nn.Module):
  """DINO's projection head: MLP (Linear-GELU x (L - 1), Linear to the bottleneck) -> L2
  normalise -> weight-normed Linear to ``out_dim`` prototypes.

  Names follow PyTorch (``mlp.0``, ``mlp.2``, ``mlp.4``, ``last_layer.weight_g/_v``); with one
  layer the MLP is the single Linear ``mlp``. DINO's ``use_bn`` option (off in DINO's and MOKD's
  defaults) is not implemented.
  """

  out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B, D] -> logits [B, out_dim] (before any temperature)."""
    dense = lambda n, name: nn.Dense(  # noqa: E731
      n, dtype=self.dtype, kernel_init=_TRUNC_02, name=name
    )
    if self.num_layers == 1:
      x = dense(self.bottleneck_dim, 'mlp')(x)
    else:
      idx = 0
      for _ in range(self.num_layers - 1):
        x = nn.gelu(dense(self.hidden_dim, f'mlp_{idx}')(x), approximate=False)
        idx += 2
      x = dense(self.bottleneck_dim, f'mlp_{idx}')(x)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
    return WeightNormLinear(self.out_dim, self.dtype, name='last_layer')(x)


class TransHead(nn.Module):
  """MOKD's cross-attention feature search head (``THead_CNN`` / ``THead_ViT``).

  Tokens (+ learned position embeddings, bicubically resized for other grid sizes) go through
  ``depth`` pre-norm self-attention blocks and a final LayerNorm; an optional query token from
  the other model is prepended before the blocks (without a position embedding) and dropped
  after them; the patch tokens are mean-pooled and projected by a weight-normed Linear.

  Attributes:
    out_dim: prototypes of the last layer.
    grid: side of the position-embedding grid (7 for a ResNet-50 at 224 px, 14 for a ViT/16).
    width, depth, num_heads, mlp_ratio: the blocks (MOKD: 384, 3, 6, 4).
    in_channels: > 0 for the CNN head: a 1x1 conv ``patch_embed`` (with bias) maps the
      [B, h, w, in_channels] feature map to ``width`` first; 0 for the ViT head (tokens in).
  """

  out_dim: int
  grid: int
  width: int = 384
  depth: int = 3
  num_heads: int = 6
  mlp_ratio: int = 4
  in_channels: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, query: Array | None = None) -> tuple[Array, Array | None]:
    """CNN head: x [B, h, w, C] (h == w); ViT head: x [B, N, width] (N a square).
    query: optional [B, width]. Returns (logits [B, out_dim], pooled [B, width] or None): the
    CNN head also returns the spatial mean of its reduced map (MOKD's CNN feature for search)."""
    pooled = None
    if self.in_channels:
      x = nn.Conv(self.width, (1, 1), dtype=self.dtype, kernel_init=_TRUNC_02, name='patch_embed')(
        x
      )
      pooled = x.mean(axis=(1, 2))
      b, h, w, d = x.shape
      if h != w:
        raise ValueError(f'TransHead needs a square feature map, got {h}x{w}')
      x = x.reshape(b, h * w, d)
    side = int(round(x.shape[1] ** 0.5))
    if side * side != x.shape[1]:
      raise ValueError(f'TransHead needs a square grid of tokens, got {x.shape[1]}')
    pos = self.param('pos_embed', _TRUNC_02, (1, self.grid * self.grid, self.width))
    x = x + resample_pos_grid(pos, side).astype(x.dtype)
    if query is not None:
      x = jnp.concatenate([query[:, None].astype(x.dtype), x], axis=1)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio * self.width, dtype=self.dtype, name=f'blocks_{i}')(
        x
      )
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm')(x)
    if query is not None:
      x = x[:, 1:]
    return WeightNormLinear(self.out_dim, self.dtype, name='last_layer')(x.mean(axis=1)), pooled
