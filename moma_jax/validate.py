"""Checks a run's settings before anything expensive happens: before JAX is imported, before any
file is written. Each problem is one line naming the setting, its value and what to do.

The trainer re-checks what only it can (batch vs devices, dataset contents, checkpoint shapes);
this pass catches what a user gets wrong most often, in the first second instead of after the
JAX import, teacher conversion and compilation.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

from moma_jax import storage
from moma_jax.data.embedded import NAMES as EMBEDDED
from moma_jax.models import variants
from moma_jax.objectives import registry

TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.bin', '.safetensors')
MAE_FORMATS = ('mae_pretrain', 'mae_full', 'mae_finetuned')
EMBEDDED_SPLITS = ('train', 'test')


class ConfigError(ValueError):
  """A setting that cannot work; the message is one line: setting, value, what to do."""


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{dotted key: value} of every leaf of a config, as its JSON form has them (the trainer's
  experiment fingerprint; the command line's key suggestions)."""
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        flat[f'{prefix}{k}'] = v

  walk(json.loads(config.to_json_best_effort()), '')
  return flat


def _fail(setting: str, value: Any, what: str) -> None:
  raise ConfigError(f'{setting}={value!r}: {what}')


def _positive(c, key: str, what: str = 'must be > 0', prefix: str = '') -> None:
  if c.get(key) is not None and not c[key] > 0:
    _fail(f'{prefix}{key}', c[key], what)


def _between(c: Any, prefix: str, key: str, lo: float, hi: float, hi_open: bool = True) -> None:
  v = c[key]
  ok = lo <= v < hi if hi_open else lo <= v <= hi
  if not ok:
    _fail(f'{prefix}{key}', v, f'must be in [{lo}, {hi}{")" if hi_open else "]"}')


def _variant(setting: str, value: str) -> variants.ViTSpec:
  try:
    return variants.decode_variant(value)
  except ValueError as e:
    raise ConfigError(f'{setting}={value!r}: {e}') from None


def _dtype(setting: str, value: str) -> None:
  if value not in ('float32', 'bfloat16'):
    _fail(setting, value, "use 'float32' or 'bfloat16'")


# --- checkpoints -----------------------------------------------------------------------------------


def checkpoint_kind(setting: str, path: str) -> tuple[str, set[str], int | None]:
  """(format, component names, image size in px or None if unknown) of a converted directory or
  a PyTorch / safetensors file, read without JAX; a missing, unreadable or foreign path is a
  ConfigError."""
  p = storage.Path(path)
  if not p.exists():
    _fail(setting, path, 'no such file or directory; give a converted checkpoint directory '
                         '(python -m convert --src CKPT --dst DIR) or an official .pth / .pth.tar')  # fmt: skip
  if p.is_dir():
    meta_path = p / 'metadata.json'
    if not meta_path.exists():
      _fail(setting, path, 'a directory without metadata.json, not a converted checkpoint; '
                           'convert one first: python -m convert --src CKPT --dst DIR')  # fmt: skip
    try:
      meta = json.loads(meta_path.read_text())
      components = meta['components']
      if not isinstance(components, dict) or 'encoder' not in components:
        raise KeyError('components.encoder')
    except (ValueError, KeyError, TypeError) as e:
      _fail(setting, path, f'its metadata.json is unreadable ({type(e).__name__}: {e}); '
                           'convert or export the checkpoint again')  # fmt: skip
    kind = meta.get('format', '')
    if kind == 'moma_jax':  # a trainer export: name it by its heads
      kind = (
        'mocov3' if 'predictor' in components else 'mae_full' if 'decoder' in components else kind
      )
    size = meta.get('image_size') or components['encoder'].get('kwargs', {}).get('image_size')
    return kind, set(components), size
  if not path.endswith(TORCH_SUFFIXES):
    _fail(setting, path, f'a file that is neither a converted directory nor a PyTorch checkpoint '
                         f'({", ".join(TORCH_SUFFIXES)})')  # fmt: skip
  from convert import formats
  from convert.errors import ConvertError

  try:
    split = formats.split(formats.read_file(path))
  except ConvertError as e:
    raise ConfigError(f'{setting}={path!r}: {e}') from None
  return split.format, set(split.components), _image_size(split.components.get('encoder', {}))


