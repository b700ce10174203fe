"""From a config to an objective: load the checkpoints it names, build the models.

The only place where objectives meet files (objectives themselves never read any).
Returns (objective, frozen variables, pre-trained params to start from or None, notes for the log).
A :class:`Loader` says how weights are obtained: arrays for a run, shapes only for a plan
(moma_jax/plan.py), through the same builders.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from moma_jax import storage
from moma_jax.models import pretrained, vit
from moma_jax.objectives.classification import Classification
from moma_jax.objectives.moma import Moma, Teacher
from moma_jax.objectives.registry import Sizes


def dtype(name: str):
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {name!r}")
  return jnp.dtype(name)


TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.bin', '.safetensors')


def load_checkpoint(
  path: str, shapes_only: bool = False, variant: str | None = None, **overrides: Any
) -> pretrained.Pretrained:
  """A converted checkpoint directory, or a PyTorch / safetensors file (MAE, MoCo v3, timm)
  converted on the fly through ``convert/`` into a temporary directory: the same path as
  ``python -m convert`` followed by loading its output. ``shapes_only``: ShapeDtypeStructs
  instead of arrays (a directory's parameter files are then not read; a PyTorch file is).
  ``variant``: the config's variant for this model, used for the head count when the file
  cannot tell it (a plain state dict of an unusual width) and the variant's shape matches."""
  if not path.endswith(TORCH_SUFFIXES) or not storage.Path(path).is_file():
    export = storage.Path(path) / 'export' / 'model'
    if (
      not (storage.Path(path) / pretrained.METADATA_FILE).exists()
      and (export / pretrained.METADATA_FILE).exists()
    ):  # a training workdir: its exported model
      logging.info('%s is a training workdir: reading its export, %s', path, export)
      path = os.fspath(export)
    return pretrained.load_pretrained(path, shapes_only, **overrides)
  from convert.convert import convert_checkpoint
  from convert.errors import ConvertError

  # The converted copy is a local cache for this run; the source may be local or on gs://.
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'converted')
    try:
      convert_checkpoint(path, out)
    except ConvertError as e:
      if 'number of heads' not in str(e):
        raise ValueError(str(e)) from e
      if not (variant and _converts(path, out, variant)):
        raise ValueError(
          f'{str(e).split(";")[0]}; convert it first (python -m convert --src {path} --dst DIR '
          "--num-heads N) and give DIR, or set this model's variant in the config to its size"
        ) from e
    return pretrained.load_pretrained(out, shapes_only, **overrides)


def _converts(path: str, out: str, variant: str) -> bool:
  """Converts ``path`` with the config's variant for its head count; False when the variant's
  width / depth / patch are not the file's (the converter checks them)."""
  from convert.convert import convert_checkpoint
  from convert.errors import ConvertError

  try:
    convert_checkpoint(path, out, variant=variant)
  except ConvertError:
    return False
  return True


@dataclasses.dataclass(frozen=True)
class Loader:
  """How the builders obtain weights. A run: arrays (checkpoints read, random models initialised
  on the default device). A plan (``shapes_only``): ShapeDtypeStructs only, so that a B/16 or
  L/16 config is planned for a TPU pod without reading or allocating its weights."""

  shapes_only: bool = False

  def checkpoint(
    self, path: str, variant: str | None = None, **overrides: Any
  ) -> pretrained.Pretrained:
    return load_checkpoint(path, self.shapes_only, variant, **overrides)

  def init(self, model, *args) -> Any:
    """``model.init(*args)``, or its shapes."""
    return jax.eval_shape(model.init, *args) if self.shapes_only else jax.jit(model.init)(*args)


ARRAYS = Loader()  # a run
SHAPES = Loader(shapes_only=True)  # a plan


def input_norm(cfg: ml_collections.ConfigDict, loaded: pretrained.Pretrained | None = None):
  """A model's input statistics: its checkpoint's, else the config's (mean / std, ImageNet's by
  default) for a randomly initialised model."""
  if loaded is not None:
    return loaded.normalization
  return pretrained.Normalization(
    tuple(cfg.get('mean', pretrained.IMAGENET_MEAN)), tuple(cfg.get('std', pretrained.IMAGENET_STD))
  )


