"""Fixed 2-D sin-cos position embeddings and their resampling to another grid.

Two layouts exist in the wild and checkpoints store theirs, so converted models load the stored
table rather than recomputing it:
  * MAE:     [sin, cos](column) then [sin, cos](row)
  * MoCo v3: [sin, cos](row) then [sin, cos](column)
Both put an all-zero row in front for the CLS token.
"""

from __future__ import annotations

import numpy as np


def _sincos_1d(dim: int, pos: np.ndarray, temperature: float = 10000.0) -> np.ndarray:
  """pos [M] -> [M, dim]: [sin(pos * w), cos(pos * w)] with w = temperature ** -(i / (dim/2))."""
  if dim % 2:
    raise ValueError(f'sin-cos embedding needs an even dimension, got {dim}')
  omega = 1.0 / temperature ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum('m,d->md', pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _sincos_2d(width: int, grid: int, first: str, cls_token: bool) -> np.ndarray:
  if width % 4:
    raise ValueError(f'2-D sin-cos embedding needs a width divisible by 4, got {width}')
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  rows, cols = rows.reshape(-1), cols.reshape(-1)  # row-major token order
  a, b = (cols, rows) if first == 'col' else (rows, cols)
  emb = np.concatenate([_sincos_1d(width // 2, a), _sincos_1d(width // 2, b)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, width)), emb], axis=0)
  return emb.astype(np.float32)


def sincos_2d_mae(width: int, grid: int, cls_token: bool = True) -> np.ndarray:
  """MAE's table: [(1 +) grid*grid, width], column frequencies first."""
  return _sincos_2d(width, grid, 'col', cls_token)


def sincos_2d_moco(width: int, grid: int, cls_token: bool = True) -> np.ndarray:
  """MoCo v3's table: [(1 +) grid*grid, width], row frequencies first."""
  return _sincos_2d(width, grid, 'row', cls_token)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 from floor(x)."""
  d = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)
  w = np.where(
    d <= 1.0,
    ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0,
    ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a,
  )
  return w


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of 1-D bicubic resampling, align_corners=False, edges clamped."""
  scale = n_in / n_out
  x = (np.arange(n_out) + 0.5) * scale - 0.5
  x0 = np.floor(x)
  w = _cubic_weights(x - x0)
  m = np.zeros((n_out, n_in))
  for k, off in enumerate((-1, 0, 1, 2)):
    idx = np.clip(x0.astype(int) + off, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, k])
  return m


def resample_grid(pos_embed: np.ndarray, new_grid: int, num_prefix: int = 1) -> np.ndarray:
  """Resamples a [1, prefix + g*g, D] position table to [1, prefix + new_grid**2, D].

  Bicubic with a = -0.75 and align_corners=False: the same numbers as timm's
  ``resample_abs_pos_embed`` (torch.nn.functional.interpolate, mode='bicubic'). The prefix
  (CLS) rows are kept apart, unchanged. Written in NumPy because it runs once at conversion time
  and must match PyTorch's kernel (jax.image.resize uses a = -0.5).
  """
  prefix, grid_tokens = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
  old = int(round(np.sqrt(grid_tokens.shape[1])))
  if old * old != grid_tokens.shape[1]:
    raise ValueError(f'position table has {grid_tokens.shape[1]} patch rows: not a square grid')
  if old == new_grid:
    return pos_embed
  m = _bicubic_matrix(old, new_grid)
  g = grid_tokens.reshape(old, old, -1).astype(np.float64)
  g = np.einsum('ri,ijd,cj->rcd', m, g, m)
  out = g.reshape(1, new_grid * new_grid, -1).astype(pos_embed.dtype)
  return np.concatenate([prefix, out], axis=1)
