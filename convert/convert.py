"""PyTorch checkpoint -> converted Flax directory, and a converted directory -> PyTorch / safetensors."""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from typing import Any

import jax
import numpy as np

from convert import formats, layouts, torch_format
from convert.errors import ConvertError
from moma_jax import storage
from moma_jax.models import posemb, pretrained, resnet, vit
from moma_jax.models.pretrained import ComponentSpec

# Heads by width when the checkpoint cannot say (heads are not visible in the weight shapes).
_DEFAULT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_MAE_DECODER_HEADS = 16
_REQUIRED_ENCODER_KEYS = ('cls_token', 'pos_embed', 'patch_embed.proj.weight')


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with storage.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _count(state: dict, pattern: str) -> int:
  return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def _describe(state: dict, keys) -> str:
  return ', '.join(f'{k} {tuple(state[k].shape)}' for k in keys)


def _encoder_spec(
  state: dict,
  split: formats.Split,
  *,
  variant: str | None,
  num_heads: int | None,
  image_size: int | None,
  what: str,
) -> tuple[ComponentSpec, list[str]]:
  """Infers the ViT's constructor kwargs from an encoder state dict. Returns (spec, notes)."""
  missing = [k for k in _REQUIRED_ENCODER_KEYS if k not in state]
  if missing:
    sample = sorted(state)[:12]
    raise ConvertError(
      f'{what} matches no known ViT format: missing {", ".join(missing)}; '
      f'it has {len(state)} keys, e.g. {_describe(state, sample)}'
    )
  notes = []
  width = state['cls_token'].shape[-1]
  depth = _count(state, r'blocks\.(\d+)\.')
  kernel = state['patch_embed.proj.weight']
  if kernel.ndim != 4 or kernel.shape[2] != kernel.shape[3]:
    raise ConvertError(
      f'{what}: patch_embed.proj.weight {kernel.shape} is not a square conv kernel'
    )
  patch, channels = kernel.shape[2], kernel.shape[1]
  fc1 = state.get('blocks.0.mlp.fc1.weight')
  mlp_dim = fc1.shape[0] if fc1 is not None else 4 * width  # a missing key is reported later
  grid = int(round((state['pos_embed'].shape[1] - 1) ** 0.5))
  if grid * grid + 1 != state['pos_embed'].shape[1]:
    raise ConvertError(
      f'{what}: pos_embed {state["pos_embed"].shape} is not CLS + a square grid of patches'
    )
  heads = num_heads
  if variant:
    try:
      v = vit.decode_variant(variant)
    except ValueError as e:
      raise ConvertError(str(e)) from None
    if (v.width, v.depth, v.patch_size) != (width, depth, patch):
      raise ConvertError(
        f'--variant {variant} is width {v.width}, depth {v.depth}, patch {v.patch_size}, '
        f'but the checkpoint has width {width}, depth {depth}, patch {patch}'
      )
    heads = heads or v.num_heads
  if heads is None:
    heads = split.info.get('num_heads')  # written by our own exporter
  if heads is None and split.format == 'mocov3':
    heads = formats.MOCO_ARCH_HEADS.get(split.info.get('arch'))
    if heads is None and width == 384:
      heads = 12
      notes.append('MoCo v3 checkpoint without a known arch: assuming vit_small with 12 heads')
  if heads is None:
    if width not in _DEFAULT_HEADS:
      raise ConvertError(
        f'{what}: cannot tell the number of heads of a width-{width} ViT from its weights; '
        'pass --num-heads (or --variant)'
      )
    heads = _DEFAULT_HEADS[width]
    if width == 384:
      notes.append(
        'width 384: assuming 6 heads (DeiT / timm ViT-S); pass --num-heads 12 for MoCo v3 vit_small'
      )
  if width % heads:
    raise ConvertError(f'width {width} is not divisible by --num-heads {heads}')
  kwargs: dict[str, Any] = dict(
    width=width,
    depth=depth,
    num_heads=heads,
    mlp_dim=mlp_dim,
    patch_size=patch,
    image_size=grid * patch,
    channels=channels,
    num_classes=state['head.weight'].shape[0] if 'head.weight' in state else 0,
    pool='gap' if 'fc_norm.weight' in state and 'norm.weight' not in state else 'cls',
  )
  if image_size and image_size != kwargs['image_size']:
    if image_size % patch:
      raise ConvertError(f'--image-size {image_size} is not a multiple of the patch size {patch}')
    notes.append(
      f'position embeddings resampled (bicubic) from {grid}x{grid} to '
      f'{image_size // patch}x{image_size // patch} patches'
    )
    kwargs['image_size'] = image_size
  return ComponentSpec('ViT', kwargs), notes


