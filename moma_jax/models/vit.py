"""Vision Transformer matching the MAE / MoCo v3 (timm) definition, in Flax linen.

Parameter names mirror the PyTorch state-dict names (``blocks.3.attn.qkv.weight`` is
``blocks_3/attn/qkv/kernel`` here), so conversion is a mechanical rename plus transposes.

The encoder can run on a subset of patches: given per-example indices of the visible patches it
gathers those patches *as pixels*, before the patch embedding, together with their position
embeddings, and runs the blocks on CLS + visible tokens only (MAE-style; the backward pass then has
no scatter).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moma_jax.models import posemb

Array = jax.Array
DType = Any

LN_EPS = 1e-6

# width, depth, heads. MLP ratio is 4 for every variant.
_VARIANTS: dict[str, tuple[int, int, int]] = {
  # Tiny variants for the embedded 32 px dataset (smaller -> larger, as S -> B -> L).
  'pico': (32, 2, 2),
  'mu': (64, 2, 2),
  'milli': (128, 4, 4),
  'Ti': (192, 12, 3),
  'S': (384, 12, 6),  # DeiT / timm ViT-S. MoCo v3's vit_small has 12 heads: use 'S12/16'.
  'S12': (384, 12, 12),
  'B': (768, 12, 12),
  'L': (1024, 24, 16),
  'H': (1280, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """Architecture hyper-parameters of a ViT, decoded from a variant string."""

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int

  def kwargs(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def decode_variant(variant: str) -> ViTSpec:
  """Decodes 'B/16', 'S12/16', 'H/14', 'mu/4', ... into a :class:`ViTSpec`.

  The part before '/' names the size (one of pico, mu, milli, Ti, S, S12, B, L, H), the part after
  is the patch size in pixels.
  """
  m = re.fullmatch(r'([A-Za-z]+\d*)/(\d+)', variant)
  if not m or m.group(1) not in _VARIANTS:
    raise ValueError(
      f'unknown ViT variant {variant!r}: expected SIZE/PATCH with SIZE one of '
      f'{", ".join(_VARIANTS)} and PATCH an integer, e.g. "B/16"'
    )
  width, depth, heads = _VARIANTS[m.group(1)]
  return ViTSpec(width, depth, heads, 4 * width, int(m.group(2)))


def name_variant(width: int, depth: int, num_heads: int, patch_size: int) -> str | None:
  """Inverse of :func:`decode_variant`; None for non-standard shapes."""
  for name, spec in _VARIANTS.items():
    if spec == (width, depth, num_heads):
      return f'{name}/{patch_size}'
  return None


def patchify(images: Array, patch_size: int) -> Array:
  """[B, H, W, C] -> [B, N, p*p*C], patches in row-major order, pixels (row, col, channel)."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'image size {h}x{w} is not a multiple of the patch size {p}')
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Array, patch_size: int, grid: tuple[int, int], channels: int = 3) -> Array:
  """[B, N, p*p*C] -> [B, H, W, C]; inverse of :func:`patchify`."""
  b = patches.shape[0]
  gh, gw = grid
  p = patch_size
  x = patches.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


def gather_tokens(x: Array, idx: Array) -> Array:
  """x [B, N, D], idx [B, n] -> [B, n, D]: per-example selection along the token axis."""
  return jnp.take_along_axis(x, idx[..., None], axis=1)


class PatchProjection(nn.Module):
  """The patch-embedding conv as a matmul on already-extracted patches.

  The kernel keeps the conv layout (p, p, C, D) so checkpoints map 1:1, but it is applied to
  patches gathered beforehand: [B, n, p*p*C] -> [B, n, D].
  """

  width: int
  patch_size: int
  channels: int = 3
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, patches: Array) -> Array:
    p, c = self.patch_size, self.channels
    # Same init as a PyTorch Conv2d / MAE's xavier on the flattened kernel.
    kernel = self.param(
      'kernel', nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3), (p, p, c, self.width)
    )
    bias = self.param('bias', nn.initializers.zeros, (self.width,))
    kernel = kernel.reshape(p * p * c, self.width).astype(self.dtype)
    return jnp.dot(patches.astype(self.dtype), kernel) + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  width: int
  patch_size: int
  channels: int = 3
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, patches: Array) -> Array:
    return PatchProjection(self.width, self.patch_size, self.channels, self.dtype, name='proj')(
      patches
    )


