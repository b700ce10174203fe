"""Shared config pieces: argument parsing, the MOMA defaults of the paper, runlocal shrinking."""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from configs import shipped as shipped_teachers

# Paper defaults (REFERENCE section 1): ImageNet-1K 224px, mask 90%, batch 4096, AdamW blr
# 1.5e-4 (lr = blr * batch / 256), wd 0.05, betas (0.9, 0.95), 100 epochs with 20 warm-up.
IMAGENET = dict(name='imagenet2012', train_split='train', eval_split='validation')
# Input statistics of a randomly initialised model; a checkpoint's own metadata always wins.
NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# MoCo v3 / BYOL / DINO blur sigma range in pixels of a 224 px view (= augment.BLUR_SIGMA, not
# imported: configs load without TensorFlow).
IMAGENET_BLUR_SIGMA = (0.1, 2.0)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'runlocal,variant=S/16,steps=100' -> ConfigDict, values typed by ``defaults``.

  A bare key sets a boolean to True; an unknown key is an error.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {", ".join(sorted(defaults))}')
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def teacher(checkpoint: str = '', variant: str = 'B/16', weight: float = 1.0,
            student_view: str = 'masked') -> ml_collections.ConfigDict:  # fmt: skip
  """A teacher entry: a converted checkpoint directory or an official PyTorch file (converted on
  the fly), or '' for a randomly initialised ``variant``."""
  return ml_collections.ConfigDict(
    dict(checkpoint=checkpoint, variant=variant, weight=weight, student_view=student_view, **NORM)
  )


def override(c: ml_collections.ConfigDict, items) -> ml_collections.ConfigDict:
  """Sets dotted keys in place, like --config.KEY=VALUE: override(c, {'moma.mask_ratio': 0.75})."""
  for key, value in dict(items).items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def shortened_runlocal(
  name: str, steps: int, *, checkpoint_every: int, log_every: int, overrides=()
) -> ml_collections.ConfigDict:
  """configs/<name>.py:runlocal, ``steps`` long, without the final k-NN (the caller evaluates, or
  does not), then dotted-key ``overrides``: for tests and experiments built on runlocal runs.
  ``name`` may carry more config arguments: 'moco_to_mae:recipe=paper' is moco_to_mae.py:runlocal,recipe=paper."""
  import importlib

  name, _, arg = name.partition(':')
  c = importlib.import_module(f'configs.{name}').get_config(
    ','.join(filter(None, ('runlocal', arg)))
  )
  c.num_train_steps = steps
  c.log_every = log_every
  c.checkpoint_every = checkpoint_every
  c.image_every = 0
  c.evaluators.knn.at_end = False
  if 'moma' in c and steps < 3 * c.moma.projector_warmup_steps:
    # A run too short for the projector warm-up (tests) gets none, whatever its length, so that
    # runs of different lengths stay one resumable experiment.
    c.moma.projector_warmup_steps = 0
  return override(c, overrides)


def shipped(arg: str, name: str) -> str:
  """runlocal checkpoints: ``arg`` if a path, '' for 'random', the shipped tiny teacher ``arg``
  if it names one (configs/shipped.py, e.g. 'mae_milli'), else the shipped ``name`` (teachers/)."""
  if arg == 'random':
    return ''
  if arg in shipped_teachers.RECIPES:
    return shipped_teachers.path(arg)
  return arg or shipped_teachers.path(name)


def shipped_teacher(arg: str, name: str) -> dict[str, str]:
  """A runlocal teacher's {checkpoint, variant} (``shipped``'s ``arg``): the variant of the shipped
  teacher it names, else of ``name`` (a random teacher is that size; a file's own shapes win)."""
  recipe = shipped_teachers.RECIPES[arg if arg in shipped_teachers.RECIPES else name]
  return dict(checkpoint=shipped(arg, name), variant=recipe.variant)


def optim_config(**overrides: Any) -> ml_collections.ConfigDict:
  """optax optimizer settings: name adamw | lars | sgd; lr = base_lr * batch / 256.

  warmup_steps > 0 overrides warmup_epochs; grad_clip > 0 clips the global norm; layer_decay < 1
  scales each layer's lr by layer_decay ** (depth + 1 - layer id) (MAE fine-tuning, AdamW only).
  """
  o = dict(
    name='adamw', base_lr=1.5e-4, min_lr=0.0, weight_decay=0.05, b1=0.9, b2=0.999,
    warmup_epochs=5.0, warmup_steps=0, grad_clip=0.0, layer_decay=1.0,
  )  # fmt: skip
  o.update(overrides)
  return ml_collections.ConfigDict(o)


# The k-NN / linear-probe rows every pre-training run reports beside its model's: the same
# architecture randomly initialised, and raw pixels.
BASELINES = dict(raw_pixels=True, random_init=True)