def _decoder_spec(state: dict, encoder: ComponentSpec) -> ComponentSpec:
  if 'decoder_embed.weight' not in state or 'decoder_pred.weight' not in state:
    raise ConvertError(
      'MAE decoder incomplete: need decoder_embed and decoder_pred; '
      f'found {", ".join(sorted(state)[:8])}'
    )
  width = state['decoder_embed.weight'].shape[0]
  kw = encoder.kwargs
  return ComponentSpec(
    'MaeDecoder',
    dict(
      num_patches=(kw['image_size'] // kw['patch_size']) ** 2,
      patch_pixels=state['decoder_pred.weight'].shape[0],
      width=width,
      depth=_count(state, r'decoder_blocks\.(\d+)\.'),
      num_heads=_MAE_DECODER_HEADS,
      mlp_ratio=state.get('decoder_blocks.0.mlp.fc1.weight', np.zeros((4 * width,))).shape[0]
      // width,
    ),
    input_dim=kw['width'],
  )


def _mlp_head_spec(state: dict, what: str) -> ComponentSpec:
  linear = sorted(
    int(k.split('.')[0]) for k, v in state.items() if k.endswith('.weight') and v.ndim == 2
  )
  if not linear:
    raise ConvertError(f'{what}: no linear layers found in {", ".join(sorted(state)[:6])}')
  first, last = state[f'{linear[0]}.weight'], state[f'{linear[-1]}.weight']
  return ComponentSpec(
    'MlpHead',
    dict(
      num_layers=len(linear),
      hidden_dim=first.shape[0],
      out_dim=last.shape[0],
      last_bn=f'{linear[-1] + 1}.running_mean' in state,
    ),
    input_dim=first.shape[1],
  )


def _resnet_spec(state: dict, what: str) -> tuple[ComponentSpec, list[str]]:
  """Infers a torchvision ResNet's constructor kwargs from its state dict."""
  stages = []
  while _count(state, rf'layer{len(stages) + 1}\.(\d+)\.'):
    stages.append(_count(state, rf'layer{len(stages) + 1}\.(\d+)\.'))
  stem = state['conv1.weight']
  if stem.ndim != 4 or stem.shape[2] not in (3, 7) or not stages:
    raise ConvertError(
      f'{what}: conv1.weight {tuple(stem.shape)} / {len(stages)} stages is not a torchvision ResNet'
    )
  width = stem.shape[0]
  block = 'bottleneck' if 'layer1.0.conv3.weight' in state else 'basic'
  planes = state['layer1.0.conv1.weight'].shape[0]
  if planes != width:
    raise ConvertError(
      f'{what}: layer1 is {planes} wide but the stem {width}: wide / grouped ResNets '
      '(width_per_group != 64) are not supported'
    )
  kwargs = dict(
    block=block, stage_sizes=stages, width=width, small_stem=stem.shape[2] == 3,
    num_classes=state['fc.weight'].shape[0] if 'fc.weight' in state else 0,
    channels=stem.shape[1],
  )  # fmt: skip
  return ComponentSpec('ResNet', kwargs), []


def _dino_head_spec(state: dict, what: str, input_dim: int) -> ComponentSpec:
  """DINO's head: mlp.0 / mlp.2 / ... (or a single mlp Linear) + last_layer.weight_g / _v."""
  if 'last_layer.weight_v' not in state:
    raise ConvertError(f'{what}: no last_layer.weight_v in {", ".join(sorted(state)[:6])}')
  linear = sorted(int(k.split('.')[1]) for k in state if re.fullmatch(r'mlp\.\d+\.weight', k))
  if 'mlp.weight' in state:
    layers, hidden, bottleneck = 1, 2048, state['mlp.weight'].shape[0]
  elif linear:
    layers = len(linear)
    hidden = state[f'mlp.{linear[0]}.weight'].shape[0]
    bottleneck = state[f'mlp.{linear[-1]}.weight'].shape[0]
    if any(k.startswith('mlp.') and 'running_mean' in k for k in state):
      raise ConvertError(f'{what}: a DINO head with BatchNorm (use_bn) is not supported')
  else:
    raise ConvertError(f'{what}: no mlp layers in {", ".join(sorted(state)[:6])}')
  return ComponentSpec(
    'DinoHead',
    dict(
      out_dim=state['last_layer.weight_v'].shape[0],
      hidden_dim=hidden,
      bottleneck_dim=bottleneck,
      num_layers=layers,
    ),
    input_dim=input_dim,
  )


def _expected_shapes(spec: ComponentSpec) -> dict[str, tuple[int, ...]]:
  """PyTorch key -> shape that ``spec``'s module needs (zero-stride views: nothing allocated)."""
  abstract = pretrained.abstract_variables(spec)
  empty = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)
  return {k: v.shape for k, v in layouts.flax_to_torch(empty).items()}