def _image_size(encoder: dict[str, Any]) -> int | None:
  """The image side a PyTorch ViT encoder's position embeddings were made for: patch size x the
  side of the square patch grid (pos_embed holds the grid plus a CLS token where there is one)."""
  pos, patch = encoder.get('pos_embed'), encoder.get('patch_embed.proj.weight')
  if pos is None or patch is None or len(pos.shape) != 3 or len(patch.shape) != 4:
    return None
  grid = pos.shape[1] - (1 if 'cls_token' in encoder else 0)
  side = math.isqrt(grid)
  return side * patch.shape[-1] if side * side == grid else None


def _check_role(setting: str, path: str, role: str, image_size: int | None) -> None:
  """role: 'encoder' (any ViT), 'any' (a ViT or a ResNet), 'mae' / 'moco' (a teacher of that
  name), 'mae_decoder' (MAE pre-training continued, which needs the decoder unless a fresh one is
  accepted). A ViT's position embeddings must be for ``image_size`` px images (data.image_size)."""
  kind, components, size = checkpoint_kind(setting, path)
  if size and image_size and size != image_size:
    _fail(
      setting, path,
      f'a ViT for {size}px images but data.image_size={image_size}; pass '
      f'--config.data.image_size={size}, or resample its position embeddings: python -m convert '
      f'--src {path} --dst DIR --image-size {image_size}',
    )  # fmt: skip
  if role in ('mae', 'mae_decoder') and kind == 'mocov3':
    _fail(setting, path, 'a MoCo v3 checkpoint where an MAE one is needed; give an MAE checkpoint')
  if role == 'moco' and kind in MAE_FORMATS:
    _fail(setting, path, f'an MAE checkpoint ({kind}) where a MoCo v3 one is needed')
  if role == 'mae_decoder' and 'decoder' not in components:
    _fail(setting, path, f'has no MAE decoder ({kind}, components: {", ".join(sorted(components))})'
                         '; continue from an MAE _full checkpoint, or pass '
                         '--config.model.fresh_decoder=True to train a new decoder')  # fmt: skip


# --- sections ---------------------------------------------------------------------------------------


def _check_run(c: ml_collections.ConfigDict) -> None:
  if c.get('objective') not in registry.OBJECTIVES:
    _fail('objective', c.get('objective'), f'one of {", ".join(registry.OBJECTIVES)}')
  _positive(c, 'batch_size', 'must be > 0 (a multiple of the number of data-parallel devices)')
  if c.num_train_steps < 0:
    _fail('num_train_steps', c.num_train_steps, 'must be >= 0 (0: run num_epochs)')
  if not c.num_train_steps:
    _positive(c, 'num_epochs', 'must be > 0, or set num_train_steps')
  if c.stop_at_step < 0:
    _fail('stop_at_step', c.stop_at_step, 'must be >= 0 (0: no early stop)')
  for key in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    _positive(c, key)
  if c.get('image_every', 0) < 0:
    _fail('image_every', c.image_every, 'must be >= 0 (0: no image summaries)')
  if c.get('image_every', 0) and c.get('image_count', 1) <= 0:
    _fail('image_count', c.image_count, 'must be > 0 (images per summary), or image_every=0')
  mesh = dict(c.mesh)
  if not mesh or set(mesh) - {'data', 'fsdp'}:
    _fail('mesh', mesh, "axes 'data' and / or 'fsdp', e.g. {'data': -1, 'fsdp': 1}")
  sizes = list(mesh.values())
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    _fail('mesh', mesh, 'sizes are positive, with at most one -1 ("all remaining devices")')


def _check_optim(o: ml_collections.ConfigDict, prefix: str = 'optim.') -> None:
  if o.name not in ('adamw', 'lars', 'sgd'):
    _fail(f'{prefix}name', o.name, "one of 'adamw', 'lars', 'sgd'")
  _positive(o, 'base_lr', 'must be > 0 (lr = base_lr * batch_size / 256)', prefix)
  for key in ('min_lr', 'weight_decay', 'weight_decay_end', 'warmup_epochs', 'warmup_steps',
              'grad_clip'):  # fmt: skip
    if o.get(key, 0) < 0:
      _fail(f'{prefix}{key}', o[key], 'must be >= 0')
  if not 0 < o.get('layer_decay', 1.0) <= 1:
    _fail(f'{prefix}layer_decay', o.layer_decay, 'must be in (0, 1] (1: no layer decay)')


