"""Recognising the official checkpoint formats and splitting them into components.

Formats (the ``--format`` names):
  mae_pretrain   MAE encoder-only release, ``{'model': state_dict}`` (mae_pretrain_vit_*.pth)
  mae_full       MAE with its decoder (``*_full.pth``, ``mae_visualize_vit_*.pth``)
  mae_finetuned  MAE fine-tuned: ``fc_norm`` + ``head``, global pooling, no final ``norm``
  mocov3         MoCo v3 ``.pth.tar``: ``state_dict`` with ``module.base_encoder.`` etc.
  timm           a plain timm / DeiT ViT state dict (``.pth`` or ``.safetensors``), any head
  torchvision    a plain torchvision ResNet state dict (``conv1``, ``bn1``, ``layer1.0...``), with or
                 without ``fc`` (DINO's released ResNet-50 backbone has none)
  dino           DINO's training checkpoint: ``teacher`` / ``student`` state dicts with ``backbone.``
                 and ``head.`` under an optional ``module.`` (DDP) prefix; the teacher by default
  mokd           MOKD's checkpoint: ``teacher_vit`` / ``teacher_cnn`` / ``student_vit`` /
                 ``student_cnn``, each as DINO's plus ``transhead.``; ``teacher_vit`` by default
Every format yields a timm- or torchvision-named encoder state dict plus optional head state dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from convert import torch_format
from convert.errors import ConvertError
from moma_jax import storage

FORMATS = (
  'mae_pretrain',
  'mae_full',
  'mae_finetuned',
  'mocov3',
  'timm',
  'torchvision',
  'dino',
  'mokd',
)
DINO_KEYS = ('teacher', 'student')
MOKD_KEYS = ('teacher_vit', 'teacher_cnn', 'student_vit', 'student_cnn')
StateDict = dict[str, np.ndarray]

_MOCO_PREFIXES = {
  'base_encoder.': 'encoder',
  'momentum_encoder.': 'momentum_encoder',
  'predictor.': 'predictor',
}
# MoCo v3 architectures (its 'arch' entry) -> heads; its vit_small has 12 heads, not timm's 6.
MOCO_ARCH_HEADS = {'vit_small': 12, 'vit_base': 12}


@dataclasses.dataclass
class Split:
  """A checkpoint taken apart: timm-named state dicts per component."""

  format: str
  components: dict[str, StateDict]  # 'encoder' always; 'decoder', 'projector', ... if present
  info: dict[str, Any]  # extra facts for the metadata (MoCo arch, MAE epoch, ...)


def read_file(path: str) -> Any:
  """Reads a PyTorch zip checkpoint or a safetensors file, by content (not by file name)."""
  p = storage.Path(path)
  if not p.is_file():
    raise ConvertError(f'no such checkpoint file: {path}')
  with p.open('rb') as f:
    head = f.read(9)
  if len(head) == 9 and head[8:9] == b'{' and not head.startswith(b'PK'):
    return _read_safetensors(p, path)
  return torch_format.load(path)


SAFETENSORS_HEADS = 'moma_jax.num_heads'  # metadata key of the safetensors files we export


def _read_safetensors(p: Any, path: str) -> Any:
  """A safetensors file's state dict; one this project exported (its head count in the metadata)
  comes back as our own .pth export does, {'model': state, 'moma_jax': {'num_heads': H}}."""
  import json
  import struct

  from safetensors import SafetensorError
  from safetensors.numpy import load, load_file

  try:  # local files are memory-mapped; remote ones read whole
    state = load(p.read_bytes()) if storage.is_remote(path) else load_file(path)
    with p.open('rb') as f:  # the header: 8-byte length, then JSON with '__metadata__'
      (n,) = struct.unpack('<Q', f.read(8))
      meta = json.loads(f.read(n)).get('__metadata__') or {}
  except (SafetensorError, ValueError, OSError, struct.error) as e:
    raise ConvertError(f'{path} is a corrupt safetensors file: {e}') from None
  if SAFETENSORS_HEADS in meta:
    return {'model': state, 'moma_jax': {'num_heads': int(meta[SAFETENSORS_HEADS])}}
  return state


def _is_state_dict(obj: Any) -> bool:
  return (
    isinstance(obj, dict)
    and bool(obj)
    and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
  )


def _strip(state: StateDict, prefix: str) -> StateDict:
  return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _split_mocov3(obj: dict) -> Split:
  state = obj.get('state_dict')
  if not _is_state_dict(state):
    raise ConvertError("not a MoCo v3 checkpoint: no 'state_dict' of tensors")
  if all(k.startswith('module.') for k in state):
    state = _strip(state, 'module.')
  comps: dict[str, StateDict] = {}
  for prefix, name in _MOCO_PREFIXES.items():
    part = _strip(state, prefix)
    if part:
      comps[name] = part
  if 'encoder' not in comps:
    raise ConvertError(
      "not a MoCo v3 checkpoint: no 'module.base_encoder.' parameters "
      f'(first keys: {", ".join(list(state)[:5])})'
    )
  for enc in ('encoder', 'momentum_encoder'):
    head = _strip(comps.get(enc, {}), 'head.')
    if head:
      comps[enc] = {k: v for k, v in comps[enc].items() if not k.startswith('head.')}
      comps['projector' if enc == 'encoder' else 'momentum_projector'] = head
  info = {k: obj[k] for k in ('arch', 'epoch') if isinstance(obj.get(k), (str, int))}
  return Split('mocov3', comps, {**info, **_our_info(obj)})


def _our_info(obj: dict) -> dict[str, Any]:
  """Facts our own exports add under 'moma_jax' (e.g. num_heads, invisible in the weights)."""
  ours = obj.get('moma_jax')
  if isinstance(ours, dict) and isinstance(ours.get('num_heads'), int):
    return {'num_heads': ours['num_heads']}
  return {}


def is_resnet(state: StateDict) -> bool:
  """A torchvision-layout ResNet state dict (stem conv + layer1)."""
  return 'conv1.weight' in state and any(k.startswith('layer1.0.') for k in state)


def _split_dino(obj: dict, fmt: str, key: str | None) -> Split:
  """DINO / MOKD: one of the model state dicts, split into backbone and head."""
  keys = DINO_KEYS if fmt == 'dino' else MOKD_KEYS
  key = key or keys[0]
  if key not in keys:
    raise ConvertError(f'--checkpoint-key {key!r} for a {fmt} checkpoint; one of {", ".join(keys)}')
  state = obj.get(key)
  if not _is_state_dict(state):
    present = [k for k in keys if _is_state_dict(obj.get(k))]
    raise ConvertError(
      f'not a {fmt} checkpoint with {key!r}: it holds {", ".join(present) or "none"} of '
      f'{", ".join(keys)}'
    )
  if all(k.startswith('module.') for k in state):
    state = _strip(state, 'module.')
  comps: dict[str, StateDict] = {}
  if any(k.startswith('backbone.') for k in state):
    comps['encoder'] = _strip(state, 'backbone.')
    if any(k.startswith('head.') for k in state):
      comps['head'] = _strip(state, 'head.')
    if any(k.startswith('transhead.') for k in state):
      comps['search_head'] = _strip(state, 'transhead.')
  else:  # a backbone alone
    comps['encoder'] = state
  if fmt == 'dino' or is_resnet(comps['encoder']):  # DINO / torchvision: no fc on the backbone
    comps['encoder'] = {k: v for k, v in comps['encoder'].items() if not k.startswith('fc.')}
  info: dict[str, Any] = {'checkpoint_key': key, **_our_info(obj)}
  for k in ('epoch', 'arch', 'arch_cnn', 'arch_vit'):
    if isinstance(obj.get(k), (str, int)):
      info[k] = obj[k]
  return Split(fmt, comps, info)


def split(obj: Any, fmt: str | None = None, checkpoint_key: str | None = None) -> Split:
  """Takes a loaded checkpoint apart. ``fmt`` forces a format; None detects it.
  ``checkpoint_key`` picks the model of a DINO / MOKD checkpoint."""
  if fmt is not None and fmt not in FORMATS:
    raise ConvertError(f'unknown --format {fmt!r}; choose one of {", ".join(FORMATS)}')
  if not isinstance(obj, dict):
    raise ConvertError(f'the checkpoint holds a {type(obj).__name__}, not a dict of tensors')
  if fmt in ('dino', 'mokd') or (
    fmt is None and not _is_state_dict(obj) and any(_is_state_dict(obj.get(k)) for k in DINO_KEYS)
  ):
    return _split_dino(obj, fmt or 'dino', checkpoint_key)
  if fmt is None and any(_is_state_dict(obj.get(k)) for k in MOKD_KEYS):
    return _split_dino(obj, 'mokd', checkpoint_key)
  state_dict = obj.get('state_dict')
  is_moco = isinstance(state_dict, dict) and any(
    k.startswith(('module.base_encoder.', 'base_encoder.')) for k in state_dict
  )
  if fmt == 'mocov3' or (fmt is None and is_moco):
    return _split_mocov3(obj)

  info: dict[str, Any] = _our_info(obj)
  if _is_state_dict(obj.get('model')):  # MAE (and DeiT) wrap the state dict in 'model'
    state = obj['model']
    if isinstance(obj.get('epoch'), int):
      info['epoch'] = obj['epoch']
  elif _is_state_dict(state_dict):
    state = state_dict
  elif _is_state_dict(obj):
    state = obj
  else:
    raise ConvertError(
      'no state dict found: expected a dict of tensors, or one under "model" or "state_dict" '
      f'(top-level keys: {", ".join(map(str, list(obj)[:8]))})'
    )
  if all(k.startswith('module.') for k in state):
    state = _strip(state, 'module.')
  decoder = {k: v for k, v in state.items() if k.startswith('decoder_') or k == 'mask_token'}
  encoder = {k: v for k, v in state.items() if k not in decoder}
  comps = {'encoder': encoder}
  if decoder:
    comps['decoder'] = decoder
  if fmt is None:
    if is_resnet(encoder):
      fmt = 'torchvision'
    elif decoder:
      fmt = 'mae_full'
    elif 'fc_norm.weight' in encoder and 'norm.weight' not in encoder:
      fmt = 'mae_finetuned'
    elif 'model' in obj and 'head.weight' not in encoder:
      fmt = 'mae_pretrain'
    else:
      fmt = 'timm'
  elif fmt == 'mae_full' and not decoder:
    raise ConvertError('--format mae_full, but the checkpoint has no decoder_* / mask_token keys')
  return Split(fmt, comps, info)