def _check_state(state: dict, spec: ComponentSpec, what: str) -> None:
  """One error listing every missing, unexpected and mis-shaped key, in PyTorch names."""
  expected = _expected_shapes(spec)
  actual = {k: tuple(v.shape) for k, v in state.items()}
  ignore = lambda k: k.endswith('num_batches_tracked')  # noqa: E731
  missing = [f'{k} {s}' for k, s in expected.items() if k not in actual and not ignore(k)]
  unexpected = [f'{k} {s}' for k, s in actual.items() if k not in expected and not ignore(k)]
  mismatch = [
    f'{k}: checkpoint {actual[k]} vs model {s}'
    for k, s in expected.items()
    if k in actual and actual[k] != s and not ignore(k)
  ]
  problems = [
    f'{label} ({len(items)}): {", ".join(items)}'
    for label, items in (('missing', missing), ('unexpected', unexpected), ('shape', mismatch))
    if items
  ]
  if problems:
    raise ConvertError(f'{what} does not match a {spec.module}: ' + '; '.join(problems))


def _resample(state: dict, key: str, image_size: int, patch: int) -> None:
  grid = image_size // patch
  if key in state and state[key].shape[1] != grid * grid + 1:
    state[key] = posemb.resample_grid(np.asarray(state[key], np.float32), grid).astype(
      state[key].dtype
    )