def evaluator_split(
  config: ml_collections.ConfigDict, ec: ml_collections.ConfigDict, key: str
) -> str:
  """An evaluator's ``key`` split ('train_split', 'eval_split' or 'split'); '' (the shipped
  default) means the data's: data.train_split for the memory bank, data.eval_split otherwise."""
  data_key = 'train_split' if key == 'train_split' else 'eval_split'
  return ec.get(key) or config.data[data_key]


def reads_labels(config: ml_collections.ConfigDict) -> bool:
  """Whether the run reads labels (and so the evaluation split): a labelled objective, or an
  evaluator that runs periodically or at the end."""
  return registry.entry(config.objective).labelled or any(
    ev.get('every_steps') or ev.get('at_end') for ev in dict(config.get('evaluators', {})).values()
  )


def _check_split(dataset: str, setting: str, split: str) -> None:
  if dataset in EMBEDDED and split not in EMBEDDED_SPLITS:
    _fail(setting, split, f'{dataset} has splits {", ".join(EMBEDDED_SPLITS)}')
  if dataset.startswith('folder:') and split != 'train':  # a folder without splits is 'train'
    root = storage.Path(dataset[len('folder:') :])
    if not (root / split).is_dir():
      subs = sorted(p.name for p in root.iterdir() if p.is_dir())
      _fail(
        setting, split,
        f'{root} has no {split!r} sub-folder (it has: {", ".join(subs) or "none"}); name the '
        f'evaluation images\' folder with --config.{setting}=<sub-folder>',
      )  # fmt: skip


def _check_data(c: ml_collections.ConfigDict) -> None:
  d = c.data
  _positive(d, 'image_size', 'must be > 0 (the views of one size follow it)', prefix='data.')
  name = d.name
  if name.startswith('folder:'):
    root = storage.Path(name[len('folder:') :])
    if not root.exists():
      _fail(
        'data.name',
        name,
        'no such folder; give folder:/path/to/images with one sub-folder per class',
      )
    if not root.is_dir():
      _fail('data.name', name, 'is a file; folder: needs a directory with one sub-folder per class')
  elif name not in EMBEDDED:
    local = {
      k: d.get(k) for k in ('data_dir', 'manual_dir') if d.get(k) and not storage.is_remote(d[k])
    }
    if 'manual_dir' in local and not os.path.isdir(local['manual_dir']):
      _fail(
        'data.manual_dir',
        local['manual_dir'],
        'no such directory (it holds the downloaded archives)',
      )
    if 'data_dir' in local and not d.get('manual_dir') and not os.path.isdir(local['data_dir']):
      _fail(
        'data.data_dir',
        local['data_dir'],
        'no such directory; give data.manual_dir too to prepare the dataset there',
      )
  for key in ('train_split', 'eval_split') if reads_labels(c) else ('train_split',):
    _check_split(name, f'data.{key}', d[key])  # the eval split only where something reads it
  for vname, view in dict(d.views).items():
    size, scale = view.get('size', 224), view.get('scale')
    if size <= 0:
      _fail(f'data.views.{vname}.size', size, 'must be > 0')
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
      _fail(
        f'data.views.{vname}.scale', scale, 'a (min, max) area fraction with 0 < min <= max <= 1'
      )
  if not registry.entry(c.objective).multi_crop:  # one image size for every view
    off = {v: view.get('size', 224) for v, view in dict(d.views).items()}
    off = {v: size for v, size in off.items() if size != d.image_size}
    if off:
      fix = ' '.join(f'--config.data.views.{v}.size={d.image_size}' for v in off)
      _fail(
        f'data.views.{next(iter(off))}.size', next(iter(off.values())),
        f'every view must be data.image_size={d.image_size}px: pass {fix} (the shipped configs\' '
        'views follow --config.data.image_size alone)',
      )  # fmt: skip
  for ename, ev in dict(c.get('evaluators', {})).items():
    if ename not in ('knn', 'classification'):
      _fail(f'evaluators.{ename}', '...', "unknown evaluator; known: 'knn', 'classification'")
    _positive(ev, 'batch_size', prefix=f'evaluators.{ename}.')
    if ev.get('features', 'cls') not in variants.POOLS:
      _fail(f'evaluators.{ename}.features', ev.features, f'one of {", ".join(variants.POOLS)}')
    for key in ('train_split', 'eval_split', 'split'):
      if ev.get(key):  # '' is the data's split, checked above
        _check_split(name, f'evaluators.{ename}.{key}', ev[key])


