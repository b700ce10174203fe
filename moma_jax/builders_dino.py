"""From a config to the DINO / MOKD objectives: backbones (ViT or ResNet, random or from a
checkpoint), heads, multi-crop view checks. Every bad input fails here, before any compilation.

Each builder returns (objective, frozen variables, start params or None, notes), as every builder
of objectives/registry.py.
"""

from __future__ import annotations

import ml_collections

from moma_jax import builders
from moma_jax.data import pipeline, sources
from moma_jax.models import resnet, vit
from moma_jax.models.heads import DinoHead, TransHead
from moma_jax.objectives import dino as dino_lib
from moma_jax.objectives.registry import Sizes


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """The trainer's steps per epoch (train examples // global batch): DINO's per-epoch schedules
  (teacher temperature, last-layer freezing) are counted in these."""
  src = sources.open_split(
    config.data.name, config.data.train_split, data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
  )  # fmt: skip
  return max(1, src.total_examples // config.batch_size)


def backbone(
  mc: ml_collections.ConfigDict,
  size: int,
  what: str,
  expect: str | None = None,
  loader: builders.Loader = builders.ARRAYS,
):
  """(model, start variables or None, input normalisation, note) for one backbone config
  (``arch`` = a ViT variant such as 'S/16' or a ResNet such as 'resnet50'; ``checkpoint``).
  ``expect`` ('vit' / 'resnet') refuses the other kind with one line."""
  dtype = builders.dtype(mc.dtype)
  if mc.checkpoint:
    loaded = loader.checkpoint(mc.checkpoint)
    m = loaded.model
    kind = 'resnet' if isinstance(m, resnet.ResNet) else 'vit'
    if expect and kind != expect:
      raise ValueError(
        f'{what}: {mc.checkpoint} holds a {type(m).__name__} '
        f'({loaded.metadata.get("variant") or "custom"}), but a '
        f'{"ViT" if expect == "vit" else "ResNet"} is expected here'
      )
    if kind == 'vit':
      m, variables = builders.encoder_of(loaded, f'{what} {mc.checkpoint}')
      m = m.clone(dtype=dtype, drop_path=mc.get('drop_path', 0.0))
      start = variables['params']
    else:
      if m.num_classes:
        m = m.clone(num_classes=0)  # DINO's fc = nn.Identity(); the fc weights are left out
      m = m.clone(dtype=dtype)
      start = {'params': loaded.params['params'], 'batch_stats': loaded.params['batch_stats']}
      start['params'] = {k: v for k, v in start['params'].items() if k != 'fc'}
    note = f'{what}: {mc.checkpoint} ({loaded.metadata.get("variant")})'
    return m, start, builders.input_norm(mc, loaded), note
  if resnet.is_resnet_variant(mc.arch):
    if expect == 'vit':
      raise ValueError(f'{what}: arch={mc.arch!r} is a ResNet, but a ViT is expected here')
    m = resnet.ResNet(**resnet.decode_variant(mc.arch), dtype=dtype)
  else:
    if expect == 'resnet':
      raise ValueError(f"{what}: arch={mc.arch!r} is not a ResNet (e.g. 'resnet50')")
    m = builders.vit_from_variant(mc.arch, size, mc.dtype, mc.get('drop_path', 0.0))
  return m, None, builders.input_norm(mc), f'{what}: randomly initialised {mc.arch}'


def _check_size(model, size: int, what: str) -> None:
  if isinstance(model, vit.ViT):
    builders.check_size(model, size, what)


def build_dino(
  config: ml_collections.ConfigDict, sizes: Sizes, loader: builders.Loader = builders.ARRAYS
):
  """DINO on one backbone (a ViT or a ResNet)."""
  total_steps, per_epoch = sizes.total_steps, sizes.steps_per_epoch or steps_per_epoch(config)
  d = config.dino
  size = config.data.image_size
  model, start, norm, note = backbone(config.model, size, 'model', loader=loader)
  _check_size(model, size, 'the DINO backbone')
  views = pipeline.views_from_config(config.data.views)
  g_names, l_names = dino_lib.view_names(d.num_local)
  g_size, l_size = dino_lib.check_multicrop(views, g_names, l_names, model, 'dino')
  head = DinoHead(
    d.out_dim,
    d.hidden_dim,
    d.bottleneck_dim,
    d.head_layers,
    dtype=builders.dtype(config.model.dtype),
  )
  objective = dino_lib.Dino(
    model, head, total_steps=total_steps, steps_per_epoch=per_epoch,
    num_local=d.num_local, student_temp=d.student_temp, teacher_temp=d.teacher_temp,
    warmup_teacher_temp=d.warmup_teacher_temp,
    warmup_teacher_temp_epochs=d.warmup_teacher_temp_epochs,
    center_momentum=d.center_momentum, centering=d.centering, base_momentum=d.momentum,
    norm_last_layer=d.norm_last_layer, global_size=g_size, local_size=l_size or g_size,
    input_norm=norm,
  )  # fmt: skip
  crops = dino_lib.crops_note(len(g_names), g_size, len(l_names), l_size)
  return objective, {}, start, [note, f'dino: {crops}, {d.out_dim} prototypes']


def build_mokd(
  config: ml_collections.ConfigDict, sizes: Sizes, loader: builders.Loader = builders.ARRAYS
):
  """MOKD: a CNN and a ViT, each trained with DINO, distilling into each other."""
  total_steps, per_epoch = sizes.total_steps, sizes.steps_per_epoch or steps_per_epoch(config)
  from moma_jax.objectives.mokd import Mokd

  k = config.mokd
  size = config.data.image_size
  dt = builders.dtype(config.vit.dtype)
  cnn, cnn_start, cnn_norm, cnn_note = backbone(config.cnn, size, 'cnn', 'resnet', loader)
  vit_model, vit_start, vit_norm, vit_note = backbone(config.vit, size, 'vit', 'vit', loader)
  _check_size(vit_model, size, 'the MOKD ViT')
  views = pipeline.views_from_config(config.data.views)
  g_names, l_names = dino_lib.view_names(k.num_local)
  g_size, l_size = dino_lib.check_multicrop(views, g_names, l_names, vit_model, 'mokd')
  if g_size % cnn.stride:
    raise ValueError(
      f'mokd: global crop size {g_size} is not a multiple of the CNN stride {cnn.stride}'
    )
  if l_size and l_size % cnn.stride:
    raise ValueError(
      f'mokd: local crop size {l_size} is not a multiple of the CNN stride {cnn.stride}'
    )
  w = vit_model.width

  def dino_head(norm_last):
    del norm_last  # a training option (frozen weight_g), not part of the module
    return DinoHead(k.out_dim, k.hidden_dim, k.bottleneck_dim, k.head_layers, dtype=dt)

  search = dict(
    out_dim=k.out_dim, width=w, depth=k.search_depth, num_heads=k.search_heads,
    mlp_ratio=k.search_mlp_ratio, dtype=dt,
  )  # fmt: skip
  objective = Mokd(
    cnn=cnn, vit=vit_model, cnn_head=dino_head(True), vit_head=dino_head(False),
    cnn_search=TransHead(grid=g_size // cnn.stride, in_channels=cnn.out_dim, **search),
    vit_search=TransHead(grid=g_size // vit_model.patch_size, **search),
    total_steps=total_steps, steps_per_epoch=per_epoch, num_local=k.num_local,
    student_temp=k.student_temp, teacher_temp=k.teacher_temp,
    warmup_teacher_temp=k.warmup_teacher_temp,
    warmup_teacher_temp_epochs_cnn=k.warmup_teacher_temp_epochs_cnn,
    warmup_teacher_temp_epochs_vit=k.warmup_teacher_temp_epochs_vit,
    center_momentum=k.center_momentum, centering=k.centering, base_momentum=k.momentum,
    lambda_c=k.lambda_c,
    lambda_t=k.lambda_t, cnn_norm_last_layer=k.cnn_norm_last_layer,
    vit_norm_last_layer=k.vit_norm_last_layer, cnn_search_schedule=k.cnn_search_schedule,
    global_size=g_size, local_size=l_size or g_size, cnn_input_norm=cnn_norm,
    input_norm=vit_norm,
  )  # fmt: skip
  start = None
  if cnn_start is not None or vit_start is not None:
    start = {'cnn': cnn_start, 'vit': vit_start}
  notes = [
    cnn_note,
    vit_note,
    f'mokd: {dino_lib.crops_note(len(g_names), g_size, len(l_names), l_size)}',
  ]
  return objective, {}, start, notes