def encoder_of(loaded: pretrained.Pretrained, what: str) -> tuple[vit.ViT, dict[str, Any]]:
  """(encoder, its variables) of a loaded ViT checkpoint. A classifier with the CLS pool (a
  supervised ViT, timm's or one this project fine-tuned) serves as an encoder without its head:
  its tokens after the final norm are the encoder's. A global-pool classifier is refused (its
  tokens skip the final norm: the fc_norm sits after the pooling)."""
  m = loaded.model
  if not isinstance(m, vit.ViT):
    raise ValueError(
      f'{what} holds a {type(m).__name__} ({loaded.metadata.get("variant") or "custom"}), but a '
      'ViT is needed here'
    )
  if m.pool != 'cls':
    raise ValueError(
      f'{what} is a classifier with pool={m.pool}; an encoder is needed (a pre-trained MAE / MoCo '
      'v3 checkpoint, or a classifier fine-tuned with classifier.pool=cls)'
    )
  variables = loaded.params
  if m.num_classes:
    m = m.clone(num_classes=0)
    variables = {
      **variables,
      'params': {k: v for k, v in variables['params'].items() if k != 'head'},
    }
  return m, variables


def vit_from_variant(variant: str, size: int, dtype_name: str = 'float32', drop_path: float = 0.0):
  """A randomly initialisable ViT of a named variant for ``size`` px images."""
  return vit.ViT(
    **vit.decode_variant(variant).kwargs(), image_size=size, dtype=dtype(dtype_name),
    drop_path=drop_path,
  )  # fmt: skip


def random_vit(variant: str, size: int, dtype_name: str, key: jax.Array, loader: Loader = ARRAYS):
  """(model, variables) of a randomly initialised ViT: runlocal's teachers without checkpoints,
  and the random-init floor every probe result is compared with."""
  model = vit_from_variant(variant, size, dtype_name)
  return model, loader.init(model, key, jnp.zeros((1, size, size, 3)))


def check_size(model: vit.ViT, size: int, what: str) -> None:
  if model.image_size != size:
    raise ValueError(
      f'{what} takes {model.image_size}px images but data.image_size={size}; make them agree '
      '(python -m convert --image-size resamples position embeddings)'
    )


def teacher_attention(config: ml_collections.ConfigDict, platform: str) -> str:
  """config.teacher_attention, 'auto' resolved for ``platform`` (the mesh's, the target's in a
  plan): the Pallas flash kernel on a TPU (by the plan's cost model, with a bf16 teacher, 218 vs
  295 ms per moco_to_mae step on a v5e-8: docs/tpu.md), XLA's attention elsewhere (cuDNN's is
  bf16-only and has never run here)."""
  impl = config.get('teacher_attention', 'xla')
  if impl == 'auto':
    return 'flash' if platform == 'tpu' else 'xla'
  return impl