def check_moma(c: ml_collections.ConfigDict) -> None:
  m = c.moma
  _between(m, 'moma.', 'mask_ratio', 0.0, 1.0)
  if m.align not in ('cls', 'patch', 'both'):
    _fail('moma.align', m.align, "one of 'cls', 'patch', 'both'")
  if m.teacher_norm not in ('own+ln', 'own', 'ln'):
    _fail('moma.teacher_norm', m.teacher_norm, "one of 'own+ln', 'own', 'ln'")
  if m.get('target_stats', 'none') not in ('none', 'center', 'standardize'):
    _fail('moma.target_stats', m.target_stats, "one of 'none', 'center', 'standardize'")
  if m.smooth_l1_beta < 0:
    _fail('moma.smooth_l1_beta', m.smooth_l1_beta, 'must be >= 0 (0: L1)')
  if m.get('projector_warmup_steps', 0) < 0:
    _fail('moma.projector_warmup_steps', m.projector_warmup_steps, 'must be >= 0 (0: off)')
  if m.get('projector_fit_batches', 0) < 0:
    _fail('moma.projector_fit_batches', m.projector_fit_batches, 'must be >= 0 (0: off)')
  _positive(m, 'projector_lr_scale', "must be > 0 (1: the encoder's lr)", prefix='moma.')
  own_schedules = m.get('projector_warmup_steps', 0) or m.get('projector_lr_scale', 1.0) != 1.0
  if own_schedules and c.optim.name != 'adamw':
    _fail('optim.name', c.optim.name, "the projector warm-up / lr scale need 'adamw'")
  if not c.teachers:
    _fail('teachers', '{}', 'MOMA needs at least one teacher (teachers.NAME.checkpoint=...)')
  _dtype('student.dtype', c.student.dtype)
  if c.student.get('remat', 'none') not in ('none', 'block'):
    _fail('student.remat', c.student.remat, "'none' or 'block'")
  _dtype('teacher_dtype', c.teacher_dtype)
  if c.get('teacher_attention', 'xla') not in ('auto', 'xla', 'flash', 'cudnn'):
    _fail(
      'teacher_attention', c.teacher_attention,
      "one of 'auto' (flash on a TPU, else xla), 'xla', 'flash' (TPU), 'cudnn' (GPU)",
    )  # fmt: skip
  if not c.student.checkpoint:
    _variant('student.variant', c.student.variant)
  for name, t in c.teachers.items():
    if t.student_view not in ('masked', 'strong', 'both'):
      _fail(f'teachers.{name}.student_view', t.student_view, "one of 'masked', 'strong', 'both'")
    if t.weight < 0:
      _fail(f'teachers.{name}.weight', t.weight, 'must be >= 0')
    if not t.checkpoint:
      _variant(f'teachers.{name}.variant', t.variant)
  # Checkpoints last: they read files.
  if c.student.checkpoint:
    _check_role('student.checkpoint', c.student.checkpoint, 'encoder', c.data.image_size)
  for name, t in c.teachers.items():
    if t.checkpoint:
      role = name if name in ('mae', 'moco') else 'encoder'
      _check_role(f'teachers.{name}.checkpoint', t.checkpoint, role, c.data.image_size)