def knn_evaluator(**overrides: Any) -> ml_collections.ConfigDict:
  """k-NN (k=20, T=0.07, cosine) on the model's features; train split = memory bank."""
  e = dict(
    # '' (the default): the data's own splits, data.train_split / data.eval_split, so pointing
    # data at another dataset or folder needs no second override here
    every_steps=0, at_end=True, train_split='', eval_split='',
    max_train=0,  # 0: the whole train split as the memory bank
    batch_size=1024, teachers=False, raw_pixels=False,
    random_init=False,  # also the model's architecture randomly initialised (a floor to beat)
    before=True,  # with at_end: also evaluate the model at step 0, for the final summary
    # ViT features: 'cls', 'mean' (of patch tokens) or 'cls+mean' (both: MAE-style encoders do
    # not train their CLS token, so 'cls' alone would judge them unfairly)
    features='cls+mean',
    # also a linear probe on the same features, reported as knn/<...>/linear next to the k-NN's
    # top1: logistic regression (scikit-learn's C = 1) on standardised features, fitted on device
    # with L-BFGS (moma_jax/evaluators/linear.py); digits on CPU: < 1 s at 256-d, ~8 s raw pixels
    linear=True,
    # also knn/<...>/cos_to_mean: the train features' mean cosine to their mean (near 1: the
    # encoder gives every image nearly the same features; evaluators.knn.cosine_to_mean)
    spread=False,
  )  # fmt: skip
  e.update(overrides)
  return ml_collections.ConfigDict(e)


def classification_evaluator(**overrides: Any) -> ml_collections.ConfigDict:
  """Top-1 / top-5 over the whole evaluation split."""
  e = dict(every_steps=0, at_end=True, split='', batch_size=1024)  # split '': data.eval_split
  e.update(overrides)
  return ml_collections.ConfigDict(e)


def base_config(name: str) -> ml_collections.ConfigDict:
  """What every experiment has: run length, logging, checkpoints, mesh, data."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0
  c.batch_size = 1024
  c.num_epochs = 100.0
  c.num_train_steps = 0  # > 0 overrides num_epochs
  c.stop_at_step = 0  # > 0: checkpoint and exit at this step (as if preempted); rerun to resume
  c.log_every = 50
  c.checkpoint_every = 1000
  # TensorBoard images (input, what the model sees, MAE reconstructions) of the same few examples
  # every image_every steps and at the end; 0: none.
  c.image_every = 5000
  c.image_count = 4
  c.keep_checkpoints = 3
  c.skip_nonfinite = False  # True: drop (and count) updates with a non-finite loss / gradient
  c.force_resume = False  # True: resume a workdir even if its checkpoints' config differs
  c.tensorboard = True  # TensorBoard event files in the workdir (written through TensorFlow)
  c.mesh = dict(data=-1, fsdp=1)  # FSDP: dict(data=1, fsdp=-1)
  c.sharding_rules = [('.*', 'fsdp')]  # no-op while the fsdp axis has size 1
  c.frozen_sharding_rules = [('.*', 'fsdp')]
  c.data = dict(
    # Typed placeholders (None until set) so --config.data.data_dir=gs://... can override them.
    **IMAGENET, data_dir=placeholder(str), manual_dir=placeholder(str), image_size=224,
    eval_resize_ratio=256 / 224, views={},
    # Where the views' colour jitter / grayscale / blur / solarisation run: 'device' (in the train
    # step, batched: moma_jax/data/photometric.py), 'host' (tf.data, augment.py), or 'auto': the
    # device on GPU / TPU, the host when the devices are the host's own CPU cores.
    photometric='auto',
  )  # fmt: skip
  return c


def set_views(c: ml_collections.ConfigDict, **views: dict[str, Any]) -> None:
  """c.data.views = ``views``, every one at data.image_size through an ml_collections reference:
  one override, --config.data.image_size=N, resizes them all (a view's size set on its own
  moves the others with it: these configs need one size for every view)."""
  c.data.views = {n: dict(v, size=c.data.get_ref('image_size')) for n, v in views.items()}


def moma_config(name: str, args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full MOMA config with the paper's defaults; settings fill in teachers and student."""
  c = base_config(name)
  c.objective = 'moma'
  c.batch_size = 4096
  # One view per name; 'strong' shares the teacher's crop (same geometry) and adds the MoCo v3
  # view-1 strong augmentation. Only the views the teachers need are produced.
  set_views(
    c,
    teacher=dict(scale=(0.2, 1.0)),
    strong=dict(scale=(0.2, 1.0), share_crop_with='teacher', jitter_prob=0.8,
                grayscale_prob=0.2, blur_prob=1.0, solarize_prob=0.0),
  )  # fmt: skip
  # remat='block' rematerialises each student block in the backward pass (less memory, more FLOPs).
  c.student = dict(
    checkpoint='', variant='B/16', dtype='float32', drop_path=0.0, remat='none', **NORM
  )
  c.teachers = ml_collections.ConfigDict()
  # The frozen teachers' compute dtype and attention. By the plan's cost model (docs/tpu.md,
  # "Where the bytes go") bf16 alone saves little (moco_to_mae on a v5e-8: 295 vs 279 ms per step
  # in f32), but with the flash kernel, which never writes the [B, H, 197, 197] scores to HBM, the
  # step drops to 218 ms (v5e-8) and 122 ms (v5p-8, MFU bound 83%; 197 and 116 ms with the byte
  # fixes of docs/tpu.md); L->B becomes compute-bound on both (MFU bound 91%). At the runlocal
  # scale a bf16 teacher leaves the student where float32 does (runlocal keeps float32: a CPU has
  # no fast bf16). Neither has run on a TPU yet.
  # teacher_attention: 'auto' (flash on a TPU, else xla), 'xla', 'flash' (TPU: JAX's Pallas
  # flash-attention kernel), 'cudnn' (GPU, bf16 only).
  c.teacher_dtype = 'bfloat16'
  c.teacher_attention = 'auto'
  c.teacher_scan = False  # nn.scan over the teachers' blocks: one compiled block (L/16, H/14)
  c.moma = dict(
    mask_ratio=0.9,
    align='both',  # 'cls' | 'patch' | 'both'
    teacher_norm='own+ln',  # 'own+ln' | 'own' | 'ln'
    smooth_l1_beta=1.0,
    per_teacher_projector=True,
    mask_teacher=False,
    mask_strong_view=True,
    projector_warmup_steps=0,  # > 0: only the projectors train for these first steps
    projector_lr_scale=1.0,  # the projectors' lr / the encoder's
    projector_fit_batches=0,  # > 0: projectors first fitted in closed form on this many batches
    target_stats='none',  # 'none' | 'center' | 'standardize': per position over the batch
  )
  c.optim = optim_config(base_lr=1.5e-4, b2=0.95, warmup_epochs=20.0)
  # Every row a result needs beside the student's (before and after): the teachers, the same
  # architecture randomly initialised and raw pixels (area-resized to 32 px). On ImageNet each is
  # one more pass over the memory bank and the validation split at the end of the run.
  c.evaluators = dict(knn=knn_evaluator(**BASELINES, teachers=True))
  if args.get('runlocal'):
    runlocal(c)
  moma_recipe(c, args)
  return c