def build_moma(
  config: ml_collections.ConfigDict, sizes: Sizes | None = None, loader: Loader = ARRAYS
) -> tuple[Moma, dict[str, Any], Any, list[str]]:
  """MOMA: the student (random or from a checkpoint) and its frozen teachers (``sizes``: only its
  platform, for teacher_attention='auto'; None is the CPU)."""
  size = config.data.image_size
  attention = teacher_attention(config, sizes.platform if sizes else 'cpu')
  notes = []
  sc = config.student
  if sc.checkpoint:
    loaded = loader.checkpoint(
      sc.checkpoint, sc.variant, dtype=dtype(sc.dtype), drop_path=sc.drop_path
    )
    student, variables = encoder_of(loaded, f'student checkpoint {sc.checkpoint}')
    student, student_params = student.clone(remat=sc.remat), variables['params']
    student_norm = input_norm(sc, loaded)
    notes.append(f'student: {sc.checkpoint} ({loaded.metadata.get("variant")})')
  else:
    student = vit_from_variant(sc.variant, size, sc.dtype, sc.drop_path).clone(remat=sc.remat)
    student_params = None
    student_norm = input_norm(sc)
    notes.append(f'student: randomly initialised {sc.variant}')
  check_size(student, size, 'the student')
  teachers, frozen = {}, {}
  for name, tc in config.teachers.items():
    if tc.checkpoint:
      loaded = loader.checkpoint(tc.checkpoint, tc.variant, dtype=dtype(config.teacher_dtype))
      model, frozen[name] = encoder_of(loaded, f'teacher {name} checkpoint {tc.checkpoint}')
      source = tc.checkpoint
      norm = input_norm(tc, loaded)
      notes.append(f'teacher {name}: {source}, weight {tc.weight}, student view {tc.student_view}')
    else:
      key = jax.random.fold_in(jax.random.key(config.seed + 1), len(teachers))
      model, frozen[name] = random_vit(tc.variant, size, config.teacher_dtype, key, loader)
      source = 'random'
      norm = input_norm(tc)
      notes.append(
        f'teacher {name}: RANDOMLY INITIALISED {tc.variant} (no checkpoint given): this run '
        'exercises the code, it does not distil a real self-supervised teacher'
      )
    model = model.clone(attention_impl=attention)
    if config.teacher_scan:  # the same weights, stacked for nn.scan (tested equal to the plain ViT)
      model = model.clone(scan_blocks=True)
      frozen[name] = vit.stack_block_params(frozen[name], model.depth)
    teachers[name] = Teacher(model, tc.weight, tc.student_view, source, norm)
  if attention != 'xla':
    notes.append(f"teachers' attention: {attention} (teacher_attention={config.teacher_attention})")
  m = config.moma
  objective = Moma(
    student=student,
    teachers=teachers,
    mask_ratio=m.mask_ratio,
    align=m.align,
    teacher_norm=m.teacher_norm,
    smooth_l1_beta=m.smooth_l1_beta,
    per_teacher_projector=m.per_teacher_projector,
    mask_teacher=m.mask_teacher,
    mask_strong_view=m.mask_strong_view,
    projector_warmup_steps=m.get('projector_warmup_steps', 0),
    projector_lr_scale=m.get('projector_lr_scale', 1.0),
    projector_fit_batches=m.get('projector_fit_batches', 0),
    target_stats=m.get('target_stats', 'none'),
    input_norm=student_norm,
  )
  return objective, frozen, student_params, notes


def build_classification(
  config: ml_collections.ConfigDict, sizes: Sizes, loader: Loader = ARRAYS
) -> tuple[Classification, dict[str, Any], Any, list[str]]:
  c = config.classifier
  size = config.data.image_size
  n = c.num_classes or sizes.num_classes
  common = dict(num_classes=n, pool=c.pool, drop_path=c.drop_path, dtype=dtype(c.dtype))
  frozen, start, notes = {}, None, []
  norm = input_norm(c)
  if c.checkpoint:
    loaded = loader.checkpoint(c.checkpoint, c.variant)
    norm = input_norm(c, loaded)
    m = loaded.model
    arch = {k: getattr(m, k) for k in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size',
                                        'image_size', 'channels')}  # fmt: skip
    model = vit.ViT(**arch, **common)
    if c.linear_probe:
      _, frozen['encoder'] = encoder_of(loaded, f'classifier.checkpoint {c.checkpoint}')
    else:
      start = loaded.params['params']
    notes.append(f'encoder: {c.checkpoint} ({loaded.metadata.get("variant")})')
  else:
    if c.linear_probe:
      raise ValueError('a linear probe needs classifier.checkpoint (the encoder to probe)')
    model = vit.ViT(**vit.decode_variant(c.variant).kwargs(), image_size=size, **common)
    notes.append(f'classifier: randomly initialised {c.variant} (training from scratch)')
  check_size(model, size, 'the classifier')
  objective = Classification(
    model,
    linear_probe=c.linear_probe,
    label_smoothing=c.label_smoothing,
    mixup_alpha=c.mixup_alpha,
    cutmix_alpha=c.cutmix_alpha,
    mix_prob=c.mix_prob,
    switch_prob=c.switch_prob,
    erase_prob=c.erase_prob,
    input_norm=norm,
  )
  return objective, frozen, start, notes