def check_classification(c: ml_collections.ConfigDict) -> None:
  k = c.classifier
  if k.pool not in ('gap', 'cls'):
    _fail('classifier.pool', k.pool, "'gap' or 'cls'")
  if k.num_classes < 0:
    _fail('classifier.num_classes', k.num_classes, 'must be >= 0 (0: from the dataset)')
  _between(k, 'classifier.', 'label_smoothing', 0.0, 1.0)
  for key in ('mixup_alpha', 'cutmix_alpha', 'drop_path'):
    if k[key] < 0:
      _fail(f'classifier.{key}', k[key], 'must be >= 0')
  for key in ('mix_prob', 'switch_prob', 'erase_prob'):
    _between(k, 'classifier.', key, 0.0, 1.0, hi_open=False)
  _dtype('classifier.dtype', k.dtype)
  if k.linear_probe and not k.checkpoint:
    _fail('classifier.checkpoint', '', 'a linear probe needs the encoder to probe (checkpoint=DIR)')
  if k.checkpoint:
    _check_role('classifier.checkpoint', k.checkpoint, 'encoder', c.data.image_size)
  else:
    _variant('classifier.variant', k.variant)


def check_pretraining(c: ml_collections.ConfigDict) -> None:
  m = c.model
  _dtype('model.dtype', m.dtype)
  if 'mae' in c:
    _between(c.mae, 'mae.', 'mask_ratio', 0.0, 1.0)
  if c.objective == 'mocov3' and not c.mocov3.temperature > 0:
    _fail('mocov3.temperature', c.mocov3.temperature, 'must be > 0')
  if c.objective == 'rc_mae':
    _between(c.rc_mae, 'rc_mae.', 'momentum', 0.0, 1.0, hi_open=False)
  spec = None if m.checkpoint else _variant('model.variant', m.variant)
  if c.objective == 'dmae':
    d = c.dmae
    if spec is not None and not 1 <= d.student_block <= spec.depth:
      _fail('dmae.student_block', d.student_block, f'the student has blocks 1..{spec.depth}')
    if not d.teacher:
      t = _variant('dmae.teacher_variant', d.teacher_variant)
      if not 1 <= d.teacher_block <= t.depth:
        _fail('dmae.teacher_block', d.teacher_block, f'the teacher has blocks 1..{t.depth}')
    else:
      _check_role('dmae.teacher', d.teacher, 'mae', c.data.image_size)
  if m.checkpoint:
    needs_decoder = c.objective in ('mae', 'dmae', 'rc_mae') and not m.get('fresh_decoder')
    role = 'mae_decoder' if needs_decoder else ('moco' if c.objective == 'mocov3' else 'encoder')
    _check_role('model.checkpoint', m.checkpoint, role, c.data.image_size)


def _check_backbone(c: ml_collections.ConfigDict, prefix: str, kinds: str = 'vit resnet') -> None:
  """A DINO / MOKD backbone section: arch a ViT variant or a ResNet name, dtype, checkpoint."""
  m = c[prefix]
  _dtype(f'{prefix}.dtype', m.get('dtype', 'float32'))
  if m.get('checkpoint'):
    _check_role(f'{prefix}.checkpoint', m.checkpoint, 'any', c.data.image_size)
    return
  if m.arch.startswith('resnet'):
    if 'resnet' not in kinds:
      _fail(f'{prefix}.arch', m.arch, 'is a ResNet; a ViT variant is needed here (e.g. S/16)')
    if m.arch not in variants.RESNETS:
      _fail(f'{prefix}.arch', m.arch, f'unknown ResNet; one of {", ".join(variants.RESNETS)}')
  elif 'vit' not in kinds:
    _fail(f'{prefix}.arch', m.arch, "a ResNet is needed here (e.g. 'resnet50')")
  else:
    _variant(f'{prefix}.arch', m.arch)


