"""Name and layout mapping between PyTorch state dicts and Flax variable trees.

The Flax modules use the PyTorch names (see moma_jax.models.vit), so the mapping is mechanical:
  * a numeric path component is merged into its parent: ``blocks.3`` <-> ``blocks_3``, and a
    leading one (an nn.Sequential index) becomes ``layers_<i>``;
  * Linear weight (out, in)        <-> Dense kernel (in, out)
  * Conv weight (O, I, kh, kw)     <-> kernel (kh, kw, I, O)
  * LayerNorm / BatchNorm weight   <-> scale
  * BatchNorm running_mean / _var  <-> batch_stats mean / var (num_batches_tracked is dropped and
    written back as 0)
  * any other leaf (cls_token, pos_embed, mask_token, ...) keeps its name and layout.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from flax import traverse_util

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]

_NUMBERED = re.compile(r'^(.*)_(\d+)$')


def _merge_numeric(parts: list[str]) -> list[str]:
  out: list[str] = []
  for p in parts:
    if p.isdigit():
      if out:
        out[-1] = f'{out[-1]}_{p}'
      else:
        out.append(f'layers_{p}')
    else:
      out.append(p)
  return out


def _split_numeric(name: str) -> str:
  m = _NUMBERED.match(name)
  if not m:
    return name
  return m.group(2) if m.group(1) == 'layers' else f'{m.group(1)}.{m.group(2)}'


def _set(tree: dict, path: list[str], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def torch_to_flax(state: StateDict) -> Variables:
  """PyTorch state dict -> {'params': ..., ['batch_stats': ...]} nested dicts of numpy arrays."""
  variables: Variables = {}
  for key, value in state.items():
    *mods, leaf = key.split('.')
    path = _merge_numeric(mods)
    value = np.asarray(value)
    if leaf == 'num_batches_tracked':
      continue
    if leaf in ('running_mean', 'running_var'):
      _set(variables, ['batch_stats', *path, 'mean' if leaf == 'running_mean' else 'var'], value)
      continue
    if leaf == 'weight':
      if value.ndim == 4:
        leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
      elif value.ndim == 2:
        leaf, value = 'kernel', value.T
      elif value.ndim == 1:
        leaf = 'scale'
      else:
        raise ValueError(f'{key}: cannot map a weight of shape {value.shape}')
    _set(variables, ['params', *path, leaf], np.ascontiguousarray(value))
  return variables


def flax_to_torch(variables: Variables) -> StateDict:
  """Inverse of :func:`torch_to_flax` (BatchNorm gets num_batches_tracked = 0).

  Transposed leaves are numpy views, not copies: writers make them contiguous as they write.
  """
  state: StateDict = {}
  for path, value in traverse_util.flatten_dict(variables.get('params', {})).items():
    *mods, leaf = path
    prefix = '.'.join(_split_numeric(m) for m in mods)
    value = np.asarray(value)
    if leaf == 'kernel':
      leaf = 'weight'
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    elif leaf == 'scale':
      leaf = 'weight'
    state[f'{prefix}.{leaf}' if prefix else leaf] = value
  for path, value in traverse_util.flatten_dict(variables.get('batch_stats', {})).items():
    *mods, leaf = path
    prefix = '.'.join(_split_numeric(m) for m in mods)
    state[f'{prefix}.running_{leaf}'] = np.asarray(value)
    state[f'{prefix}.num_batches_tracked'] = np.array(0, np.int64)
  return state