def build_pretraining(config: ml_collections.ConfigDict, sizes: Sizes, loader: Loader = ARRAYS):
  """MAE, MoCo v3, DMAE, RC-MAE: an encoder (random or from a checkpoint) plus their heads."""
  from moma_jax.models.heads import MlpHead
  from moma_jax.objectives.dmae import Dmae
  from moma_jax.objectives.mae import Mae, mae_decoder_for
  from moma_jax.objectives.mocov3 import MocoV3
  from moma_jax.objectives.rc_mae import RcMae

  m, size, notes = config.model, config.data.image_size, []
  start: dict[str, Any] = {}
  decoder = None
  norm = input_norm(m)
  if m.checkpoint:
    loaded = loader.checkpoint(m.checkpoint, m.variant, dtype=dtype(m.dtype), drop_path=m.drop_path)
    norm = input_norm(m, loaded)
    encoder, variables = encoder_of(loaded, f'model.checkpoint {m.checkpoint}')
    start['encoder'] = variables['params']
    if 'decoder' in loaded.heads:  # an MAE _full checkpoint: continue with its decoder
      dec = loaded.heads['decoder']
      decoder = dec.module.clone(dtype=dtype(m.dtype))
      start['decoder'] = dec.variables['params']
    notes.append(f'continuing from {m.checkpoint} ({", ".join(start)})')
  else:
    encoder = vit_from_variant(m.variant, size, m.dtype, m.drop_path)
    notes.append(f'{config.objective}: randomly initialised {m.variant}')
  check_size(encoder, size, 'the encoder')
  if decoder is None:
    decoder = mae_decoder_for(encoder, m.decoder_width, m.decoder_depth, m.decoder_heads)
  frozen: dict[str, Any] = {}
  kind = config.objective
  if kind == 'mocov3':
    mc = config.mocov3
    objective = MocoV3(
      encoder,
      MlpHead(3, mc.proj_hidden, mc.proj_dim, last_bn=True, dtype=dtype(m.dtype)),
      MlpHead(2, mc.proj_hidden, mc.proj_dim, last_bn=False, dtype=dtype(m.dtype)),
      total_steps=sizes.total_steps,
      temperature=mc.temperature,
      base_momentum=mc.momentum,
      freeze_patch_embed=mc.freeze_patch_embed,
      input_norm=norm,
    )
    return objective, frozen, start.get('encoder'), notes
  common = dict(mask_ratio=config.mae.mask_ratio, norm_pix=config.mae.norm_pix, input_norm=norm)
  if kind == 'mae':
    objective = Mae(encoder, decoder, **common)
  elif kind == 'rc_mae':
    r = config.rc_mae
    objective = RcMae(
      encoder, decoder, **common, momentum=r.momentum, momentum_schedule=r.schedule,
      total_steps=sizes.total_steps, consistency_weight=r.weight,
    )  # fmt: skip
  else:  # dmae
    d = config.dmae
    if d.teacher:
      t_loaded = loader.checkpoint(d.teacher, d.teacher_variant, dtype=dtype(d.teacher_dtype))
      teacher, frozen['teacher'] = encoder_of(t_loaded, f'dmae.teacher {d.teacher}')
      t_norm = t_loaded.normalization
      notes.append(f'teacher: {d.teacher}')
    else:
      teacher, frozen['teacher'] = random_vit(
        d.teacher_variant, size, d.teacher_dtype, jax.random.key(config.seed + 1), loader
      )
      t_norm = pretrained.IMAGENET
      notes.append(f'teacher: RANDOMLY INITIALISED {d.teacher_variant} (no dmae.teacher given)')
    check_size(teacher, size, 'the DMAE teacher')
    objective = Dmae(
      encoder, decoder, **common, teacher=teacher, teacher_block=d.teacher_block,
      student_block=d.student_block, distill_weight=d.weight, teacher_input_norm=t_norm,
    )  # fmt: skip
  return objective, frozen, (start or None), notes