def convert_checkpoint(
  src: str,
  dst: str,
  *,
  fmt: str | None = None,
  variant: str | None = None,
  num_heads: int | None = None,
  image_size: int | None = None,
  momentum: bool = False,
  overwrite: bool = False,
  mean: tuple[float, ...] | None = None,
  std: tuple[float, ...] | None = None,
  checkpoint_key: str | None = None,
) -> dict[str, Any]:
  """Converts a PyTorch / safetensors checkpoint into a Flax checkpoint directory.

  ``checkpoint_key`` picks the model of a DINO ('teacher' / 'student') or MOKD ('teacher_vit',
  'teacher_cnn', ...) checkpoint; the teacher (the ViT's for MOKD) by default.

  ``mean`` / ``std`` are the input statistics the model was trained with (default ImageNet's;
  e.g. 0.5, 0.5, 0.5 for many timm / Google ViTs): recorded in the metadata, and every consumer
  (trainer, k-NN) normalises this model's inputs with them.

  Returns the metadata written. Raises ConvertError (one line) on any bad input, before writing.
  """
  dst = storage.resolve(dst)
  if dst.exists() and not overwrite:
    raise ConvertError(f'{dst} already exists; pass --overwrite to replace it')
  if storage.resolve(src) == dst:
    raise ConvertError('--src and --dst are the same path')
  norm = pretrained.Normalization(mean or pretrained.IMAGENET_MEAN, std or pretrained.IMAGENET_STD)
  obj = formats.read_file(src)
  split = formats.split(obj, fmt, checkpoint_key)
  enc_state = dict(split.components['encoder'])
  is_resnet = formats.is_resnet(enc_state)
  if is_resnet:
    if variant or num_heads or image_size:
      raise ConvertError(
        f'{src} holds a ResNet: --variant / --num-heads / --image-size are for ViTs'
      )
    enc_spec, notes = _resnet_spec(enc_state, src)
    size = patch = None
    feature_dim = resnet.ResNet(**enc_spec.kwargs).out_dim
  else:
    enc_spec, notes = _encoder_spec(
      enc_state, split, variant=variant, num_heads=num_heads, image_size=image_size, what=src
    )
    size, patch = enc_spec.kwargs['image_size'], enc_spec.kwargs['patch_size']
    feature_dim = enc_spec.kwargs['width']
  specs: dict[str, ComponentSpec] = {'encoder': enc_spec}
  states: dict[str, dict] = {'encoder': enc_state}
  for name, state in split.components.items():
    state = dict(state)
    if name == 'head':
      specs[name] = _dino_head_spec(state, f'{src} head', feature_dim)
    elif name == 'decoder':
      specs[name] = _decoder_spec(state, enc_spec)
    elif name in ('projector', 'predictor'):
      specs[name] = _mlp_head_spec(state, f'{src} {name}')
    elif name == 'momentum_encoder' and momentum:
      specs[name] = enc_spec
    elif name == 'momentum_projector' and momentum:
      specs[name] = _mlp_head_spec(state, f'{src} {name}')
    elif name == 'search_head':
      notes.append('transhead (MOKD search head) not converted')
      continue
    elif name != 'encoder':
      notes.append(f'{name} not converted (pass --momentum to keep it)')
      continue
    states[name] = state
  variables = {}
  for name, state in states.items():
    for key in ('pos_embed', 'decoder_pos_embed'):
      if not is_resnet:
        _resample(state, key, size, patch)
    _check_state(state, specs[name], f'{src} [{split.format}, {name}]')
    try:
      variables[name] = layouts.torch_to_flax(state)
    except ValueError as e:
      raise ConvertError(f'{src}: {e}') from None
  metadata = {
    'source': {
      'file': storage.Path(src).name,
      'sha256': sha256(src),
      'bytes': storage.Path(src).stat().length,
      **split.info,
    },
    'format': split.format,
    **_arch_metadata(enc_spec),
    **norm.to_metadata(),
    'notes': notes,
    'converted_at': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
  }
  try:
    pretrained.save_pretrained(dst, specs, variables, metadata, overwrite=overwrite)
  except pretrained.CheckpointMismatchError as e:
    raise ConvertError(f'{src} ({split.format}): {e}') from None
  return pretrained.read_metadata(dst)


def _arch_metadata(spec: ComponentSpec) -> dict[str, Any]:
  kw = spec.kwargs
  if spec.module == 'ResNet':
    return {'variant': resnet.name_variant(kw['block'], kw['stage_sizes'], kw['width'],
                                           kw['small_stem'])}  # fmt: skip
  return {
    'variant': vit.name_variant(kw['width'], kw['depth'], kw['num_heads'], kw['patch_size']),
    'patch_size': kw['patch_size'],
    'image_size': kw['image_size'],
  }


EXPORT_FORMATS = ('mae', 'mocov3', 'torchvision', 'dino')
_MOCO_ARCH = {(384, 12): 'vit_small', (768, 12): 'vit_base'}