def _dense(features: int, dtype: DType, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=nn.initializers.xavier_uniform(),
    name=name,
  )


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (rows stacked [q; k; v])."""

  num_heads: int
  dtype: DType = jnp.float32
  implementation: str | None = None  # None lets XLA pick; 'cudnn' for the fused GPU kernel.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'width {d} is not divisible by num_heads {self.num_heads}')
    qkv = _dense(3 * d, self.dtype, 'qkv')(x)
    qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]
    # Default scale is head_dim ** -0.5, as in timm.
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    return _dense(d, self.dtype, 'proj')(out.reshape(b, t, d))


class Mlp(nn.Module):
  hidden: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    x = _dense(self.hidden, self.dtype, 'fc1')(x)
    x = nn.gelu(x, approximate=False)  # PyTorch's nn.GELU is the exact erf form.
    return _dense(d, self.dtype, 'fc2')(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)); with drop path."""

  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: DType = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    # Stochastic depth: drop the whole residual branch per example, rescaled (timm's DropPath).
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm1')(x)
    y = Attention(self.num_heads, self.dtype, self.attention_impl, name='attn')(y)
    x = x + drop(y)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm2')(x)
    y = Mlp(self.mlp_dim, self.dtype, name='mlp')(y)
    return x + drop(y)


class ViT(nn.Module):
  """ViT encoder (+ optional classifier) with the timm / MAE / MoCo v3 parameter layout.

  Attributes:
    width, depth, num_heads, mlp_dim, patch_size: architecture.
    image_size: side of the square input in pixels; fixes the number of position embeddings.
    num_classes: 0 for no classifier head, else the size of ``head``.
    pool: 'cls' (final ``norm``, classify the CLS token) or 'gap' (MAE fine-tuning: mean of the
      patch tokens, then ``fc_norm``; no final ``norm``).
    drop_path: maximum stochastic-depth rate, linearly increasing over blocks.
    dtype: compute dtype of matmuls (parameters stay float32).
    attention_impl: passed to ``jax.nn.dot_product_attention`` (None, 'xla' or 'cudnn').
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int = 224
  channels: int = 3
  num_classes: int = 0
  pool: str = 'cls'
  drop_path: float = 0.0
  dtype: DType = jnp.float32
  attention_impl: str | None = None

  @property
  def grid(self) -> tuple[int, int]:
    return (self.image_size // self.patch_size,) * 2

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @nn.compact
  def __call__(
    self, images: Array, visible_idx: Array | None = None, *, train: bool = False
  ) -> tuple[Array, dict[str, Array]]:
    """Encodes images, optionally only a subset of their patches.

    Args:
      images: [B, H, W, C] float, already normalised (ImageNet mean/std).
      visible_idx: optional [B, n] int indices in [0, N) of the patches to encode (N patches in
        row-major order). None encodes all N patches.
      train: enables drop path.

    Returns:
      (out, aux): ``out`` is the logits [B, num_classes] when there is a head, else the encoded
      tokens [B, 1 + n, D] (CLS first). ``aux`` holds 'block_i' (residual stream after block i,
      [B, 1 + n, D]), 'encoded' (tokens after the final norm; for 'gap' models the un-normed
      tokens), and 'pre_logits' [B, D] when pooled.
    """
    if self.pool not in ('cls', 'gap'):
      raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}")
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
        f'expected {self.image_size}x{self.image_size} images, got {images.shape[1]}x'
        f'{images.shape[2]}; convert the checkpoint with --image-size to resample its '
        'position embeddings'
      )
    b = images.shape[0]
    patches = patchify(images, self.patch_size)  # [B, N, p*p*C]
    pos_embed = self.param(
      'pos_embed',
      lambda *_: jnp.asarray(posemb.sincos_2d_mae(self.width, self.grid[0], cls_token=True))[None],
    )  # [1, 1 + N, D], fixed sin-cos, stored with the parameters.
    cls_token = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, self.width))
    patch_pos = jnp.broadcast_to(pos_embed[:, 1:], (b, self.num_patches, self.width))
    if visible_idx is not None:
      patches = gather_tokens(patches, visible_idx)
      patch_pos = gather_tokens(patch_pos, visible_idx)
    x = PatchEmbed(self.width, self.patch_size, self.channels, self.dtype, name='patch_embed')(
      patches
    )
    x = x + patch_pos.astype(x.dtype)
    cls = jnp.broadcast_to((cls_token + pos_embed[:, :1]).astype(x.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)

    aux: dict[str, Array] = {}
    rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth else []
    for i in range(self.depth):
      x = Block(
        self.num_heads,
        self.mlp_dim,
        float(rates[i]),
        self.dtype,
        self.attention_impl,
        name=f'blocks_{i}',
      )(x, train=train)
      aux[f'block_{i}'] = x

    if self.pool == 'cls':
      x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm')(x)
      aux['encoded'] = x
      if not self.num_classes:
        return x, aux
      pre_logits = x[:, 0]
    else:
      aux['encoded'] = x
      pre_logits = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='fc_norm')(
        x[:, 1:].mean(axis=1)
      )
    aux['pre_logits'] = pre_logits
    if not self.num_classes:
      return pre_logits, aux
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      kernel_init=nn.initializers.truncated_normal(2e-5),
      name='head',
    )(pre_logits)
    return logits, aux
