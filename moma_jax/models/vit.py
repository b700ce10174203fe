"""Vision Transformer matching the MAE / MoCo v3 (timm) definition, in Flax linen.

Parameter names mirror the PyTorch state-dict names (``blocks.3.attn.qkv.weight`` is
``blocks_3/attn/qkv/kernel`` here), so conversion is a mechanical rename plus transposes.

The encoder can run on a subset of patches: given per-example indices of the visible patches it
gathers those patches *as pixels*, before the patch embedding, together with their position
embeddings, and runs the blocks on CLS + visible tokens only (MAE-style; the backward pass then has
no scatter).

Memory and compile time for deep models (L/16, H/14): ``remat='block'`` rematerialises each block
in the backward pass, ``scan_blocks=True`` runs the blocks as one ``nn.scan`` over stacked
parameters (``blocks/...`` with a leading depth axis). The unscanned layout
(``blocks_0 ... blocks_{depth-1}``) stays the canonical one of conversion and checkpoints:
:func:`stack_block_params` / :func:`unstack_block_params` move between the two.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moma_jax.models import posemb, variants

Array = jax.Array
DType = Any

LN_EPS = 1e-6

# Variant names live in a JAX-free module (the command line validates them before JAX starts).
_VARIANTS = variants.VARIANTS
ViTSpec = variants.ViTSpec
decode_variant = variants.decode_variant
name_variant = variants.name_variant


POOLS = variants.POOLS


def pool_tokens(tokens: jax.Array, pool: str = 'cls') -> jax.Array:
  """Encoded tokens [B, 1 + n, D] (CLS first) -> features: 'cls' [B, D] (the CLS token), 'mean'
  [B, D] (mean of the patch tokens), 'cls+mean' [B, 2D] (both, concatenated: for encoders trained
  MAE-style, whose CLS token gets no training signal)."""
  if pool == 'cls':
    return tokens[:, 0]
  if pool == 'mean':
    return tokens[:, 1:].mean(axis=1)
  if pool == 'cls+mean':
    return jnp.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)
  raise ValueError(f'features must be one of {", ".join(POOLS)}, not {pool!r}')


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


def tpu_flash_attention(q: Array, k: Array, v: Array) -> Array:
  """Softmax attention [B, T, H, D] x3 -> [B, T, H, D] through JAX's Pallas TPU flash-attention
  kernel (jax.experimental.pallas.ops.tpu), which never writes the [B, H, T, T] scores to HBM."""
  heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  return heads_first(_flash_heads_first(heads_first(q), heads_first(k), heads_first(v)))


def _flash_heads_first(q: Array, k: Array, v: Array, length: int | None = None) -> Array:
  """tpu_flash_attention on [B, H, T, D] (the kernel's own layout); ``length``: the real tokens
  when q, k, v come already padded (the rest are padding, kept off every real query).

  Why: XLA's attention on a TPU writes the [B, H, T, T] scores to HBM, in float32 for the
  softmax. The kernel wants sequence blocks of 128: T is padded to a multiple of 128 and segment
  ids keep the real queries off the padded keys (the padded queries' rows are dropped).
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as fa

  t, d = q.shape[2], q.shape[3]
  length = t if length is None else length
  padded = _flash_length(t)

  def kernel(q, k, v):
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, padded - t), (0, 0)))  # noqa: E731
    segments = jnp.broadcast_to((jnp.arange(padded) < length).astype(jnp.int32),
                                (q.shape[0], padded))  # fmt: skip
    out = fa.flash_attention(
      pad(q), pad(k), pad(v), segment_ids=fa.SegmentIds(segments, segments), sm_scale=d**-0.5
    )
    return out[:, :, :t]

  # A Pallas kernel is not partitioned by XLA: under a mesh (jax.set_mesh, as the trainer and the
  # planner trace), each device runs it on its part of the batch, split over every mesh axis.
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v)
  spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
    q, k, v
  )