def _check_multicrop(c: ml_collections.ConfigDict, section: str) -> None:
  """DINO's shared settings (dino.* or mokd.*) and its views: 2 global crops of data.image_size,
  num_local local crops of one smaller size."""
  s = c[section]
  for key in ('out_dim', 'hidden_dim', 'bottleneck_dim', 'head_layers'):
    _positive(s, key, prefix=f'{section}.')
  for key in ('student_temp', 'teacher_temp', 'warmup_teacher_temp'):
    _positive(s, key, 'must be > 0 (a softmax temperature)', prefix=f'{section}.')
  for key in ('momentum', 'center_momentum'):
    _between(s, f'{section}.', key, 0.0, 1.0, hi_open=False)
  if s.get('centering', 'center') not in ('center', 'sinkhorn'):
    _fail(f'{section}.centering', s.centering, "'center' (DINO) or 'sinkhorn' (DINOv2)")
  if s.num_local < 0:
    _fail(f'{section}.num_local', s.num_local, 'must be >= 0 (local crops per image)')
  views = dict(c.data.views)
  names = ['global1', 'global2', *(f'local{i + 1}' for i in range(s.num_local))]
  missing = [n for n in names if n not in views]
  if missing:
    _fail(
      'data.views', sorted(views),
      f'{section} reads {", ".join(missing)} (2 global crops and {section}.num_local='
      f'{s.num_local} local ones)',
    )  # fmt: skip
  for n in ('global1', 'global2'):
    if views[n].get('size') != c.data.image_size:
      _fail(f'data.views.{n}.size', views[n].get('size'),
            f'global crops are data.image_size={c.data.image_size}px')  # fmt: skip


def check_dino(c: ml_collections.ConfigDict) -> None:
  _check_backbone(c, 'model')
  _check_multicrop(c, 'dino')
  for key in ('warmup_teacher_temp_epochs',):
    if c.dino[key] < 0:
      _fail(f'dino.{key}', c.dino[key], 'must be >= 0')


def check_mokd(c: ml_collections.ConfigDict) -> None:
  _check_backbone(c, 'cnn', 'resnet')
  _check_backbone(c, 'vit', 'vit')
  _check_multicrop(c, 'mokd')
  k = c.mokd
  for key in ('lambda_c', 'lambda_t', 'warmup_teacher_temp_epochs_cnn',
              'warmup_teacher_temp_epochs_vit', 'search_depth'):  # fmt: skip
    if k[key] < 0:
      _fail(f'mokd.{key}', k[key], 'must be >= 0')
  for name in ('optim_cnn', 'optim_vit'):
    _check_optim(c[name], f'{name}.')


def check_workdir(workdir: str) -> None:
  """A directory we can create and write (local paths); URIs are checked when first written."""
  if not workdir:
    _fail('--workdir', workdir, 'give a directory for checkpoints, metrics and exports')
  if storage.is_remote(workdir):
    return
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    _fail('--workdir', workdir, 'is a file; give a directory (new or a run to resume)')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    _fail('--workdir', workdir, f'{existing} is a file, so the directory cannot be created')
  if not os.access(existing, os.W_OK | os.X_OK):
    _fail('--workdir', workdir, f'{existing} is not writable; choose another directory')


def _check_layer_decay(config: ml_collections.ConfigDict) -> None:
  """Layer decay is MAE's fine-tuning rule, applied by the trainer to the 'model' ViT of the
  classification objective (optim.layer_id reads 'model/blocks_i/...' paths) and only inside
  AdamW: anywhere else it would fail after JAX starts (MOMA has no 'model') or do nothing."""
  o = config.optim
  if o.get('layer_decay', 1.0) >= 1.0:
    return
  if not registry.entry(config.objective).layer_decay:
    takes = ', '.join(repr(n) for n, e in registry.OBJECTIVES.items() if e.layer_decay)
    _fail(
      'optim.layer_decay', o.layer_decay,
      f"is MAE's fine-tuning rule and applies only to objective {takes} (configs/finetune.py), "
      f'not {config.objective!r}; leave it at 1.0',
    )  # fmt: skip
  if o.get('name', 'adamw') != 'adamw':
    _fail('optim.layer_decay', o.layer_decay, f"needs optim.name='adamw', not {o.name!r}")


def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Raises ConfigError (one line) for the first setting that cannot work. ``workdir`` None: a
  plan (--plan), which writes nothing and needs none."""
  if workdir is not None:
    check_workdir(workdir)
  _check_run(config)
  if 'optim' in config:
    _check_optim(config.optim)
    _check_layer_decay(config)
  _check_data(config)
  registry.check(config)