def runlocal_data(c: ml_collections.ConfigDict) -> None:
  """The embedded digits dataset at 32 px, for every runlocal variant.

  Views are scaled to the data by :func:`digits_views`.
  """
  c.data.name = 'digits'
  c.data.train_split, c.data.eval_split = 'train', 'test'
  c.data.image_size = 32  # the views too (set_views); multi-crop views are sized by their configs
  c.data.eval_resize_ratio = 1.0
  digits_views(c.data.views)


def digits_views(views: ml_collections.ConfigDict) -> None:
  """Augmentations scaled to the embedded digits, in place: no horizontal flips (digits are not
  mirror-symmetric: a supervised mu/4 at the runlocal budget gets 31.0% top-1 with flips, 37.8%
  without, same crops) and the blur's sigma range scaled from 224 px to each view's size (2 px
  would erase the 2-3 px strokes of a 32 px digit)."""
  for v in views.values():
    v.flip = False
    v.blur_sigma = tuple(s * v.size / 224 for s in IMAGENET_BLUR_SIGMA)


def runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks a MOMA config to a few minutes on a 2-core CPU with the embedded digits dataset."""
  runlocal_data(c)
  if 'student' in c:
    c.student.variant = 'mu/4'
  c.teacher_dtype = 'float32'  # a CPU has no fast bf16; every runlocal result is float32
  c.batch_size = 64
  c.num_train_steps = 300
  c.optim.warmup_epochs = 1.0
  c.optim.base_lr = 1e-3
  # Fit the new projectors first (encoder held at lr 0 for 100 steps, projectors at 10x its lr):
  # a student started as an exact copy of its teacher, unmasked, keeps 50.7% of its 52.8% k-NN
  # after 300 steps with it and falls to 37.9% without (docs/results.md, "The MOMA student").
  c.moma.update(projector_warmup_steps=100, projector_lr_scale=10.0)
  c.log_every = 25
  c.checkpoint_every = 100
  c.image_every = 100
  c.evaluators.knn.batch_size = 256


def moma_recipe(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
  """The MOMA configs' ``recipe`` argument: 'paper' (the paper's loss; the full-size default) or,
  with runlocal, 'small' (:func:`small_scale_recipe`; the runlocal default)."""
  recipe = args.recipe or ('small' if args.runlocal else 'paper')
  if recipe not in ('paper', 'small') or (recipe == 'small' and not args.runlocal):
    raise ValueError(
      f"recipe={args.recipe!r}: 'paper' (the default at full scale) or, with runlocal, 'small'"
    )
  if recipe == 'small':
    small_scale_recipe(c)


def small_scale_recipe(c: ml_collections.ConfigDict) -> None:
  """runlocal's small-scale loss and budget. At 32 px (64 patches) the paper's loss (CLS + the
  visible patch tokens, 90% masked, peak lr 2.5e-4 here) leaves the pre-trained MAE student of
  MoCo -> MAE BELOW its start (k-NN 39.3% -> 31.7%, linear 70.3% -> 69.4%) and teaches Multi's
  random student nothing in k-NN (28.1%, random init 32.5%). The teacher's CLS token alone as the
  target, half the patches visible and 4x the lr, for 600 steps, does better in all three settings
  (3 seeds each; the numbers in each config's docstring and docs/results.md, "The mechanism check
  and the CLS lever"). The full configs keep the paper's settings."""
  c.moma.update(align='cls', mask_ratio=0.5)
  c.optim.base_lr = 4e-3
  c.num_train_steps = 600
  c.log_every = 50
  c.image_every = 200


def classification_config(name: str, args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Supervised training of a ViT classifier (fine-tuning / linear probe / transfer)."""
  c = base_config(name)
  c.objective = 'classification'
  c.classifier = dict(
    checkpoint=args.get('checkpoint', ''),  # converted or exported encoder; '' = from scratch
    variant='B/16',  # used without a checkpoint
    num_classes=0,  # 0: from the dataset
    pool='gap',  # 'gap' (mean of patch tokens + fc_norm, MAE) or 'cls'
    linear_probe=False,
    drop_path=0.1,
    dtype='float32',
    label_smoothing=0.1,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    mix_prob=1.0,
    switch_prob=0.5,
    erase_prob=0.25,
    **NORM,
  )
  set_views(c, image=dict(scale=(0.08, 1.0), randaugment=(2, 9.0)))
  c.evaluators = dict(
    classification=classification_evaluator(every_steps=0),
    knn=knn_evaluator(at_end=False),
  )
  return c


def runlocal_classification(c: ml_collections.ConfigDict) -> None:
  """runlocal for classification configs: digits, a tiny ViT, a couple of minutes.

  A light recipe (no mixup / cutmix / RandAugment / erasing / drop path, crops of at least half
  the image): a 2-block ViT cannot learn through MAE's heavy regularisation in a few hundred steps.
  """
  c.classifier.update(
    mixup_alpha=0.0, cutmix_alpha=0.0, erase_prob=0.0, label_smoothing=0.0, drop_path=0.0
  )
  set_views(c, image=dict(scale=(0.5, 1.0)))
  runlocal_data(c)
  c.classifier.variant = 'mu/4'
  c.batch_size = 128
  c.num_train_steps = 600
  c.optim.warmup_steps = 40
  c.log_every = 50
  c.checkpoint_every = 200
  c.evaluators.classification.update(batch_size=256)
  c.evaluators.knn.update(batch_size=256)


def pretrain_config(
  name: str, objective: str, args: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """Self-supervised pre-training (MAE, MoCo v3, DMAE, RC-MAE): one encoder plus its heads."""
  c = base_config(name)
  c.objective = objective
  c.batch_size = 4096
  c.model = dict(
    variant=args.get('variant', 'B/16'),
    checkpoint=args.get('checkpoint', ''),  # continue from a converted checkpoint (MAE: _full)
    fresh_decoder=False,  # True: accept a checkpoint without MAE decoder, train a new decoder
    dtype='float32',
    drop_path=0.0,
    decoder_width=512,
    decoder_depth=8,
    decoder_heads=16,
    **NORM,
  )
  c.mae = dict(mask_ratio=0.75, norm_pix=True)
  set_views(c, image=dict(scale=(0.2, 1.0)))
  c.optim = optim_config(base_lr=1.5e-4, b2=0.95, warmup_epochs=40.0)
  c.evaluators = dict(knn=knn_evaluator(**BASELINES))
  return c


def runlocal_pretrain(c: ml_collections.ConfigDict) -> None:
  """runlocal for pre-training configs: digits, ViT mu/4, a tiny decoder, a few minutes."""
  runlocal_data(c)
  c.model.update(variant='mu/4', decoder_width=64, decoder_depth=1, decoder_heads=4)
  c.batch_size = 64
  c.num_train_steps = 300
  c.optim.update(base_lr=1e-3, warmup_steps=30)
  c.log_every = 25
  c.checkpoint_every = 100
  c.image_every = 100
  c.evaluators.knn.batch_size = 256