def _flash_length(t: int) -> int:
  """The flash kernel's sequence length: a multiple of its 128-token blocks."""
  return -(-t // 128) * 128


class _HeadsIn(nn.Module):
  """The fused qkv projection (a Dense of width 3 d, rows stacked [q; k; v]: the same parameters
  as nn.Dense, named 'qkv') computed as three projections straight into the attention's layout:
  no [B, T, 3 d] tensor to slice and re-lay out (two full copies per block on a TPU)."""

  num_heads: int
  dtype: DType
  heads_first: bool  # [B, H, T, hd] (the flash kernel's layout), else [B, T, H, hd]

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    d = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.xavier_uniform(), (d, 3 * d), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (3 * d,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    hd = d // self.num_heads
    kernel = kernel.reshape(d, 3, self.num_heads, hd)
    bias = bias.reshape(3, self.num_heads, hd)
    if self.heads_first:
      return tuple(
        jnp.einsum('btd,dhk->bhtk', x, kernel[:, i]) + bias[i][:, None, :] for i in range(3)
      )
    return tuple(jnp.einsum('btd,dhk->bthk', x, kernel[:, i]) + bias[i] for i in range(3))


class _HeadsOut(nn.Module):
  """The output projection (nn.Dense's parameters, named 'proj') straight from [B, H, T, hd]."""

  dtype: DType

  @nn.compact
  def __call__(self, out: Array) -> Array:
    h, hd = out.shape[1], out.shape[3]
    d = h * hd
    kernel = self.param('kernel', nn.initializers.xavier_uniform(), (d, d), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (d,), jnp.float32)
    out, kernel, bias = nn.dtypes.promote_dtype(out, kernel, bias, dtype=self.dtype)
    return jnp.einsum('bhtk,hkd->btd', out, kernel.reshape(h, hd, d)) + bias


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (rows stacked [q; k; v])."""

  num_heads: int
  dtype: DType = jnp.float32
  # None / 'xla': XLA's attention; 'cudnn': the fused GPU kernel; 'flash': the Pallas TPU kernel
  # (tpu_flash_attention; TPU only, or pltpu.force_tpu_interpret_mode() on a CPU).
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'width {d} is not divisible by num_heads {self.num_heads}')
    flash = self.implementation == 'flash'
    if flash:
      # The tokens padded to the kernel's length once, before the projections: q, k, v come out of
      # their matmuls in the kernel's shape and layout (bias fused), where padding each of them
      # after costs three pads and three layout copies per block. B/16 block, 512 images per
      # chip, bf16, v5e, by XLA's cost model: 10.8 -> 7.0 GB of HBM traffic, for +7% FLOPs (the
      # projections of the 59 padding rows).
      x = jnp.pad(x, ((0, 0), (0, _flash_length(t) - t), (0, 0)))
    q, k, v = _HeadsIn(self.num_heads, self.dtype, heads_first=flash, name='qkv')(x)
    if flash:
      return _HeadsOut(self.dtype, name='proj')(_flash_heads_first(q, k, v, t)[:, :, :t])
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
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)); with drop path.

  ``drop_rate`` (a traced scalar) overrides the static ``drop_path`` rate; the scanned ViT passes
  each block's rate this way, with ``drop_path`` > 0 saying that drop path is on at all.
  """

  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: DType = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False, drop_rate: Array | None = None) -> Array:
    # Stochastic depth: drop the whole residual branch per example, rescaled (timm's DropPath).
    if drop_rate is None:
      drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
    else:

      def drop(y):
        return self._drop_path(y, drop_rate, train)

    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm1')(x)
    y = Attention(self.num_heads, self.dtype, self.attention_impl, name='attn')(y)
    x = x + drop(y)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm2')(x)
    y = Mlp(self.mlp_dim, self.dtype, name='mlp')(y)
    return x + drop(y)

  def _drop_path(self, y: Array, rate: Array, train: bool) -> Array:
    """nn.Dropout(rate, broadcast_dims=(1, 2)) with a traced rate."""
    if not train or self.drop_path == 0.0:
      return y
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (y.shape[0], 1, 1))
    # The max() keeps the untaken branch finite (and its gradient NaN-free) at rate 1.
    return jnp.where(mask, y / jnp.maximum(keep, 1e-6).astype(y.dtype), jnp.zeros_like(y))


def _block_class(remat: str, policy: str) -> type[Block]:
  if remat == 'none':
    return Block
  if remat != 'block':
    raise ValueError(f"remat must be 'none' or 'block', got {remat!r}")
  if not hasattr(jax.checkpoint_policies, policy):
    raise ValueError(f'remat_policy {policy!r} is not in jax.checkpoint_policies')
  # static_argnums counts self: (self, x, train, drop_rate).
  return nn.remat(Block, policy=getattr(jax.checkpoint_policies, policy), static_argnums=(2,))


def _scan_body(block: Block, x: Array, rate: Array, train: bool) -> tuple[Array, Array]:
  x = block(x, train, rate)
  return x, x  # carry, and the per-block output stacked by the scan (aux['block_i'])