def export_checkpoint(
  src_dir: str, dst: str, *, overwrite: bool = False, fmt: str | None = None
) -> list[str]:
  """Converted / trained Flax directory -> PyTorch checkpoint; returns the keys written.

  fmt 'mae' (default without MoCo heads): ``{'model': state_dict}`` in the MAE / timm naming, the
  decoder included when present (as MAE's ``*_full.pth``); a ``.safetensors`` destination writes
  that state dict as safetensors. fmt 'mocov3' (default when the directory has a predictor): MoCo
  v3's ``.pth.tar`` layout, ``{'arch', 'epoch', 'state_dict'}`` with ``module.base_encoder.``
  (projector as its ``head``), ``module.momentum_encoder.`` and ``module.predictor.``.
  Both add ``'moma_jax': {'num_heads': H}``, so a re-import needs no --num-heads. fmt
  'torchvision' (default for a ResNet): a plain torchvision state dict. fmt 'dino': DINO's
  training-checkpoint layout ``{'teacher': {backbone.*, head.*}, 'epoch'}`` (ViT or ResNet).
  """
  if storage.Path(dst).exists() and not overwrite:
    raise ConvertError(f'{dst} already exists; pass --overwrite to replace it')
  try:
    loaded = pretrained.load_pretrained(src_dir)
  except (FileNotFoundError, pretrained.CheckpointMismatchError) as e:
    raise ConvertError(str(e)) from None
  heads = loaded.heads
  is_resnet = isinstance(loaded.model, resnet.ResNet)
  fmt = fmt or ('mocov3' if 'predictor' in heads else 'torchvision' if is_resnet else 'mae')
  if fmt not in EXPORT_FORMATS:
    raise ConvertError(f'export format {fmt!r}; one of {", ".join(EXPORT_FORMATS)}')
  if is_resnet and fmt not in ('torchvision', 'dino'):
    raise ConvertError(f'{src_dir} holds a ResNet: export it as torchvision or dino, not {fmt}')
  if fmt == 'torchvision' and not is_resnet:
    raise ConvertError(f'{src_dir} holds a ViT: the torchvision format is for ResNets')

  def torch_state(variables, prefix=''):
    return {
      prefix + k: np.ascontiguousarray(v) for k, v in layouts.flax_to_torch(variables).items()
    }

  m = loaded.model
  ours = {} if is_resnet else {'num_heads': m.num_heads}
  if fmt == 'torchvision':  # a plain state dict, as torchvision's releases and DINO's ResNet-50
    state = torch_state(loaded.params)
    torch_format.save(state, dst)
    return list(state)
  if fmt == 'dino':  # DINO's training checkpoint layout, the teacher only
    state = torch_state(loaded.params, 'backbone.')
    if 'head' in heads:
      state.update(torch_state(heads['head'].variables, 'head.'))
    torch_format.save({'teacher': state, 'epoch': 0, 'moma_jax': ours}, dst)
    return list(state)
  if fmt == 'mocov3':
    if 'projector' not in heads:
      raise ConvertError(f'{src_dir} has no MoCo v3 projector: export it with the mae format')
    state = torch_state(loaded.params, 'module.base_encoder.')
    state.update(torch_state(heads['projector'].variables, 'module.base_encoder.head.'))
    if 'predictor' in heads:
      state.update(torch_state(heads['predictor'].variables, 'module.predictor.'))
    if 'momentum_encoder' in heads:
      state.update(torch_state(heads['momentum_encoder'].variables, 'module.momentum_encoder.'))
    if 'momentum_projector' in heads:
      state.update(
        torch_state(heads['momentum_projector'].variables, 'module.momentum_encoder.head.')
      )
    arch = _MOCO_ARCH.get((m.width, m.num_heads), 'vit_custom')
    torch_format.save({'epoch': 0, 'arch': arch, 'state_dict': state, 'moma_jax': ours}, dst)
    return list(state)
  state = torch_state(loaded.params)
  if 'decoder' in heads:
    state.update(torch_state(heads['decoder'].variables))
  if os.fspath(dst).endswith('.safetensors'):
    from safetensors.numpy import save_file

    with storage.local_output(dst) as tmp:  # the head count as metadata, as in our .pth files
      save_file(state, tmp, metadata={formats.SAFETENSORS_HEADS: str(m.num_heads)})
  else:
    torch_format.save({'model': state, 'moma_jax': ours}, dst)
  return list(state)