def stack_block_params(params: Mapping[str, Any], depth: int | None = None) -> dict[str, Any]:
  """Canonical ``blocks_0 ... blocks_{d-1}`` -> scanned ``blocks`` (leading axis of size d).

  ``params`` is a ViT's parameter dict or a variables dict ``{'params': ...}``; other entries pass
  through. ``depth`` (optional) is checked against the number of blocks found.
  """
  if 'params' in params and not any(k.startswith('blocks') for k in params):
    return {**params, 'params': stack_block_params(params['params'], depth)}
  found = sorted(int(k.split('_')[1]) for k in params if re.fullmatch(r'blocks_\d+', k))
  if found != list(range(len(found))) or (depth is not None and len(found) != depth):
    raise ValueError(
      f'expected blocks_0 ... blocks_{(depth or len(found)) - 1}, found {len(found)} blocks '
      f'({", ".join(f"blocks_{i}" for i in found[:4])}{", ..." if len(found) > 4 else ""})'
    )
  out = {k: v for k, v in params.items() if not re.fullmatch(r'blocks_\d+', k)}

  def stack(*xs):  # NumPy stays on the host (a checkpoint being loaded), arrays on their devices
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in xs):  # a plan's shapes
      return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
    return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)

  out['blocks'] = jax.tree.map(stack, *[params[f'blocks_{i}'] for i in found])
  return out


def unstack_block_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned ``blocks`` (leading depth axis) -> canonical ``blocks_0 ... blocks_{d-1}``."""
  if 'params' in params and 'blocks' not in params:
    return {**params, 'params': unstack_block_params(params['params'])}
  if 'blocks' not in params:
    raise ValueError(f'no scanned blocks in params (keys: {", ".join(params)})')
  depth = jax.tree.leaves(params['blocks'])[0].shape[0]
  out = {k: v for k, v in params.items() if k != 'blocks'}
  for i in range(depth):
    out[f'blocks_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['blocks'])
  return out


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
    attention_impl: None / 'xla' (XLA's attention), 'cudnn' (GPU) or 'flash' (the Pallas TPU
      kernel, tpu_flash_attention).
    remat: 'none', or 'block' to recompute each block's activations in the backward pass
      (``nn.remat``; only the block inputs are kept, under ``remat_policy``).
    remat_policy: name of a ``jax.checkpoint_policies`` entry; the default 'nothing_saveable'
      saves the most memory (one extra block forward in the backward pass);
      'dots_with_no_batch_dims_saveable' keeps the matmul outputs instead.
    scan_blocks: run the blocks as one ``nn.scan`` over stacked parameters ``blocks/...`` with a
      leading depth axis (one compiled block: faster compiles for L/H). Parameters differ in
      layout only: :func:`stack_block_params` / :func:`unstack_block_params` convert from / to
      the canonical ``blocks_i`` layout. Outputs and ``aux['block_i']`` are the same (the scan
      stacks every block's output; under jit, outputs nobody reads are dropped, so a frozen
      teacher keeps no per-block copies); drop path draws different (equally distributed) masks.
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
  remat: str = 'none'
  remat_policy: str = 'nothing_saveable'
  scan_blocks: bool = False

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
    pos_embed = self.param(
      'pos_embed',
      lambda *_: jnp.asarray(posemb.sincos_2d_mae(self.width, self.grid[0], cls_token=True))[None],
    )  # [1, 1 + N, D], fixed sin-cos, stored with the parameters.
    cls_token = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, self.width))
    if visible_idx is None:
      patches = patchify(images, self.patch_size)  # [B, N, p*p*C]
      patch_pos = pos_embed[:, 1:]  # [1, N, D], broadcast in the sum
    else:  # only the visible patches, and their positions taken from the table itself (a copy
      # broadcast to [B, N, D] first was 0.6 GB of HBM traffic per moco_to_mae step on a v5e-8)
      patches = gather_tokens(patchify(images, self.patch_size), visible_idx)
      patch_pos = jnp.take(pos_embed[0, 1:], visible_idx, axis=0)  # [B, n, D]
    x = PatchEmbed(self.width, self.patch_size, self.channels, self.dtype, name='patch_embed')(
      patches
    )
    x = x + patch_pos.astype(x.dtype)
    cls = jnp.broadcast_to((cls_token + pos_embed[:, :1]).astype(x.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)

    aux: dict[str, Array] = {}
    rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth else np.zeros(0)
    block_cls = _block_class(self.remat, self.remat_policy)
    if self.scan_blocks and self.depth:
      scan = nn.scan(
        functools.partial(_scan_body, train=train),
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        length=self.depth,
      )
      block = block_cls(
        self.num_heads, self.mlp_dim, self.drop_path, self.dtype, self.attention_impl,
        name='blocks',
      )  # fmt: skip
      x, per_block = scan(block, x, jnp.asarray(rates, jnp.float32))
      for i in range(self.depth):
        aux[f'block_{i}'] = per_block[i]
    else:
      for i in range(self.depth):
        x = block_cls(
          self.num_heads,
          self.mlp_dim,
          float(rates[i]),
          self.dtype,
          self.attention_impl,
          name=f'blocks_{i}',
        )(x, train)
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
